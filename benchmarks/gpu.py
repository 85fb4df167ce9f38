"""The prepared GPU check: correctness against the CPU and speed ratios, in one process.

    python benchmarks/gpu.py                        # on a lent GPU: a few minutes on one H200
    python benchmarks/gpu.py --device cpu --smoke   # the same code paths, small (CI runs it)

Correctness, from the same seed on the CPU and on `--device` (TF32 off for these comparisons, so
they measure the kernels, not the number format; the dump is also compared with TF32 on, the
default, and with `autocast_bf16`, to say how much each changes stored activations):
- a group of four SAEs, one per kind (ReLU, TopK, BatchTopK, JumpReLU), trained for 200 steps
  through the real training job: each SAE's last logged loss within 2 % relative (200 steps of
  Adam amplify the last-bit differences of two matrix-product libraries; a TopK selection that
  flips moves the trajectory, not the loss level);
- the top-k pass of one TopK SAE: the same images at >= 99.9 % of (latent, rank) places, values
  within 1e-4 relative (the rest are near ties);
- a dump of the tiny ViT over generated images: within 1e-3 of the activations' scale;
- on that dump, a patch probe's grid (held-out mean IoU within 0.02) and an intervention of a
  layer -2 SAE measured by it through the ViT's last block (every IoU of `effects.csv` within
  0.02: a few patches may flip at near ties);
- on that dump, the PCA (8 components kept) and k-means baselines fitted on each device
  (components within 1e-3, centroid norms within 5 %), and the PCA baseline's trait metrics
  (Probe R, mAP, Purity@16 within 0.01).
A failed comparison prints `FAIL` and the check exits 1.

Speed, each a ratio of two things measured side by side in this run:
- `gpu_train_vs_matmul`: one group of 8 TopK SAEs (d 768, d_sae 16,128: exp_factor 21, the
  nearest to 16,384; batch 16,384) on data
  resident on the device, the training step's matrix-product FLOP/s (10 * B * D * S per SAE: two
  products forward, three backward) over a bare batched `torch.matmul` of the same shapes;
  target >= 0.6;
- `gpu_train_data_wait`: the same group trained by the real job from shard files in the page
  cache, the share of its loop spent waiting for the loader (from the job's own log); <= 0.05;
- `gpu_dump_vs_forward`: the full dump against the bare ViT-B/16 forward (benchmarks/dump.py);
  >= 0.9;
- `gpu_topk_vs_forward`: the top-k pass against a bare SAE forward (benchmarks/topk.py); <= 1.5;
and the absolute figures: vectors/s trained, images/s dumped, GB/s loaded, the device's name.
"""

import argparse
import csv
import dataclasses
import logging
import os
import pathlib
import re
import sys
import tempfile
import time

import dump as dump_bench
import numpy as np
import topk as topk_bench
import torch
from random_shards import write_random_shards

from saev_core import config, helpers, jobs, sae, shards, topk_results
from saev_core.steps import baseline as baseline_step
from saev_core.steps import dump, evaluate, intervene, probe, synthetic, topk, train
from saev_core.steps import traits as traits_step

KINDS = {
    "relu": {"activation": "relu", "sparsity_coeff": 1e-3},
    "topk": {"activation": "topk", "k": 16},
    "batchtopk": {"activation": "batchtopk", "k": 16},
    "jumprelu": {"activation": "jumprelu", "sparsity_coeff": 1e-3},
}
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def set_tf32(on: bool):
    """What `helpers.pick_device` reads when a job picks a CUDA device."""
    os.environ[helpers.TF32_ENV] = "1" if on else "0"
    helpers.use_tf32(on)


def last_losses(out_dpath: pathlib.Path) -> dict[str, float]:
    losses = {}
    for log_fpath in out_dpath.glob("*/train_log.csv"):
        with open(log_fpath, newline="") as fd:
            *_, last = csv.DictReader(fd)
        losses[log_fpath.parent.name] = float(last["loss"])
    return losses


def group_spec(kinds: dict, n_train: int, batch_size: int, exp_factor: int) -> dict:
    stream = {"layer": -1, "tokens": "all", "batch_size": batch_size, "n_train": n_train, "seed": 0}
    common = {**stream, "lr": 1e-3, "warmup_steps": 10, "exp_factor": exp_factor}
    return {name: {**common, **cfg} for name, cfg in kinds.items()}


