"""Does Snakemake plan an ImageNet-scale sweep of 1,000 SAEs quickly, with short job commands?

Builds, in a temporary directory, ImageNet-1K's train split as an image folder (1,000 class
folders, 1,281,167 empty files: planning lists the folders and stats every file for the dataset's
fingerprint, it never opens images) and a 50,000-image
val folder, and a config like the commented CLIP ViT-B/16 experiment: 4 recorded layers, 64 dump
parts, and one sweep of 1,000 SAEs (TopK k = 1..125 and ReLU at 125 sparsity coefficients, on each
layer). Then times `snakemake -n -p all` on it (run twice: the first run writes the job spec files,
the second is what every later plan costs) and measures the longest job command it prints.

    python benchmarks/plan.py [--keep DIR]

Prints the job counts and the longest command; fails if a command reaches 8 KiB. The last line is
`BENCH plan_1000_saes_s=<seconds of the second dry run> target<=60`.
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import yaml

REPO = pathlib.Path(__file__).parent.parent
N_CLASSES, N_TRAIN, N_VAL = 1000, 1_281_167, 50_000
LAYERS = [-4, -3, -2, -1]
MAX_COMMAND_BYTES = 8 * 1024


def make_image_folder(root: pathlib.Path, n_imgs: int):
    """`root/<class>/<image>.JPEG`, empty files, spread over the classes like ImageNet."""
    for c in range(N_CLASSES):
        class_dpath = root / f"n{c:08d}"
        class_dpath.mkdir(parents=True)
        lo, hi = c * n_imgs // N_CLASSES, (c + 1) * n_imgs // N_CLASSES
        for i in range(lo, hi):
            os.close(os.open(class_dpath / f"n{c:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))


def config(train_root: pathlib.Path, val_root: pathlib.Path) -> dict:
    dump = {"model": "clip-b16", "layers": LAYERS, "max_patches_per_shard": 2_400_000}
    return {
        "datasets": {
            "imagenet-train": {"kind": "image-folder", "root": str(train_root)},
            "imagenet-val": {"kind": "image-folder", "root": str(val_root)},
        },
        "models": {
            "clip-b16": {
                "family": "clip",
                "ckpt": "ViT-B-16/openai",
                "d_vit": 768,
                "n_patches_per_img": 196,
                "cls_token": True,
            }
        },
        "activations": {
            "train": {**dump, "dataset": "imagenet-train", "n_parts": 64, "n_workers": 8},
            "val": {**dump, "dataset": "imagenet-val", "n_parts": 4},
        },
        "sweeps": {
            "clip-b16-imagenet": {
                "train_activations": "train",
                "eval_activations": "val",
                "train": [
                    {
                        "layer": LAYERS,
                        "n_train": 100_000_000,
                        "batch_size": 16384,
                        "lr": 0.0003,
                        "exp_factor": 16,
                    }
                ],
                "saes": [
                    {"activation": "topk", "k": list(range(1, 126))},
                    {
                        "activation": "relu",
                        "sparsity_coeff": [round(1e-4 * 1.05**i, 8) for i in range(125)],
                    },
                ],
                "top_k": 128,
            }
        },
    }


def dry_run(workdir: pathlib.Path) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    argv = [sys.executable, "-m", "snakemake", "-n", "-p", "-s", str(REPO / "Snakefile")]
    argv += ["--directory", str(workdir), "--configfile", str(workdir / "experiments.yaml")]
    argv += ["--cores", "1", "all"]
    t0 = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed_s = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"snakemake -n failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return elapsed_s, result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=pathlib.Path, help="build the trees here and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or pathlib.Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if not (root / "train").exists():
            make_image_folder(root / "train", N_TRAIN)
            make_image_folder(root / "val", N_VAL)
        print(f"image folders: {N_TRAIN + N_VAL} files in {time.perf_counter() - t0:.0f} s")
        workdir = root / "work"
        workdir.mkdir(exist_ok=True)
        (workdir / "experiments.yaml").write_text(
            yaml.safe_dump(config(root / "train", root / "val"))
        )
        first_s, _ = dry_run(workdir)
        second_s, output = dry_run(workdir)
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", output.split("Job stats:")[1], re.MULTILINE))
    commands = [line for line in output.splitlines() if "python -m saev_core." in line]
    longest = max(commands, key=len)
    print(f"jobs: {counts}")
    print(f"dry runs: {first_s:.1f} s (writes the spec files), {second_s:.1f} s")
    print(f"longest command: {len(longest)} bytes (limit {MAX_COMMAND_BYTES}): {longest[:160]}...")
    if len(longest) >= MAX_COMMAND_BYTES:
        sys.exit("a job command reached 8 KiB")
    print(f"BENCH plan_1000_saes_s={second_s:.1f} target<=60")


if __name__ == "__main__":
    main()
