"""saev-snakemake: ViT activations -> SAE sweeps -> metrics -> top-k images -> feature browser.

Run `snakemake --profile profiles/local all` (or `make run`); see README.md. The config is checked
against workflow/schemas/experiments.schema.yaml and planned in workflow/rules/common.smk.
"""

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/experiments.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/dump.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/visuals.smk"


rule all:
    default_target: True
    input:
        get_all_outputs(),