def check_training(tmp: pathlib.Path, device: str, steps: int):
    reader = write_random_shards(tmp / "train-shards", 512, 64, 17, 128)
    spec = group_spec(KINDS, n_train=256 * steps, batch_size=256, exp_factor=8)
    set_tf32(False)
    losses = {}
    for where in ("cpu", device):
        out_dpath = tmp / f"train-{where}"
        train.train_group(
            spec, reader.dpath, out_dpath, work_dpath=tmp / f"w-{where}", device=where
        )
        losses[where] = last_losses(out_dpath)
    for name in KINDS:
        cpu, dev = losses["cpu"][name], losses[device][name]
        rel = abs(dev - cpu) / abs(cpu)
        check(
            f"train {name}",
            rel <= 0.02,
            f"loss after {steps} steps {cpu:.5f} on cpu, {dev:.5f} on {device} ({rel:.1e} relative)",
        )


def check_topk(tmp: pathlib.Path, device: str):
    reader = write_random_shards(tmp / "topk-shards", 256, 64, 17, 64)
    cfg = sae.SaeConfig(d_vit=64, exp_factor=8, activation="topk", k=16, seed=0)
    results = {}
    for where in ("cpu", device):
        model = sae.SparseAutoencoder(cfg).to(helpers.pick_device(where))
        results[where] = topk.top_k(model, reader, -1, "all", 16)
    cpu, dev = results["cpu"], results[device]
    same = float((cpu.top_imgs == dev.top_imgs).mean())
    rel = float(np.abs(cpu.top_values - dev.top_values).max() / np.abs(cpu.top_values).max())
    check(
        "top-k",
        same >= 0.999 and rel <= 1e-4,
        f"{100 * same:.2f} % of places the same images, values within {rel:.1e}",
    )


def check_dump(tmp: pathlib.Path, device: str, n_imgs: int):
    synthetic.generate(tmp / "images", n_imgs, 64, seed=0)
    dataset_cfg = {"kind": "synthetic", "root": str(tmp / "images")}
    metadata = shards.Metadata(
        vit_family="tiny",
        vit_ckpt="vit-tiny-p8-64",
        layers=(-2, -1),
        n_patches_per_img=64,
        cls_token=True,
        d_vit=64,
        n_imgs=n_imgs,
        max_patches_per_shard=65 * 2 * 32,
        data={"__class__": "synthetic", "n_imgs": n_imgs, "img_size": 64, "seed": 0},
        protocol=shards.PROTOCOL_WITH_LABELS,
    )
    acts = {}
    md16 = dataclasses.replace(metadata, vit_ckpt=metadata.vit_ckpt + shards.BF16_SUFFIX)
    runs = (("cpu", False, metadata), (device, False, metadata), (f"{device}+tf32", True, metadata))
    for where, tf32, md in (*runs, (f"{device}+bf16", True, md16)):
        set_tf32(tf32)
        dpath = dump.dump(md, dataset_cfg, tmp / f"dump-{where}", device=where.split("+")[0])
        acts[where] = np.concatenate(
            [np.fromfile(dpath / shards.shard_fname(i), "<f4") for i in range(md.n_shards)]
        )
    scale = np.abs(acts["cpu"]).max()
    for where, limit in ((device, 1e-3), (f"{device}+tf32", None), (f"{device}+bf16", None)):
        rel = float(np.abs(acts[where] - acts["cpu"]).max() / scale)
        if limit is None:
            print(f"info dump {where}: activations within {rel:.1e} of the CPU's (of their scale)")
        else:
            check(
                "dump", rel <= limit, f"activations within {rel:.1e} of the CPU's (of their scale)"
            )


