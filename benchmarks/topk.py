"""Is the top-k pass close to the cost of just running the SAE? Seconds side by side in one run.

Writes a shard directory of random activations (ViT-S-like: d_vit 384, 197 tokens, one layer), builds
a TopK SAE (expansion 8, k 64; random weights), then times, over the same activations, a bare SAE
forward pass (the ordered loader, encode and decode of every token) and the full top-k pass
(`saev_core.topk.top_k`: encode, per-image maxima, the running top-k images per latent, frequencies,
mean values and value histograms). Each contender runs `--repeats` times, alternating; medians are
compared. The page cache is warm for both.

    python benchmarks/topk.py [--n-imgs 512] [--top-k 128] [--device cpu]

The last line is `BENCH topk_vs_forward=<ratio> target<=1.5`.
"""

import argparse
import pathlib
import statistics
import tempfile
import time

import torch
from random_shards import write_random_shards

from saev_core import helpers, loaders, sae
from saev_core.steps import topk

D_VIT, N_TOKENS, EXP_FACTOR, K = 384, 197, 8, 64


@torch.no_grad()
def forward_s(model: sae.SparseAutoencoder, reader, imgs_per_chunk: int) -> float:
    """Seconds to run the SAE (encode and decode) over every token, chunked like the top-k pass."""
    t0 = time.perf_counter()
    for _, rows in loaders.OrderedLoader(reader, -1, "all"):
        for lo in range(0, len(rows), imgs_per_chunk):
            x_ND = torch.from_numpy(rows[lo : lo + imgs_per_chunk]).to(model.b_dec.device)
            model(x_ND.reshape(-1, D_VIT))
    sync(model)
    return time.perf_counter() - t0


def topk_s(model: sae.SparseAutoencoder, reader, top_k: int, imgs_per_chunk: int) -> float:
    t0 = time.perf_counter()
    topk.top_k(model, reader, -1, "all", top_k, imgs_per_chunk=imgs_per_chunk)
    sync(model)
    return time.perf_counter() - t0


def sync(model: sae.SparseAutoencoder):
    if model.b_dec.is_cuda:
        torch.cuda.synchronize()


def measure(
    n_imgs: int, top_k: int, imgs_per_chunk: int, repeats: int, device: torch.device
) -> tuple[float, float, int]:
    """Median seconds of the bare SAE forward pass and of the top-k pass, and the tokens each
    covered."""
    cfg = sae.SaeConfig(d_vit=D_VIT, exp_factor=EXP_FACTOR, activation="topk", k=K, seed=0)
    model = sae.SparseAutoencoder(cfg).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        reader = write_random_shards(pathlib.Path(tmp), n_imgs, D_VIT, N_TOKENS, 128)
        forward_s(model, reader, imgs_per_chunk)  # warm the page cache and the kernels
        forward_times, topk_times = [], []
        for _ in range(repeats):
            forward_times.append(forward_s(model, reader, imgs_per_chunk))
            topk_times.append(topk_s(model, reader, top_k, imgs_per_chunk))
    return statistics.median(forward_times), statistics.median(topk_times), n_imgs * N_TOKENS


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-imgs", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--imgs-per-chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = helpers.pick_device(args.device)
    forward, top, n_tokens = measure(
        args.n_imgs, args.top_k, args.imgs_per_chunk, args.repeats, device
    )
    print(
        f"device {device}, {n_tokens} tokens, d_sae {D_VIT * EXP_FACTOR}, k {K}, top_k {args.top_k}"
    )
    print(f"SAE forward: {forward:.2f} s ({n_tokens / forward:,.0f} tokens/s)")
    print(f"top-k pass:  {top:.2f} s ({n_tokens / top:,.0f} tokens/s)")
    print(f"BENCH topk_vs_forward={top / forward:.3f} target<=1.5")


if __name__ == "__main__":
    main()
