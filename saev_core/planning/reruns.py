"""What decides whether a job runs again: spec files, code fingerprints, shard markers.

Called from `workflow/rules/common.smk` in Snakemake's main process only (never in a cluster
job's own parse of the Snakefile): `write_specs` writes each job's spec where its content changed,
`heal_shard_directories` removes the completion markers of shard directories that lost files.
`code_fingerprint` hashes the code a step runs; rules take it as a param, so editing a module
reruns exactly the steps that import it.
"""

import ast
import hashlib
import logging
import os
import pathlib

from .. import jobs, shards

logger = logging.getLogger("reruns")
PACKAGE_DPATH = pathlib.Path(__file__).parents[1]
"""The `saev_core` package."""
# Files besides Python sources that a module's behaviour depends on.
PACKAGE_DATA = {"browser": ("browser.html",)}


def write_specs(specs: dict[str, jobs.Job], root: pathlib.Path = pathlib.Path(".")):
    """Write every job's spec file whose content changed (atomically); leave the rest untouched,
    so their modification times say when the settings of that job last changed."""
    n_written = 0
    for rel_fpath, job in specs.items():
        fpath = pathlib.Path(root) / rel_fpath
        text = job.to_json()
        try:
            if fpath.read_text() == text:
                continue
        except FileNotFoundError:
            fpath.parent.mkdir(parents=True, exist_ok=True)
        shards.write_atomic(fpath, text.encode(), sync=False)
        n_written += 1
    if n_written:
        logger.info("wrote %d job spec file(s)", n_written)


def module_fpath(name: str) -> pathlib.Path:
    """The file of `saev_core` module `name` (dotted below the package: `steps.train`)."""
    return PACKAGE_DPATH.joinpath(*name.split(".")).with_suffix(".py")


def imported_modules(name: str) -> set[str]:
    """The `saev_core` modules that module `name` imports (relative or absolute), directly,
    dotted below the package (`sae`, `steps.topk`)."""
    tree = ast.parse(module_fpath(name).read_text())
    package = name.split(".")[:-1]
    candidates = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif (node.module or "").split(".")[0] == "saev_core":
                base, node.module = [], node.module.removeprefix("saev_core").lstrip(".")
            else:
                continue
            prefix = [*base, *(node.module.split(".") if node.module else [])]
            candidates.add(".".join(prefix))
            candidates.update(".".join([*prefix, alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            candidates.update(
                a.name.removeprefix("saev_core.")
                for a in node.names
                if a.name.startswith("saev_core.")
            )
    return {m for m in candidates if m and module_fpath(m).is_file()}


def import_closure(name: str) -> set[str]:
    """Module `name` and every package module it imports, transitively."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imported_modules(module) - seen)
    return seen


def code_text(name: str) -> str:
    """A module's code without comments, docstrings or formatting, plus the data files it
    reads: what decides its behaviour."""
    tree = ast.parse(module_fpath(name).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    data = [(PACKAGE_DPATH / fname).read_text() for fname in PACKAGE_DATA.get(name, ())]
    return "\n".join([ast.dump(tree), *data])


def code_fingerprint(step: str) -> str:
    """Hash of the code step `step` (`saev_core.steps.<step>`) runs: its import closure.
    Comments and docstrings don't count."""
    digest = hashlib.sha256()
    for name in sorted(import_closure(f"steps.{step}")):
        digest.update(f"{name}\n{code_text(name)}\n".encode())
    return digest.hexdigest()[:16]


def part_marker_fname(part: int, n_parts: int) -> str:
    return f".dump-part{part}-of-{n_parts}.done"


def heal_shard_directories(
    shard_dumps: dict[str, tuple[shards.Metadata, int]], root: str, dry_run: bool = False
):
    """Make Snakemake see shard files lost since their dump (a scratch purge, a bad copy).

    `shard_dumps` maps each directory's hash to its metadata and number of dump parts. A dump
    part's marker (inside the shard directory) claims its shards are complete; when one of them
    is missing or has the wrong size, the claim is false: remove the marker and the directory's
    `shards.json`, so the plan re-dumps that part and republishes. One stat per shard. A dry run
    only says what a real run would redo, and changes nothing (the disk may be read-only).
    """
    for shards_hash, (md, n_parts) in shard_dumps.items():
        dpath = pathlib.Path(root) / shards_hash
        if not dpath.is_dir():
            continue
        for part in range(n_parts):
            marker_fpath = dpath / part_marker_fname(part, n_parts)
            if not marker_fpath.exists():
                continue
            lost = [
                shards.shard_fname(i)
                for i in shards.part_shards(md.n_shards, n_parts, part)
                if not is_complete(dpath / shards.shard_fname(i), md.shard_nbytes)
            ]
            if lost:
                logger.warning(
                    "%s: %s missing or incomplete; %s dump part %d of %d",
                    dpath,
                    ", ".join(lost),
                    "a real run (not a dry run) redoes" if dry_run else "redoing",
                    part,
                    n_parts,
                )
                if not dry_run:
                    marker_fpath.unlink()
                    (dpath / shards.SHARDS_FNAME).unlink(missing_ok=True)
        labels_fpath = dpath / shards.LABELS_FNAME
        if md.records_labels and not is_complete(labels_fpath, md.labels_nbytes):
            if dry_run:
                logger.warning("%s missing; a real run publishes %s again", labels_fpath, dpath)
            else:
                (dpath / shards.SHARDS_FNAME).unlink(missing_ok=True)  # publish writes it again


def is_complete(fpath: pathlib.Path, nbytes: int) -> bool:
    try:
        return os.stat(fpath).st_size == nbytes
    except FileNotFoundError:
        return False
