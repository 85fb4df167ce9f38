"""List what earlier runs left that the config no longer plans, and remove it on request.

Run from the workflow's directory as `python -m saev_core.planning.stale [CONFIG ...] [--remove]`,
with the config files `snakemake --configfile` gets (default config/experiments.yaml), merged in
that order. Stale are: sweeps the config no longer has; group, work and SAE result folders, member
folders of kept groups and exports of SAEs no sweep lists; spec files of jobs no longer planned.
Shard directories no config entry names are listed too, but never removed: other configs (or
users) may read them.
"""

import argparse
import dataclasses
import pathlib
import shutil
import sys

from . import config_files, plan


@dataclasses.dataclass(frozen=True)
class Stale:
    fpath: pathlib.Path
    why: str
    removable: bool = True


def stale_paths(the_plan: plan.Plan, root: pathlib.Path = pathlib.Path(".")) -> list[Stale]:
    """Every stale file or folder under `root` (the workflow's directory), folders whole."""
    results = root / plan.RESULTS_DPATH
    out: list[Stale] = []
    for sweep_dpath in sorted(p.parent for p in results.glob("*/groups")):
        sweep = the_plan.sweeps.get(sweep_dpath.name)
        if sweep is None:
            out.append(Stale(sweep_dpath, "sweep not in the config"))
        else:
            out += stale_in_sweep(sweep, sweep_dpath)
    planned_exports = {
        root / plan.export_fpath(s.name, s.labels[i])
        for s in the_plan.sweeps.values()
        for i in s.saes
    }
    for fpath in sorted(results.glob("exports/*/*.saev5.pt")):
        if fpath not in planned_exports:
            out.append(Stale(fpath, "export of an SAE no sweep lists"))
    planned_specs = {root / p for p in the_plan.specs}
    for fpath in sorted((root / plan.SPECS_DPATH).rglob("*.json")):
        if fpath not in planned_specs:
            out.append(Stale(fpath, "spec of a job no longer planned"))
    shards_root = pathlib.Path(the_plan.workflow.shards_dpath)
    shards_root = shards_root if shards_root.is_absolute() else root / shards_root
    for dpath in sorted(p.parent for p in shards_root.glob("*/metadata.json")):
        if dpath.name not in the_plan.shard_jobs:
            out.append(Stale(dpath, "shards no activations entry names", removable=False))
    return out


def stale_in_sweep(sweep: plan.Sweep, sweep_dpath: pathlib.Path) -> list[Stale]:
    out = []
    for group_dpath in sorted(p for p in (sweep_dpath / "groups").iterdir() if p.is_dir()):
        if group_dpath.name not in sweep.groups:
            out.append(Stale(group_dpath, "group no SAE of the sweep is trained in"))
            continue
        for member_dpath in sorted(p for p in group_dpath.iterdir() if p.is_dir()):
            if sweep.sae_group.get(member_dpath.name) != group_dpath.name:
                out.append(
                    Stale(member_dpath, "SAE the sweep no longer lists (or trained elsewhere)")
                )
    for dpath in sorted(p for p in (sweep_dpath / "work").glob("*") if p.is_dir()):
        if dpath.name not in sweep.groups:
            out.append(Stale(dpath, "checkpoint of a group no longer planned"))
    for dpath in sorted(p for p in (sweep_dpath / "saes").glob("*") if p.is_dir()):
        if dpath.name not in sweep.sae_ids:
            out.append(Stale(dpath, "results of an SAE the sweep no longer lists"))
    return out


def size_bytes(fpath: pathlib.Path) -> int:
    if fpath.is_file():
        return fpath.stat().st_size
    return sum(p.stat().st_size for p in fpath.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "fpaths",
        nargs="*",
        type=pathlib.Path,
        default=[pathlib.Path("config/experiments.yaml")],
        help="experiments YAML files, as given to snakemake --configfile",
    )
    parser.add_argument("--remove", action="store_true", help="delete what is removable")
    args = parser.parse_args(argv)
    try:
        the_plan = plan.make_plan(config_files.load(*args.fpaths), workdir=pathlib.Path("."))
    except (config_files.ConfigFileError, plan.PlanError) as err:
        print(err, file=sys.stderr)
        return 1
    stale = stale_paths(the_plan)
    left_bytes = 0
    for item in stale:
        nbytes = size_bytes(item.fpath)
        removing = args.remove and item.removable
        print(
            f"{'removed' if removing else 'stale'}\t{nbytes / 1e6:.1f} MB\t{item.fpath}\t{item.why}"
        )
        if not removing:
            left_bytes += nbytes
        elif item.fpath.is_dir():
            shutil.rmtree(item.fpath)
        else:
            item.fpath.unlink()
    print(f"{len(stale)} stale path(s), {left_bytes / 1e6:.1f} MB left", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
