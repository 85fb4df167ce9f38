"""The conda environment the rules declare carries the project's own dependencies."""

import pathlib
import tomllib

import yaml

REPO = pathlib.Path(__file__).parent.parent


def test_conda_env_lists_the_project_dependencies_without_installing_by_path():
    env = yaml.safe_load((REPO / "envs" / "saev.yaml").read_text())
    pip = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [dep for dep in project["dependencies"] if not dep.startswith("snakemake")]
    assert sorted(pip) == sorted(wanted)
    # A relative path would resolve from Snakemake's copy of the file in the conda prefix.
    assert not any(dep.startswith(("-e", ".", "/")) for dep in pip)
