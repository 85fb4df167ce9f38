"""Keep a group's previous SAEs after a rerun of it failed, instead of training it again.

A failed training job loses only its `group.json` (Snakemake deletes a failed job's declared
output); the previous `sae.pt` files stay beside it, and so do their evaluations and browsers.
Run from the workflow's directory as `python -m saev_core.planning.keep results/<sweep>/groups/<group>`:
it checks that every member the group's spec lists has a `sae.pt` trained with that member's
configuration, and writes `group.json` back, dated as its oldest SAE, so nothing downstream reruns.
"""

import argparse
import json
import os
import pathlib
import sys

from .. import checkpoints, jobs, shards
from . import plan


class KeepError(ValueError):
    """The group's previous SAEs are not all there, or were trained with other settings."""


def keep(group_dpath: pathlib.Path) -> pathlib.Path:
    group_dpath = pathlib.Path(group_dpath)
    sweep, group_id = group_dpath.parent.parent.name, group_dpath.name
    spec_fpath = pathlib.Path(plan.sweep_spec_fpath(sweep, "groups", group_id))
    try:
        job = jobs.TrainGroupJob.read(spec_fpath)
    except jobs.SpecError as err:
        raise KeepError(f"{err}; is {group_dpath} a group folder of this workflow?") from None
    mtimes = []
    for sae_id, flat in sorted(job.saes.items()):
        fpath = group_dpath / sae_id / "sae.pt"
        if not fpath.is_file():
            raise KeepError(f"{fpath} is missing: the group must train again")
        try:
            trained = checkpoints.layout(fpath, checkpoints.read_header(fpath)).train
        except checkpoints.CheckpointError as err:
            raise KeepError(f"{err}: the group must train again") from None
        if trained != flat:
            raise KeepError(f"{fpath} was trained with other settings than {spec_fpath} lists")
        mtimes.append(fpath.stat().st_mtime)
    out_fpath = group_dpath / jobs.GROUP_FNAME
    summary = {"saes": sorted(job.saes), "kept": "previous SAEs, after a failed rerun"}
    shards.write_atomic(out_fpath, (json.dumps(summary, indent=2) + "\n").encode())
    os.utime(out_fpath, (min(mtimes), min(mtimes)))
    return out_fpath


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("group_dpaths", nargs="+", type=pathlib.Path)
    args = parser.parse_args(argv)
    for dpath in args.group_dpaths:
        try:
            print(f"kept {keep(dpath)}")
        except KeepError as err:
            print(err, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
