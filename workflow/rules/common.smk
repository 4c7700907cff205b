# Shared by every stage: config validation (before any job exists), paths, and input functions `get_*`.
# No analysis logic lives here: rules call `drgn` subcommands and this file only names their files.

import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

import drgn_core
from drgn_core.config_check import filter_spec, validate_config
from drgn_core.errors import DrgnError


# ---- validation: schema (with defaults filled in) and cross-field rules, at parse time --------------
# It also runs inside every cluster job (Snakemake re-parses the workflow there), so defaults are the
# same on the submit host and on the nodes.
def get_config_sources():
    """Where the config came from, for error messages: the config files, then any --config overrides."""
    sources = [str(f) for f in workflow.configfiles]
    if getattr(workflow.config_settings, "config", None):
        sources.append("--config")
    return " + ".join(sources) or "config"


try:
    validate_config(
        config,
        schema_path=Path(workflow.basedir) / "config" / "schema" / "config.schema.yaml",
        source=get_config_sources(),
    )
except DrgnError as e:
    raise WorkflowError(str(e)) from None


R = config["results"]
SIMULATED = config["input"]["mode"] == "simulate"
GROUND_TRUTH = SIMULATED and config["validate"]["ground_truth"]
PILOT_D = config["pilot"]["D"]
HIGH_D = config["highres"]["D"]
ZDIMS = config["pilot"]["zdims"]
# A params entry of every rule: a new drgnflow version reruns the rules (code changes alone do not).
DRGN_VERSION = drgn_core.__version__

# The canonical table: the simulator's own (in the folder it owns and replaces whole), or the import's.
SIM_DIR = f"{R}/simulated"
TABLE = f"{SIM_DIR}/table.star" if SIMULATED else f"{R}/data/table.star"
HIGHRES = f"{R}/highres/train"
FILTER = f"{R}/filter"

# Files of a `drgn train` run directory that later rules read (architecture.md, "Run directory");
# learning_curve.png is declared by each training rule itself, for the report.
RUN_FILES = ["model.pt", "z.npy", "indices.npy", "config.yaml", "train_log.csv"]


def folder_of_output(name):
    """A params function giving the folder of output `name`: the path is written once, in `output:`."""
    return lambda wildcards, output: str(Path(output[name]).parent)


def folder_of_input(name):
    """A params function giving the folder of input `name` (a run directory, for instance)."""
    return lambda wildcards, input: str(Path(input[name]).parent)


def get_stack(D):
    """The downsampled stack of box D (rows aligned with the canonical table)."""
    return f"{R}/data/particles.{D}.mrcs"


def get_pilot_dir(zdim):
    return f"{R}/pilot/z{zdim}"


def get_run_outputs(run_dir):
    """Named outputs of one training run: the files listed in RUN_FILES under run_dir."""
    return {Path(f).stem: f"{run_dir}/{f}" for f in RUN_FILES}


def get_pilot_models(wildcards=None):
    """model.pt of every pilot run: the filter reads their latents."""
    return [f"{get_pilot_dir(z)}/model.pt" for z in ZDIMS]


def get_filtered_pilot_models(wildcards=None):
    """model.pt of the pilots the filter spec names."""
    return [f"{get_pilot_dir(e['zdim'])}/model.pt" for e in config["filter"]["pilots"]]


def get_filter_selections(wildcards=None):
    """Index files that `selection` filters read: inputs of the filter, so editing one reruns it."""
    paths = set()
    for entry in config["filter"]["pilots"]:
        for item in entry["filters"]:
            if "selection" in item:
                paths.add(item["selection"]["path"])
    return sorted(paths)


def get_import_source(wildcards=None):
    """The user's STAR or .cs file (input.mode star / cs)."""
    return config["input"]["path"]


def get_export_source(wildcards=None):
    """The file whose rows the export subsets: the user's input, or the simulator's STAR / .cs."""
    if SIMULATED:
        return f"{SIM_DIR}/particles.{config['export']['simulated_source']}"
    return config["input"]["path"]


def get_import_options():
    """`drgn import` flags from the input section (pixel size, box, contrast, data folder)."""
    inp = config["input"]
    opts = []
    if inp["datadir"]:
        opts.append(f"--datadir {shlex.quote(inp['datadir'])}")
    if inp["apix"] is not None:
        opts.append(f"--apix {inp['apix']}")
    if inp["box"] is not None:
        opts.append(f"--box {inp['box']}")
    if inp["invert"]:
        opts.append("--invert")
    return " ".join(opts)


def get_filter_spec():
    """The `drgn filter --spec` document written from the config (filter section)."""
    return filter_spec(config, run_dir="{results}/pilot/z{zdim}")


def get_threads(stage):
    return config["resources"][stage]["threads"]


def get_resources(stage):
    """Scheduler resources of a stage from the config: mem_mb, runtime (minutes), `gpu` for training."""
    r = config["resources"][stage]
    res = {"mem_mb": r["mem_mb"], "runtime": r["runtime"]}
    if "gpus" in r:
        res["gpu"] = r["gpus"]
    return res


def get_metrics_files(wildcards=None):
    """Ground-truth metrics of the pilots and of the high-res run (simulated data only)."""
    if not GROUND_TRUTH:
        return []
    return [f"{R}/validation/metrics_pilot_z{z}.json" for z in ZDIMS] + [
        f"{R}/validation/metrics.json"
    ]


def get_backproject_outputs(wildcards=None):
    return (
        [f"{R}/validation/backproject/fsc.json"]
        if config["validate"]["backproject"]
        else []
    )


def get_summary_inputs(wildcards=None):
    """Everything the summary table reads."""
    inputs = {
        "table": TABLE,
        "kept": f"{FILTER}/kept.npy",
        "filter_json": f"{FILTER}/filter.json",
        "pilots": get_pilot_models(),
        "highres": f"{HIGHRES}/model.pt",
        "metrics": get_metrics_files(),
        "backproject": get_backproject_outputs(),
        "analyze": f"{R}/highres/analyze",
        "traverse": f"{R}/highres/traverse",
        "export": f"{R}/export",
    }
    return inputs


def get_final_outputs():
    """The final targets (inputs of `all`): the summary, which needs every stage, and the exports."""
    return [
        f"{R}/report/summary.json",
        f"{R}/report/summary.html",
        f"{R}/export",
        f"{R}/highres/analyze",
        f"{R}/highres/traverse",
        *get_backproject_outputs(),
        *get_metrics_files(),
    ]


def get_traverse_anchors():
    """`drgn traverse` anchor flags: the configured rows, or k-means on-data centres."""
    t = config["traverse"]
    if t["anchors"]:
        return "--anchors " + ",".join(str(a) for a in t["anchors"])
    return f"--kmeans {t['kmeans']} --seed {t['seed']}"
