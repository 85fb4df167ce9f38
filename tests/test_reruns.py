"""What reruns a job: each step's import closure (no cycles, no planner), and its fingerprint."""

import shutil

import pytest

from saev_core.planning import reruns

PACKAGE_DPATH = reruns.PACKAGE_DPATH
MODULES = sorted(
    ".".join(f.relative_to(PACKAGE_DPATH).with_suffix("").parts)
    for f in PACKAGE_DPATH.rglob("*.py")
    if f.stem != "__init__"
)
STEPS = sorted(m.removeprefix("steps.") for m in MODULES if m.startswith("steps."))
"""The modules the workflow's rules run (`python -m saev_core.steps.<step>`)."""
PLANNER = {m for m in MODULES if m.startswith("planning.")}
"""Modules that plan jobs: a step reads its job from its spec and needs none of them."""


def test_the_layout_separates_steps_planning_and_library():
    assert STEPS == sorted(
        [
            "synthetic",
            "dump",
            "train",
            "evaluate",
            "topk",
            "render",
            "summarize",
            "export",
            "probe",
            "intervene",
            "baseline",
            "traits",
        ]
    )
    assert PLANNER == {
        f"planning.{m}" for m in ("plan", "labels", "reruns", "config_files", "stale", "keep")
    }
    library = [m for m in MODULES if "." not in m]
    for module in library:  # the library the steps and the planner share imports neither
        closure = reruns.import_closure(module)
        assert not {m for m in closure if "." in m}, f"{module} imports {sorted(closure)}"


def find_cycle(start: str) -> list[str] | None:
    """A chain of imports from `start` back to a module already on the chain, if any."""

    def visit(module: str, chain: list[str]) -> list[str] | None:
        for imported in sorted(reruns.imported_modules(module)):
            if imported in chain:
                return [*chain[chain.index(imported) :], imported]
            if found := visit(imported, [*chain, imported]):
                return found
        return None

    return visit(start, [start])


@pytest.mark.parametrize("module", MODULES)
def test_no_module_is_part_of_an_import_cycle(module):
    assert find_cycle(module) is None, " -> ".join(find_cycle(module))


@pytest.mark.parametrize("step", STEPS)
def test_steps_import_no_planner(step):
    closure = reruns.import_closure(f"steps.{step}")
    assert not closure & PLANNER, f"{step} imports {sorted(closure & PLANNER)}"


def test_the_vit_wrappers_are_only_in_the_dump_closure():
    """Editing `vits.py` reruns no training, evaluation, top-k, render or summary job."""
    assert "vits" in reruns.import_closure("steps.dump")
    for step in ("train", "evaluate", "topk", "render", "summarize", "export"):
        assert "vits" not in reruns.import_closure(f"steps.{step}"), step
    assert "weights" not in reruns.import_closure("steps.summarize")


def test_code_fingerprints_follow_imports_and_ignore_docstrings(tmp_path, monkeypatch):
    steps = ("train", "evaluate", "summarize", "topk", "render")
    imports = {step: reruns.imported_modules(f"steps.{step}") for step in steps}
    assert "sae" in imports["train"] and "browser" in imports["render"]
    assert "sae" not in imports["summarize"]
    prints = {step: reruns.code_fingerprint(step) for step in steps}
    assert len(set(prints.values())) == len(steps)
    # A copy of the package with one module edited: docstrings and comments change nothing,
    # code changes exactly the steps that import it.
    copy_dpath = tmp_path / "saev_core"
    shutil.copytree(PACKAGE_DPATH, copy_dpath, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(reruns, "PACKAGE_DPATH", copy_dpath)
    assert {step: reruns.code_fingerprint(step) for step in steps} == prints
    concepts_fpath = copy_dpath / "concepts.py"
    edited = "# a comment\n" + concepts_fpath.read_text().replace('"""', '"""Edited. ', 1)
    concepts_fpath.write_text(edited)
    assert {step: reruns.code_fingerprint(step) for step in steps} == prints
    concepts_fpath.write_text(concepts_fpath.read_text() + "\n\ndef added():\n    return 1\n")
    changed = {s for s in steps if reruns.code_fingerprint(s) != prints[s]}
    assert changed == {s for s in steps if "concepts" in reruns.import_closure(f"steps.{s}")}
    assert changed == {"evaluate"}
