"""Readable SAE labels (`L-1 topk k=16 x8`), unique within a sweep; torch-free.

The planner stores each SAE's label in the jobs that show it (render, summary, export), so the
steps print the same names without importing the planner.
"""

import collections
import json

from .. import config


def format_number(value) -> str:
    """Short text for a config value: 0.0004 -> 4e-4, 0.01 -> 0.01, 16 -> 16."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}"


def base_label(cfg: dict) -> str:
    """What a person tells SAEs of a sweep apart by: layer, tokens, activation and its sparsity
    knob, width, and the options that change the architecture."""
    parts = [f"L{cfg['layer']}"]
    if cfg.get("tokens", "patches") != "patches":
        parts.append(cfg["tokens"])
    kind = config.KINDS[cfg["activation"]]
    if kind.penalty:
        parts.append(f"{kind.name} {kind.penalty}={format_number(cfg['sparsity_coeff'])}")
    else:
        parts.append(f"{kind.name} k={cfg['k']}")
    parts.append(f"x{cfg['exp_factor']}")
    if cfg.get("matryoshka"):
        parts.append("matryoshka")
    if cfg.get("aux_k"):
        parts.append(f"auxk={cfg['aux_k']}")
    return " ".join(parts)


def sae_labels(saes: dict[str, dict]) -> dict[str, str]:
    """A label per SAE id, unique within the sweep: SAEs that would share a base label get the
    keys in which they differ appended (`lr=3e-4`)."""
    by_base: dict[str, list[str]] = {}
    for sae_id in sorted(saes):
        by_base.setdefault(base_label(saes[sae_id]), []).append(sae_id)
    labels = {}
    for base, sae_ids in by_base.items():
        keys = sorted({k for s in sae_ids for k in saes[s]} - {"shards"})
        differing = [k for k in keys if len({json.dumps(saes[s].get(k)) for s in sae_ids}) > 1]
        for sae_id in sae_ids:
            extra = [f"{k}={format_number(saes[sae_id].get(k))}" for k in differing]
            labels[sae_id] = " ".join([base, *extra])
    counts = collections.Counter(labels.values())
    # Values that differ only beyond the printed digits: the id settles it.
    return {s: label if counts[label] == 1 else f"{label} {s}" for s, label in labels.items()}


def export_slug(label: str) -> str:
    """A label as a file name: `L-1 topk k=16 x8` -> `L-1-topk-k=16-x8`."""
    return label.replace(" ", "-")
