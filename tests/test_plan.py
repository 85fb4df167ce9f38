"""Sweeps expand into SAEs with stable ids, grouped by data stream; bad configs name the key."""

import copy
import dataclasses
import json
import os
import pathlib
import re
import tempfile

import pytest
import yaml
from conftest import run_snakemake
from test_faults import image_folder

from saev_core import checkpoints, jobs, sae
from saev_core import config as saev_config
from saev_core.planning import config_files, plan
from saev_core.steps import summarize

REPO = pathlib.Path(__file__).parent.parent
# The tests' own copy of the embedded default: users may edit config/experiments.yaml freely.
CONFIG_FPATH = pathlib.Path(__file__).parent / "configs" / "tiny.yaml"
USER_CONFIG_FPATH = REPO / "config" / "experiments.yaml"


@pytest.fixture()
def config():
    return config_files.load(CONFIG_FPATH)


def dry_run(config: dict | pathlib.Path, workdir: pathlib.Path, *args: str):
    """`snakemake -n` of the workflow on `config` (a dict is written to `workdir` first)."""
    if isinstance(config, dict):
        config_fpath = workdir / "experiments.yaml"
        config_fpath.write_text(yaml.safe_dump(config))
    else:
        config_fpath = config
    return run_snakemake(workdir, "-n", "--configfile", str(config_fpath), *args)


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
        plan.PlanError, match=r"sweeps.tiny-synthetic.train\[0\].layer: layer -3 is not recorded"
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
    """Uncommenting every `# key: value` line of the shipped config gives a schema-valid config
    (whatever the user kept of them)."""
    lines = [
        re.sub(r"^(\s+)# (\s*(?:- )?[\w-]+:.*)$", r"\1\2", line)
        for line in USER_CONFIG_FPATH.read_text().splitlines()
    ]
    plan.validate_config(yaml.safe_load("\n".join(lines)))


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


def test_execution_settings_reach_the_training_jobs_but_not_their_identity(config):
    """`wandb_project` and `checkpoint_every` go to the group's spec; they are not part of any
    id, nor of the identity whose hash the rule takes, so changing them reruns nothing."""
    changed = copy.deepcopy(config)
    changed["sweeps"]["tiny-synthetic"] |= {"wandb_project": "my saes", "checkpoint_every": 7}
    before, after = plan.make_plan(config).specs, plan.make_plan(changed).specs
    assert before.keys() == after.keys()
    train_fpaths = [f for f, job in after.items() if isinstance(job, jobs.TrainGroupJob)]
    assert len(train_fpaths) == 2
    for fpath in train_fpaths:
        assert (after[fpath].wandb_project, after[fpath].checkpoint_every) == ("my saes", 7)
        assert before[fpath].wandb_project is None
    assert {f: j.identity_hash() for f, j in before.items()} == {
        f: j.identity_hash() for f, j in after.items()
    }


def test_every_spec_reads_back_as_its_job_and_a_bad_field_is_named(config, tmp_path):
    specs = plan.make_plan(config).specs
    for job in specs.values():
        fpath = tmp_path / "spec.json"
        fpath.write_text(job.to_json())
        assert type(job).read(fpath) == job
    train_job = next(j for j in specs.values() if isinstance(j, jobs.TrainGroupJob))
    fields = json.loads(train_job.to_json())
    for edit, message in [
        (lambda d: d.pop("work_dpath"), "TrainGroupJob: missing field 'work_dpath'"),
        (lambda d: d.update(n_steps=3), "TrainGroupJob: unknown field 'n_steps'"),
        (lambda d: d.update(checkpoint_every="10"), "TrainGroupJob.checkpoint_every: expected int"),
    ]:
        bad = copy.deepcopy(fields)
        edit(bad)
        fpath = tmp_path / "bad.json"
        fpath.write_text(json.dumps(bad))
        with pytest.raises(jobs.SpecError, match=re.escape(f"{fpath}: {message}")):
            jobs.TrainGroupJob.read(fpath)


