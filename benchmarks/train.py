"""What does a sweep group save? One job training 8 stacked SAEs against 8 single-SAE jobs.

Writes a shard directory of random activations (d_vit 384, 197 tokens), then times, in one run:
- one `python -m saev_core.steps.train` job with a group of 8 SAEs (expansion 8, batch 4096; four
  ReLU and four TopK variants, all one stack), and
- 8 such jobs with one SAE each, over the same shards and the same number of steps.
Each job is a real process, as on a cluster: it starts Python and torch, validates the shards,
fills its shuffle buffers and reads its batches. Per-step arithmetic is the same on both sides,
so the difference is the shared work a group does once.

    python benchmarks/train.py [--steps 12] [--device cpu]

It prints `BENCH group8_vs_singles=<group time / singles time> target<=0.8`, then, from the group
job's own log (every training job ends with `data wait X % of Y s`), the share of its training
loop spent waiting for the loader's next batch: `BENCH train_data_wait=<fraction> target<=0.02`.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from random_shards import write_random_shards

from saev_core import jobs

D_VIT, N_TOKENS, BATCH = 384, 197, 4096
SAES = {
    **{f"relu{c}": {"activation": "relu", "sparsity_coeff": c} for c in (1e-4, 3e-4, 1e-3, 3e-3)},
    **{f"topk{k}": {"activation": "topk", "k": k} for k in (16, 32, 64, 128)},
}


def run_job(
    saes: dict, shards_dpath: pathlib.Path, out_dpath: pathlib.Path, steps: int, device
) -> tuple[float, float]:
    """One training job in its own process; returns its wall time in seconds and the fraction
    of its training loop it spent waiting for data (from its log)."""
    stream = {"layer": -1, "tokens": "all", "batch_size": BATCH, "n_train": BATCH * steps}
    common = {**stream, "seed": 0, "lr": 1e-3, "warmup_steps": 2, "exp_factor": 8}
    job = jobs.TrainGroupJob(
        group=out_dpath.name,
        model="tiny:vit-b16-224",
        saes={i: {**common, **c} for i, c in saes.items()},
        shards_dpath=str(shards_dpath),
        work_dpath=str(out_dpath.with_name(out_dpath.name + "-work")),
        checkpoint_every=0,
        wandb_project=None,
    )
    spec_fpath = out_dpath.with_name(out_dpath.name + "-spec.json")
    spec_fpath.write_text(job.to_json())
    argv = [sys.executable, "-m", "saev_core.steps.train", "--spec-fpath", str(spec_fpath)]
    argv += ["--out-dpath", str(out_dpath), "--device", device]
    t0 = time.perf_counter()
    job = subprocess.run(argv, check=True, capture_output=True, text=True)
    elapsed_s = time.perf_counter() - t0
    wait_percent = float(re.search(r"data wait ([\d.]+) %", job.stderr)[1])
    return elapsed_s, wait_percent / 100


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dpath = pathlib.Path(tmp)
        n_imgs = -(-BATCH * args.steps // N_TOKENS)
        reader = write_random_shards(tmp_dpath / "shards", n_imgs, D_VIT, N_TOKENS, 128)
        shards_dpath = reader.dpath
        group_s, data_wait = run_job(
            SAES, shards_dpath, tmp_dpath / "group", args.steps, args.device
        )
        single_s = [
            run_job({i: c}, shards_dpath, tmp_dpath / i, args.steps, args.device)[0]
            for i, c in SAES.items()
        ]

    print(f"{len(SAES)} SAEs, d_vit {D_VIT}, d_sae {D_VIT * 8}, batch {BATCH}, {args.steps} steps")
    print(f"one group job:        {group_s:7.1f} s")
    print(
        f"8 single-SAE jobs:    {sum(single_s):7.1f} s  ({', '.join(f'{s:.1f}' for s in single_s)})"
    )
    print(f"BENCH group8_vs_singles={group_s / sum(single_s):.3f} target<=0.8")
    print(f"BENCH train_data_wait={data_wait:.4f} target<=0.02")


if __name__ == "__main__":
    main()
