"""Sweeps expand into SAEs with stable ids, grouped by data stream; bad configs name the key."""

import copy
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from saev_core import plan

REPO = pathlib.Path(__file__).parent.parent
CONFIG_FPATH = REPO / "config" / "experiments.yaml"


@pytest.fixture()
def config():
    return plan.load_config(CONFIG_FPATH)


def dry_run(config: dict | pathlib.Path, workdir: pathlib.Path, *args: str):
    """`snakemake -n` of the workflow on `config` (a dict is written to `workdir` first)."""
    if isinstance(config, dict):
        config_fpath = workdir / "experiments.yaml"
        config_fpath.write_text(yaml.safe_dump(config))
    else:
        config_fpath = config
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), *args]
        + ["--directory", str(workdir), "--configfile", str(config_fpath)],
        capture_output=True,
        text=True,
    )


def test_expand_grid_lists_and_alternatives():
    grid = [{"a": [1, 2], "b": "x"}, {"a": 3, "c": [True, False]}]
    assert plan.expand_grid(grid) == [
        {"a": 1, "b": "x"},
        {"a": 2, "b": "x"},
        {"a": 3, "c": True},
        {"a": 3, "c": False},
    ]


def test_embedded_default_has_two_groups_of_every_architecture(config):
    sweep = plan.make_plan(config).sweeps["tiny-synthetic"]
    assert len(sweep.saes) == 14
    assert sorted(len(g.sae_ids) for g in sweep.groups.values()) == [7, 7]
    for group in sweep.groups.values():
        kinds = sorted(sweep.saes[s]["activation"] for s in group.sae_ids)
        assert kinds == ["batchtopk", "jumprelu", "relu", "relu", "topk", "topk", "topk"]
        assert sum(sweep.saes[s]["matryoshka"] for s in group.sae_ids) == 1
        assert len({sweep.saes[s]["layer"] for s in group.sae_ids}) == 1


def test_ids_do_not_depend_on_yaml_order(config):
    reordered = copy.deepcopy(config)
    sweep_cfg = reordered["sweeps"]["tiny-synthetic"]
    sweep_cfg["saes"] = list(reversed(sweep_cfg["saes"]))
    sweep_cfg["train"][0] = dict(reversed(list(sweep_cfg["train"][0].items())))
    sweep_cfg["train"][0]["layer"] = list(reversed(sweep_cfg["train"][0]["layer"]))
    a = plan.make_plan(config).sweeps["tiny-synthetic"]
    b = plan.make_plan(reordered).sweeps["tiny-synthetic"]
    assert a.saes == b.saes and a.groups == b.groups


def test_cap_splits_groups(config):
    config["sweeps"]["tiny-synthetic"]["max_saes_per_group"] = 3
    sweep = plan.make_plan(config).sweeps["tiny-synthetic"]
    assert sorted(len(g.sae_ids) for g in sweep.groups.values()) == [1, 1, 3, 3, 3, 3]


def test_one_value_changes_one_group(config):
    before = plan.make_plan(config).sweeps["tiny-synthetic"]
    sweep_cfg = config["sweeps"]["tiny-synthetic"]
    base = sweep_cfg["train"][0]
    sweep_cfg["train"] = [{**base, "layer": -2}, {**base, "layer": -1, "lr": 0.001}]
    after = plan.make_plan(config).sweeps["tiny-synthetic"]
    assert len(set(before.groups) & set(after.groups)) == 1


def test_shard_hash_ignores_execution_settings(config):
    a = plan.make_plan(config).activations
    config["activations"]["tiny-synthetic-train"]["batch_size"] = 7
    config["activations"]["tiny-synthetic-train"]["n_workers"] = 3
    assert plan.make_plan(config).activations == a
    config["activations"]["tiny-synthetic-train"]["max_patches_per_shard"] = 130 * 32
    assert plan.make_plan(config).activations["tiny-synthetic-train"] != a["tiny-synthetic-train"]


def test_unrecorded_layer_is_a_plan_error(config):
    config["sweeps"]["tiny-synthetic"]["train"][0]["layer"] = [-3]
    with pytest.raises(
        plan.PlanError, match=r"sweeps.tiny-synthetic.train.layer: layer -3 is not recorded"
    ):
        plan.make_plan(config)


