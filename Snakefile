"""saev-snakemake: ViT activations -> SAE sweeps -> metrics -> top-k images -> feature browser.

Run `snakemake --profile profiles/local all` (or `make run`); see README.md. The config is
config/experiments.yaml, or the files given with --configfile instead, read strictly (duplicate
keys and syntax errors name file and line), checked against workflow/schemas/ and planned in
workflow/rules/common.smk.
"""

from snakemake.utils import min_version

from saev_core.planning import config_files

min_version("9.0")

try:
    CONFIG_FPATHS = config_files.load_workflow_config(config, workflow)
except config_files.ConfigFileError as err:
    raise WorkflowError(str(err)) from None


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/dump.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/visuals.smk"
include: "workflow/rules/probes.smk"


rule all:
    default_target: True
    input:
        get_all_outputs(),