def test_a_replaced_external_sae_reruns_its_jobs_whatever_its_mtime(config, tmp_path):
    """`cp -p` and `rsync -a` keep the old mtime: the jobs of an external SAE are identified by
    the file's content (its SHA-256), so replacing it changes their identity."""
    fpath = tmp_path / "external.pt"

    def write_sae(seed: int):
        cfg = saev_config.SaeConfig(d_vit=64, exp_factor=4, activation="topk", k=8, seed=seed)
        sae.save(fpath, sae.SparseAutoencoder(cfg))

    write_sae(seed=0)
    config["sweeps"]["tiny-synthetic"]["external_saes"] = [
        {"name": "mine", "fpath": str(fpath), "layer": -1, "tokens": "patches"}
    ]

    def external_identities() -> dict[str, str]:
        specs = plan.make_plan(config).specs
        return {
            f: job.identity_hash()
            for f, job in specs.items()
            if getattr(job, "sae_fpath", None) == str(fpath)
        }

    before = external_identities()
    assert len(before) == 6  # evaluate, trait metrics, top-k, render and two interventions
    stat = fpath.stat()
    write_sae(seed=1)  # same size, other weights
    os.utime(fpath, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` leaves it
    assert fpath.stat().st_size == stat.st_size and fpath.stat().st_mtime_ns == stat.st_mtime_ns
    after = external_identities()
    assert after.keys() == before.keys()
    assert all(after[f] != before[f] for f in before)


def sweep_edit(**changes):
    """An edit of the embedded default's sweep: `saes`/`train` entry updates and sweep keys."""

    def edit(c):
        sweep = c["sweeps"]["tiny-synthetic"]
        for key, value in changes.items():
            if key.startswith("saes"):
                sweep["saes"][int(key[4:])].update(value)
            elif key.startswith("train"):
                sweep["train"][int(key[5:])].update(value)
            else:
                sweep[key] = value

    return edit


def other_width_val(c):
    c["models"]["wide"] = {**c["models"]["tiny"], "ckpt": "vit-tiny-p8-64", "d_vit": 128}
    c["activations"]["tiny-synthetic-val"]["model"] = "wide"


def other_width_val_no_probes(c):
    other_width_val(c)
    c.pop("probes")
    c["sweeps"]["tiny-synthetic"].pop("interventions")


def model_edit(**changes):
    def edit(c):
        c["models"]["tiny"].update(changes)

    return edit


def train_layers(layers):
    def edit(c):
        c["activations"]["tiny-synthetic-train"]["layers"] = layers

    return edit


def probe_edit(probe: str = "tiny-patch-L-1", **changes):
    def edit(c):
        c["probes"][probe].update(changes)

    return edit


def intervention_edit(i: int = 0, **changes):
    def edit(c):
        c["sweeps"]["tiny-synthetic"]["interventions"][i].update(changes)

    return edit


def photo_probe(c):
    """A patch probe on a folder of photos, which has no masks."""
    root = image_folder(pathlib.Path(tempfile.mkdtemp()) / "photos")
    c["datasets"]["photos"] = {"kind": "image-folder", "root": str(root)}
    c["activations"]["tiny-photos"] = {"model": "tiny", "dataset": "photos", "layers": [-1]}
    c["probes"]["tiny-patch-L-1"] |= {
        "train_activations": "tiny-photos",
        "eval_activations": "tiny-photos",
    }


BAD_CONFIGS = {
    "a patch probe on activations without labels.bin": (
        photo_probe,
        "probes.tiny-patch-L-1.train_activations: a patch probe needs per-patch labels "
        "(labels.bin), and dataset 'photos' (image-folder) has no masks; use kind: image",
    ),
    "a probe layer the dump did not record": (
        probe_edit(layer=-3),
        "probes.tiny-patch-L-1.layer: layer -3 is not recorded by the train activations "
        "(layers [-2, -1])",
    ),
    "an intervention naming a missing probe": (
        intervention_edit(probe="tiny-patch-L-9"),
        "sweeps.tiny-synthetic.interventions[0].probe: 'tiny-patch-L-9' is not defined; known: "
        "['tiny-image-L-1', 'tiny-patch-L-1']",
    ),
    "an intervention naming a class that does not exist": (
        intervention_edit(classes=["red circle", "purple hexagon"]),
        "sweeps.tiny-synthetic.interventions[0].classes[1]: 'purple hexagon' is not a class of "
        "probe 'tiny-patch-L-1'; its classes are ['background', 'red circle',",
    ),
    "a layer beyond the model's depth": (
        train_layers([-2, 4]),
        "activations.tiny-synthetic-train.layers: layer 4 does not exist in tiny vit-tiny-p8-64, "
        "which has 4 blocks (layers -4..3, -1 the last)",
    ),
    "a tiny ckpt that does not exist": (
        model_edit(ckpt="vit-tiny-p8-46"),
        "models.tiny.ckpt: tiny ckpt must be one of ['vit-b16-224', 'vit-s14-224', 'vit-tiny-p8-64']",
    ),
    "a DINOv2 size that does not exist": (
        model_edit(family="dinov2", ckpt="dinov2_vitz14"),
        "models.tiny.ckpt: dinov2 ckpt must look like 'dinov2_vitb14'",
    ),
    "an open_clip architecture that does not exist": (
        model_edit(family="clip", ckpt="ViT-B-61/openai"),
        "models.tiny.ckpt: open_clip has no architecture 'ViT-B-61' (close: ",
    ),
    "a group too big to train": (
        sweep_edit(train0={"exp_factor": 100000}),
        "sweeps.tiny-synthetic.max_group_memory_gib: group layer-",
    ),
    "a rendered latent beyond d_sae": (
        sweep_edit(render={"include_latents": [3, 512]}),
        "sweeps.tiny-synthetic.render.include_latents: latent 512 does not exist in SAE ",
    ),
    "relu with aux_k": (
        sweep_edit(saes0={"aux_k": 4}),
        "sweeps.tiny-synthetic.saes[0].aux_k: applies to topk and batchtopk, not relu",
    ),
    "k above d_sae": (
        sweep_edit(saes1={"k": 100000}),
        "sweeps.tiny-synthetic.saes[1].k: 100000 exceeds d_sae 512",
    ),
    "relu with k": (
        sweep_edit(saes0={"k": 3}),
        "sweeps.tiny-synthetic.saes[0].k: applies to topk and batchtopk, not relu",
    ),
    "batch larger than the data": (
        sweep_edit(train0={"batch_size": 10_000_000, "n_train": 10_000_000}),
        "sweeps.tiny-synthetic.train[0].batch_size: 10000000 exceeds the 16384 patches vectors",
    ),
    "exp_factor 0": (
        sweep_edit(train0={"exp_factor": 0}),
        "sweeps.tiny-synthetic.train[0].exp_factor: 0 is less than the minimum of 1",
    ),
    "negative lr": (
        sweep_edit(train0={"lr": -0.001}),
        "sweeps.tiny-synthetic.train[0].lr: -0.001 is less than or equal to the minimum of 0",
    ),
    "probe eval activations of another d_vit": (
        other_width_val,
        "probes.tiny-image-L-1.eval_activations: 'tiny-synthetic-val' has d_vit 128",
    ),
    "eval activations of another d_vit": (
        other_width_val_no_probes,
        "sweeps.tiny-synthetic.eval_activations: 'tiny-synthetic-val' has d_vit 128",
    ),
    "too many SAEs per group": (
        sweep_edit(max_saes_per_group=5000),
        "sweeps.tiny-synthetic.max_saes_per_group: 5000 is greater than the maximum of 1024",
    ),
    "budget below one batch": (
        sweep_edit(train0={"n_train": 100}),
        "sweeps.tiny-synthetic.train[0].n_train: 100 is less than one batch (1024 vectors)",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs_fail_the_dry_run_naming_the_config_path(tmp_path, case):
    """Each refused while planning (`snakemake -n`), not once a dump or training job starts."""
    edit, expected = BAD_CONFIGS[case]
    config = yaml.safe_load(CONFIG_FPATH.read_text())
    edit(config)
    result = dry_run(config, tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{tmp_path / 'experiments.yaml'}: {expected}" in output, output[-3000:]


SAE_AND_TRAIN = saev_config.defaults(saev_config.SaeConfig) | saev_config.defaults(
    saev_config.TrainConfig
)
SWEEP = "properties/sweeps/additionalProperties/properties"
CONFIG_DEFAULTS = {
    "properties": saev_config.defaults(saev_config.WorkflowConfig),
    "properties/activations/additionalProperties/properties": saev_config.defaults(
        saev_config.ActivationsConfig
    ),
    SWEEP: saev_config.defaults(saev_config.SweepConfig),
    f"{SWEEP}/render/properties": saev_config.defaults(saev_config.RenderConfig),
    f"{SWEEP}/saes/items/properties": SAE_AND_TRAIN,
    f"{SWEEP}/external_saes/items/properties": saev_config.defaults(saev_config.ExternalSaeConfig),
    f"{SWEEP}/interventions/items/properties": saev_config.defaults(saev_config.InterventionConfig),
    f"{SWEEP}/baselines/items/properties": saev_config.defaults(saev_config.BaselineConfig),
    "properties/probes/additionalProperties/properties": saev_config.defaults(
        saev_config.ProbeConfig
    ),
    "$defs/train/properties": SAE_AND_TRAIN,
}
"""Schema location of a `properties` table -> the defaults of the config class it fills."""


def schema_defaults(node, path: str = ""):
    """(location of its `properties` table, key, default) of every default in the schema."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}/{key}".lstrip("/")
            if isinstance(value, dict) and "default" in value:
                yield path, key, value["default"]
            yield from schema_defaults(value, child)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from schema_defaults(value, f"{path}/{i}")


def test_every_schema_default_equals_the_config_default():
    """The schema's defaults are the ones that run (Snakemake fills them in); each must be the
    default `saev_core.config` declares, the one place defaults are written."""
    found = list(schema_defaults(yaml.safe_load(plan.SCHEMA_FPATH.read_text())))
    assert len(found) > 30
    for location, key, default in found:
        assert location in CONFIG_DEFAULTS, f"{location}/{key}: no config class checks it"
        expected = CONFIG_DEFAULTS[location][key]
        if dataclasses.is_dataclass(expected):  # `render: {}`: every key at its own default
            assert default == {} and expected == type(expected)(), f"{location}/{key}"
        else:
            assert default == json.loads(json.dumps(expected)), f"{location}/{key}"


def wide_sweep(n_k: int) -> dict:
    """The embedded default with `2 * n_k` TopK SAEs (k = 1..n_k on both recorded layers)."""
    config = yaml.safe_load(CONFIG_FPATH.read_text())
    sweep = config["sweeps"]["tiny-synthetic"]
    sweep["saes"] = [{"activation": "topk", "k": list(range(1, n_k + 1))}]
    sweep["external_saes"] = []
    sweep["baselines"] = []
    return config


OUTPUT_FLAGS = {
    "--out-dpath",
    "--out-fpath",
    "--browser-fpath",
    "--grid-fpath",
    "--out-csv-fpath",
    "--out-parquet-fpath",
    "--out-plot-fpath",
    "--out-verdict-fpath",
}


def test_every_job_command_is_its_spec_file_outputs_and_device(tmp_path):
    """`snakemake -n -p` of the embedded default: each step reads its settings from its spec."""
    result = dry_run(CONFIG_FPATH, tmp_path, "-p")
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if "python -m saev_core." in line]
    steps = {re.search(r"python -m saev_core\.steps\.(\w+)", c)[1] for c in commands}
    step_modules = REPO / "saev_core" / "steps"
    assert steps == {p.stem for p in step_modules.glob("*.py")} - {"__init__"}  # every step runs
    for command in commands:
        flags = set(re.findall(r"(--[a-z-]+)", command.split(" > ")[0]))
        assert "--spec-fpath" in flags, command
        assert flags - {"--spec-fpath", "--device"} <= OUTPUT_FLAGS, command
        spec_fpath = re.search(r"--spec-fpath (\S+)", command)[1].strip("'")
        assert (tmp_path / spec_fpath).is_file(), spec_fpath  # written while planning


def test_every_rule_that_runs_a_step_takes_its_spec_through_one_helper():
    """`step_job` gives a rule its spec input and its params (identity hash, code, device):
    a rule that runs a step without both would rerun on the wrong things."""
    for fpath in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for rule in re.split(r"^rule ", fpath.read_text(), flags=re.MULTILINE)[1:]:
            if "python -m saev_core" not in rule:
                continue
            helper = re.search(r"spec=([A-Z]+)\.input,", rule)
            assert helper, f"{fpath.name}: rule {rule.split(':')[0]} has no spec=<STEP>.input"
            assert f"**{helper[1]}.params," in rule, f"{fpath.name}: rule {rule.split(':')[0]}"
            assert "--spec-fpath {input.spec:q}" in rule


def test_a_thousand_saes_plan_with_short_commands(tmp_path):
    result = dry_run(wide_sweep(500), tmp_path, "-p")
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if "python -m saev_core." in line]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))
    assert counts["evaluate_sae"] == counts["topk_images"] == counts["render_features"] == "1000"
    assert counts["train_group"] == str(2 * -(-500 // 16))
    assert max(len(line) for line in commands) < 8 * 1024
    # Each job's settings went to a spec file instead.
    assert len(list((tmp_path / "results/specs/sweeps/tiny-synthetic/render").iterdir())) == 1000


def test_summary_of_three_hundred_saes_reads_their_files(tmp_path, monkeypatch):
    """Summarise from `sae.pt` headers, `metrics.json` and `traits.json` (fakes of the right
    layout)."""
    config = wide_sweep(150)
    plan.validate_config(config)
    the_plan = plan.make_plan(config)
    sweep = the_plan.sweeps["tiny-synthetic"]
    assert len(sweep.saes) == 300
    monkeypatch.chdir(tmp_path)
    sweep_dpath = tmp_path / "results" / "tiny-synthetic"
    for sae_id, group in sweep.sae_group.items():
        ckpt_fpath = sweep_dpath / "groups" / group / sae_id / "sae.pt"
        ckpt_fpath.parent.mkdir(parents=True)
        k = sweep.saes[sae_id]["k"]
        cfg = saev_config.SaeConfig(d_vit=64, activation="topk", k=k)
        section = {"cfg": dataclasses.asdict(cfg), "train": sweep.saes[sae_id]}
        header = checkpoints.saev_header(cfg, section)  # as training writes it
        ckpt_fpath.write_bytes(json.dumps(header).encode() + b"\nweights")
        metrics = {"l0": float(k), "normalized_mse": 1 / k, "n_dead": 0}
        (sweep_dpath / "saes" / sae_id).mkdir(parents=True)
        (sweep_dpath / "saes" / sae_id / "metrics.json").write_text(json.dumps(metrics))
        traits = {"probe_r": 0.5, "map": 0.5, "purity_16": 0.5, "coverage_0_3": 0.5}
        (sweep_dpath / "saes" / sae_id / "traits.json").write_text(json.dumps(traits))
    spec_fpath = tmp_path / "summary.json"
    spec_fpath.write_text(the_plan.specs[plan.summary_spec_fpath("tiny-synthetic")].to_json())
    out = {name: tmp_path / name for name in ("s.csv", "s.parquet", "p.png", "v.csv")}
    summarize.main(
        [
            *("--spec-fpath", str(spec_fpath)),
            *("--out-csv-fpath", str(out["s.csv"]), "--out-parquet-fpath", str(out["s.parquet"])),
            *("--out-plot-fpath", str(out["p.png"]), "--out-verdict-fpath", str(out["v.csv"])),
        ]
    )
    df = summarize.read_csv(out["s.csv"])
    assert len(df) == 300 and df["label"].n_unique() == 300
    assert dict(zip(df["sae"], df["label"], strict=True)) == sweep.labels
    assert (df["l0"] == df["k"]).all()
    assert out["p.png"].stat().st_size > 1000


def test_the_memory_estimate_counts_weights_optimiser_and_batch(config):
    """A TopK SAE of d_vit 768 and d_sae 24,576 with batches of 16,384: 4 copies of 37.8M
    parameters (weights, gradients, AdamW's moments) and 4 of the batch's 403M latents."""
    point = {"activation": "topk", "k": 32, "exp_factor": 32, "batch_size": 16384}
    spec = saev_config.sae_spec(768, point | {"layer": -1, "n_train": 16384, "lr": 1e-3})
    state, batch = saev_config.training_memory_bytes(spec)
    assert state == 16 * (2 * 768 * 24576 + 24576 + 768)
    assert batch == 16 * 16384 * 24576
    sweep = config["sweeps"]["tiny-synthetic"]
    sweep["train"][0]["exp_factor"] = 100000
    sweep.pop("external_saes")  # an export of an x8 SAE
    with pytest.raises(plan.PlanError, match=r"needs about [\d.]+ GiB to train") as err:
        plan.make_plan(config)
    assert "raise max_group_memory_gib" in str(err.value)
    sweep["max_group_memory_gib"] = 10_000
    plan.make_plan(config)  # a bigger GPU: the same sweep plans


def test_a_directory_given_as_an_external_sae_is_named_as_such(config, tmp_path):
    config["sweeps"]["tiny-synthetic"]["external_saes"][0]["fpath"] = str(tmp_path)
    with pytest.raises(plan.PlanError, match=r"external_saes\[0\].fpath: .* is a directory; give"):
        plan.make_plan(config)


def test_a_bf16_dump_names_another_shard_directory(config):
    before = plan.make_plan(config).activations["tiny-synthetic-train"]
    config["activations"]["tiny-synthetic-train"]["autocast_bf16"] = True
    after = plan.make_plan(config)
    shards_hash = after.activations["tiny-synthetic-train"]
    assert shards_hash != before
    assert after.shard_jobs[shards_hash].metadata.vit_ckpt == "vit-tiny-p8-64@bf16"