def test_unknown_model_is_a_plan_error(config):
    config["activations"]["tiny-synthetic-train"]["model"] = "nope"
    with pytest.raises(
        plan.PlanError, match=r"activations.tiny-synthetic-train.model: 'nope' is not defined"
    ):
        plan.make_plan(config)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda c: c["sweeps"]["tiny-synthetic"]["train"][0].update(lrr=0.1),
            "'lrr' was unexpected",
        ),
        (lambda c: c["models"]["tiny"].update(family="vgg"), "'vgg' is not one of"),
        (lambda c: c["sweeps"]["tiny-synthetic"]["saes"][1].pop("k"), "'k' is a required property"),
    ],
)
def test_snakemake_dry_run_rejects_bad_config_naming_the_key(tmp_path, edit, expected):
    config = yaml.safe_load(CONFIG_FPATH.read_text())
    edit(config)
    result = dry_run(config, tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr


def test_commented_cluster_experiments_are_valid_when_enabled():
    """Uncommenting every `# key: value` line of the shipped config gives a schema-valid config."""
    lines = [
        re.sub(r"^(\s+)# (\s*(?:- )?[\w-]+:.*)$", r"\1\2", line)
        for line in CONFIG_FPATH.read_text().splitlines()
    ]
    config = yaml.safe_load("\n".join(lines))
    assert {"clip-b16-imagenet", "siglip2-inat21"} <= set(config["sweeps"])
    plan.validate_config(config)


def test_n_parts_does_not_change_the_hash_and_cannot_exceed_the_shards(config):
    spec = config["activations"]["tiny-synthetic-train"]
    spec["n_parts"] = 1
    a = plan.make_plan(config).activations
    spec["n_parts"] = 4  # 256 images at 64 per shard: 4 shards
    assert plan.make_plan(config).activations == a
    spec["n_parts"] = 5
    with pytest.raises(
        plan.PlanError,
        match=r"activations.tiny-synthetic-train.n_parts: 5 parts cannot split 4 shard\(s\)",
    ):
        plan.make_plan(config)


def test_dataset_keys_of_another_kind_are_a_plan_error(config):
    config["datasets"]["synthetic-train"]["split"] = "train"
    with pytest.raises(
        plan.PlanError,
        match=r"datasets.synthetic-train: \['split'\] do not apply to kind 'synthetic'",
    ):
        plan.make_plan(config)


def test_dry_run_has_one_dump_job_per_part_and_one_publish(tmp_path):
    config = yaml.safe_load(CONFIG_FPATH.read_text())
    config["activations"]["tiny-synthetic-train"]["n_parts"] = 3
    result = dry_run(config, tmp_path)
    assert result.returncode == 0, result.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))
    # 3 parts of the train dump + 1 of the val dump; one publish per directory.
    assert counts["dump_activations"] == "4" and counts["publish_activations"] == "2"


def test_reversed_render_range_is_a_plan_error(config):
    config["sweeps"]["tiny-synthetic"]["render"]["log10_value_range"] = [1, -1]
    with pytest.raises(
        plan.PlanError,
        match=r"sweeps.tiny-synthetic.render.log10_value_range: min 1 is above max -1",
    ):
        plan.make_plan(config)


def test_wandb_project_reaches_the_training_jobs_only_when_set(tmp_path):
    config = yaml.safe_load(CONFIG_FPATH.read_text())
    config["sweeps"]["tiny-synthetic"]["wandb_project"] = "my saes"
    with_wandb, without = dry_run(config, tmp_path, "-p"), dry_run(CONFIG_FPATH, tmp_path, "-p")
    assert with_wandb.returncode == without.returncode == 0, with_wandb.stderr + without.stderr
    with_wandb, without = with_wandb.stdout, without.stdout
    train_cmds = [line for line in with_wandb.splitlines() if "saev_core.train " in line]
    assert len(train_cmds) == 2
    assert all("--wandb-project 'my saes'" in line for line in train_cmds)
    assert "--wandb-project" not in without
    # Execution-only: the same SAE ids either way.
    ids = re.compile(r"results/tiny-synthetic/groups/(\S+?)[ /']")
    assert set(ids.findall(with_wandb)) == set(ids.findall(without))