def check_probe_and_intervention(tmp: pathlib.Path, device: str):
    """The probe and intervention steps on the CPU and on `device`, from the CPU dump."""
    (shards_dpath,) = (tmp / "dump-cpu").iterdir()
    dataset_cfg = {"kind": "synthetic", "root": str(tmp / "images")}
    classes = synthetic.CONCEPTS
    probe_cfg = config.ProbeConfig(
        kind="patch", train_activations="t", layer=-1, batch_size=256, n_train=256 * 100, lr=0.01
    )
    common = dict(train_shards=shards_dpath.name, eval_shards=shards_dpath.name, classes=classes)
    probe_job = jobs.ProbeJob(
        name="p",
        probe=probe_cfg,
        train_shards_dpath=str(shards_dpath),
        eval_shards_dpath=str(shards_dpath),
        train_dataset=dataset_cfg,
        eval_dataset=dataset_cfg,
        **common,
    )
    sae_dpath = tmp / "intervened-sae"
    sae_dpath.mkdir()
    cfg = sae.SaeConfig(d_vit=64, exp_factor=4, activation="topk", k=8, seed=0)
    model = sae.SparseAutoencoder(cfg)
    sae.save(sae_dpath / "sae.pt", model)
    reader = shards.ShardReader(shards_dpath)
    evaluate.write(evaluate.evaluate(model, reader, -2, "patches", list(classes)), "", sae_dpath)
    topk_results.save(sae_dpath / "topk.npz", topk.top_k(model, reader, -2, "patches", 4))
    scores = {}
    for where in ("cpu", device):
        torch_device = helpers.pick_device(where)
        stack, train_loss = probe.train(probe_job, torch_device)
        rows = probe.score(probe_job, stack, torch_device)
        probe.write(probe_job, stack, train_loss, rows, tmp / f"probe-{where}")
        job = jobs.InterveneJob(
            sae_id="s",
            label="s",
            sae_fpath=str(sae_dpath / "sae.pt"),
            sae_sha256=None,
            sae_layer=-2,
            sae_tokens="patches",
            concepts_fpath=str(sae_dpath / "concept_candidates.csv"),
            topk_fpath=str(sae_dpath / "topk.npz"),
            probe_fpath=str(tmp / f"probe-{where}" / "probe.pt"),
            probe=probe_cfg,
            intervention=config.InterventionConfig(name="i", probe="p", n_images=0),
            shards_dpath=str(shards_dpath),
            model={"family": "tiny", "ckpt": "vit-tiny-p8-64", "weights": None},
            dataset=dataset_cfg,
            shards=shards_dpath.name,
            classes=classes,
        )
        intervene.run(job, tmp / f"intervene-{where}", torch_device)
        with open(tmp / f"intervene-{where}" / "effects.csv", newline="") as fd:
            effects = [(float(r["after"]), float(r["control"])) for r in csv.DictReader(fd)]
        scores[where] = rows[0]["mean_iou"], np.array(effects)
    iou_gap = abs(scores["cpu"][0] - scores[device][0])
    check(
        "probe",
        iou_gap <= 0.02,
        f"held-out mean IoU {scores['cpu'][0]:.3f} on cpu, {iou_gap:.1e} apart",
    )
    effect_gap = float(np.abs(scores["cpu"][1] - scores[device][1]).max())
    check("intervention", effect_gap <= 0.02, f"IoUs after edits at most {effect_gap:.1e} apart")


def check_baselines_and_traits(tmp: pathlib.Path, device: str):
    """The baseline fits and the trait metrics on the CPU and on `device`, from the CPU dump."""
    (shards_dpath,) = (tmp / "dump-cpu").iterdir()
    fits, scores = {}, {}
    for where in ("cpu", device):
        torch_device = helpers.pick_device(where)
        for kind, extra in (("pca", {"k": 8}), ("kmeans", {"exp_factor": 2})):
            cfg = config.BaselineConfig(kind, -1, batch_size=256, n_train=256 * 8, **extra)
            fit_job = jobs.FitBaselineJob(cfg, shards_dpath.name, str(shards_dpath))
            fits[where, kind] = baseline_step.fit(fit_job, torch_device).model
        traits_job = jobs.TraitsJob(
            sae_fpath="",
            sae_sha256=None,
            train_shards=shards_dpath.name,
            eval_shards=shards_dpath.name,
            train_shards_dpath=str(shards_dpath),
            eval_shards_dpath=str(shards_dpath),
            layer=-1,
            classes=synthetic.CONCEPTS,
        )
        _, scores[where] = traits_step.measure(traits_job, fits[where, "pca"].to(torch_device))
    rel = float(
        (fits[device, "pca"].W_dec.detach().cpu().abs() - fits["cpu", "pca"].W_dec.detach().abs())
        .abs()
        .max()
    )
    check("baseline pca", rel <= 1e-3, f"components within {rel:.1e} of the CPU's")
    inertia = {w: fits[w, "kmeans"].b_enc.detach().cpu().sum().item() for w in ("cpu", device)}
    gap = abs(inertia[device] - inertia["cpu"]) / abs(inertia["cpu"])
    check("baseline kmeans", gap <= 0.05, f"centroid norms within {gap:.1e} of the CPU's")
    gaps = {k: abs(scores[device][k] - scores["cpu"][k]) for k in ("probe_r", "map", "purity_16")}
    check("trait metrics", max(gaps.values()) <= 0.01, f"PCA's scores apart by {gaps}")


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_vs_matmul(device: torch.device, n_saes: int, d: int, d_sae: int, batch: int, steps: int):
    """FLOP/s of the training step (data resident) over a bare batched matmul of its shapes."""
    specs = {
        f"topk{m}": config.sae_spec(
            d,
            {
                "activation": "topk",
                "k": 32,
                "exp_factor": d_sae // d,
                "layer": -1,
                "n_train": batch * steps,
                "lr": 1e-3,
                "batch_size": batch,
            },
        )
        for m in range(n_saes)
    }
    d_sae = specs["topk0"].sae.d_sae  # d * exp_factor: 16,128 for d 768 and 16,384 asked
    (stack,) = train.make_stacks(specs, steps, device).values()
    x_BD = torch.randn(batch, d, device=device)
    for step in range(3):  # warm-up: kernels, allocator, data init at step 0
        stack.step(x_BD, step)
    synchronize(device)
    t0 = time.perf_counter()
    for step in range(3, 3 + steps):
        stack.step(x_BD, step)
    stack.check_finite(3 + steps)
    synchronize(device)
    step_s = (time.perf_counter() - t0) / steps
    a_MBD = torch.randn(n_saes, batch, d, device=device)
    b_MDS = torch.randn(n_saes, d, d_sae, device=device)
    torch.matmul(a_MBD, b_MDS)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        torch.matmul(a_MBD, b_MDS)
    synchronize(device)
    matmul_flops = 2 * n_saes * batch * d * d_sae / ((time.perf_counter() - t0) / steps)
    step_flops = 10 * n_saes * batch * d * d_sae / step_s
    return step_flops / matmul_flops, batch / step_s, step_flops, matmul_flops


