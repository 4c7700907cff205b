# drgnflow: the cryoDRGN procedure (Zhong et al., Nature Methods 2021) from particles to volumes and exports.
#
#   snakemake --profile profiles/local                  # the embedded demo (config/config.yaml), 2 CPU cores
#   snakemake --profile profiles/local --report results/report.html
#   snakemake --profile profiles/slurm --configfile config/examples/empiar10076.yaml
#
# Every stage is one rule file in workflow/rules and one `drgn` subcommand; this file only wires them up.

from snakemake.utils import min_version

min_version("9.27.1")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


wildcard_constraints:
    D=r"\d+",
    zdim=r"\d+",


report: "workflow/report/workflow.rst"


include: "workflow/rules/data.smk"
include: "workflow/rules/abinit.smk"
include: "workflow/rules/pilot.smk"
include: "workflow/rules/filter.smk"
include: "workflow/rules/highres.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/landscape.smk"
include: "workflow/rules/traverse.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/summarize.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
