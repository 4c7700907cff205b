"""Write the `drgn filter --spec` file that common.smk built from the config's filter section.

Glue only: the spec document comes in as `snakemake.params.spec` (built by
drgn_core.config_check.filter_spec), so the spec changes, and the filter reruns, exactly when the filter
settings change.
"""

import sys

import yaml

from drgn_core.io.atomic import atomic_path

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive

HEADER = "# Written by the drgnflow workflow from the config's `filter:` section; edit the config instead.\n"

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    with atomic_path(snakemake.output.spec) as tmp:
        tmp.write_text(HEADER + yaml.safe_dump(snakemake.params.spec, sort_keys=False))
    print(f"wrote {snakemake.output.spec}", file=log)