class WaitLog(logging.Handler):
    """The training job's own `data wait X % of Y s` line."""

    def __init__(self):
        super().__init__()
        self.share = None

    def emit(self, record):
        if m := re.search(r"data wait ([\d.]+) % of", record.getMessage()):
            self.share = float(m[1]) / 100


def train_data_wait(
    tmp: pathlib.Path,
    device: str,
    n_saes: int,
    d: int,
    d_sae: int,
    batch: int,
    n_imgs: int,
    steps: int,
):
    reader = write_random_shards(tmp / "wait-shards", n_imgs, d, 197, 256)
    kinds = {f"topk{m}": {"activation": "topk", "k": 16 * (m + 1)} for m in range(n_saes)}
    spec = group_spec(kinds, n_train=batch * steps, batch_size=batch, exp_factor=d_sae // d)
    handler = WaitLog()
    train_logger = logging.getLogger("train")
    train_logger.setLevel(logging.INFO)
    train_logger.addHandler(handler)
    t0 = time.perf_counter()
    train.train_group(
        spec,
        reader.dpath,
        tmp / "wait-group",
        work_dpath=tmp / "wait-work",
        device=device,
        log_every=max(10, steps // 4),
    )
    wall_s = time.perf_counter() - t0
    train_logger.removeHandler(handler)
    return handler.share, batch * steps * d * 4 / wall_s / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="small sizes (CPU, CI)")
    args = parser.parse_args()
    device = helpers.pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, smoke={args.smoke}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        check_training(tmp, str(device), steps=40 if args.smoke else 200)
        check_topk(tmp, str(device))
        check_dump(tmp, str(device), n_imgs=16 if args.smoke else 64)
        check_probe_and_intervention(tmp, str(device))
        check_baselines_and_traits(tmp, str(device))

        set_tf32(True)  # as jobs run on CUDA
        sizes = (2, 64, 512, 256) if args.smoke else (8, 768, 16384, 16384)
        ratio, vectors_s, step_flops, matmul_flops = train_vs_matmul(
            device, *sizes, steps=5 if args.smoke else 20
        )
        print(
            f"training step: {vectors_s:,.0f} vectors/s, each through {sizes[0]} SAEs ({step_flops / 1e12:.1f} TFLOP/s; bare matmul {matmul_flops / 1e12:.1f})"
        )
        wait, gb_s = train_data_wait(
            tmp,
            str(device),
            *sizes,
            n_imgs=64 if args.smoke else 4096,
            steps=8 if args.smoke else 200,
        )
        print(f"training from shards: {1000 * gb_s:,.0f} MB/s of activations consumed")
        n_imgs, batch = (32, 16) if args.smoke else (4096, 256)
        forward_rate, dump_rate = dump_bench.measure(n_imgs, batch, 0 if args.smoke else 8, device)
        print(f"dump: {dump_rate:,.0f} images/s (bare ViT-B/16 forward {forward_rate:,.0f})")
        forward_s, topk_s, n_tokens = topk_bench.measure(
            64 if args.smoke else 2048, 128, 64, 1 if args.smoke else 3, device
        )
        print(
            f"top-k: {n_tokens / topk_s:,.0f} tokens/s (bare SAE forward {n_tokens / forward_s:,.0f})"
        )
    print(f"BENCH gpu_train_vs_matmul={ratio:.3f} target>=0.6")
    print(f"BENCH gpu_train_data_wait={wait:.3f} target<=0.05")
    print(f"BENCH gpu_dump_vs_forward={dump_rate / forward_rate:.3f} target>=0.9")
    print(f"BENCH gpu_topk_vs_forward={topk_s / forward_s:.3f} target<=1.5")
    if FAILURES:
        print(f"FAILED: {', '.join(FAILURES)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
