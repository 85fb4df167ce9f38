"""Reading `experiments.yaml` files strictly: duplicate keys and syntax errors name file and line.

PyYAML (and so Snakemake's own loader) keeps the last of two equal keys, so a second sweep with the
same name silently replaces the first, and its syntax errors reach the user as "not valid JSON or
YAML" without a line. The Snakefile loads its configuration with `load_workflow_config` instead of
a `configfile:` directive: the files given with `--configfile` (or else `config/experiments.yaml`),
read here, merged in order, with `--config` values on top.

Snakemake itself parses `--configfile` files before the workflow starts and reports a syntax error
there only as "Config file is not valid JSON or YAML";
`python -m saev_core.planning.config_files my.yaml`
checks a file as the workflow would (syntax with line and column, duplicate keys, schema, plan).
"""

import argparse
import pathlib
import sys

import yaml

from . import plan

DEFAULT_FPATH = "config/experiments.yaml"


class ConfigFileError(ValueError):
    """A configuration file that cannot be read unambiguously; the message starts with
    `file:line:column`."""


class StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: its keys may be overridden here, on purpose
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r} (first given at line {first_line[key]})",
                    problem_mark=key_node.start_mark,
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def read(fpath: str | pathlib.Path) -> dict:
    """One config file as a mapping; errors say `file:line:column: what`."""
    fpath = pathlib.Path(fpath)
    try:
        text = fpath.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigFileError(f"{fpath}: cannot read the config file: {err.strerror}") from None
    try:
        content = yaml.load(text, Loader=StrictLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{fpath}:{mark.line + 1}:{mark.column + 1}" if mark else str(fpath)
        what = " ".join(filter(None, [err.context, err.problem]))
        raise ConfigFileError(f"{where}: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{fpath}: {err}") from None
    if not isinstance(content, dict):
        raise ConfigFileError(f"{fpath}: expected a mapping of keys at the top level")
    return content


def merge(base: dict, update: dict) -> dict:
    """`update` over `base`, nested mappings merged key by key (as Snakemake merges configs)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_workflow_config(config: dict, workflow) -> list[str]:
    """Replace Snakemake's `config` by the strictly read files; return their paths.

    `--configfile` files replace the default file (they are not merged into it); `--config`
    values apply last. Called from the Snakefile, where `config` and `workflow` are globals.
    """
    fpaths = [str(f) for f in workflow.overwrite_configfiles] or [DEFAULT_FPATH]
    merged: dict = {}
    for fpath in fpaths:
        merged = merge(merged, read(fpath))
    merged = merge(merged, dict(workflow.config_settings.config or {}))
    config.clear()
    config.update(merged)
    return fpaths


def load(*fpaths: str | pathlib.Path) -> dict:
    """Read experiments YAML files strictly, merged in order (as `--configfile A B` merges
    them), and validate the result, filling the schema's defaults, as the workflow does."""
    config_dct: dict = {}
    for fpath in fpaths:
        config_dct = merge(config_dct, read(fpath))
    try:
        plan.validate_config(config_dct)
    except plan.PlanError as err:
        raise plan.PlanError(f"{', '.join(map(str, fpaths))}: {err}") from None
    return config_dct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("fpaths", nargs="+", type=pathlib.Path, help="experiments YAML files")
    args = parser.parse_args(argv)
    try:
        plan.make_plan(load(*args.fpaths))
    except (ConfigFileError, plan.PlanError) as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{', '.join(map(str, args.fpaths))}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
