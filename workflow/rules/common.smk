# Shared by every stage: config validation (before any job exists), paths, and input functions `get_*`.
# No analysis logic lives here: rules call `drgn` subcommands and this file only names their files.

import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

import drgn_core
from drgn_core.config_check import filter_spec, uses_abinit, validate_config
from drgn_core.errors import DrgnError
from drgn_core.fetch import workflow as empiar_mode


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
    # the schema ships inside drgn_core (package data): the one copy `drgn check-config` reads too
    validate_config(config, source=get_config_sources())
except DrgnError as e:
    raise WorkflowError(str(e)) from None


R = config["results"]
SIMULATED = config["input"]["mode"] == "simulate"
EMPIAR = config["input"]["mode"] == "empiar"
GROUND_TRUTH = SIMULATED and config["validate"]["ground_truth"]
PILOT_D = config["pilot"]["D"]
HIGH_D = config["highres"]["D"]
ZDIMS = config["pilot"]["zdims"]
# A params entry of every rule: a new drgnflow version reruns the rules (code changes alone do not).
DRGN_VERSION = drgn_core.__version__

# The canonical table: the simulator's own (in the folder it owns and replaces whole), or the import's.
SIM_DIR = f"{R}/simulated"
IMPORTED = f"{SIM_DIR}/table.star" if SIMULATED else f"{R}/data/table.star"
# input.poses abinit: the import has no poses; drgn abinit finds them on the pilot stack (made from the
# imported table, same rows), and its poses.star is the table of every later stage.
ABINIT = uses_abinit(config)
ABINIT_DIR = f"{R}/abinit"
TABLE = f"{ABINIT_DIR}/poses.star" if ABINIT else IMPORTED
HIGHRES = f"{R}/highres/train"
FILTER = f"{R}/filter"
LANDSCAPE = f"{R}/highres/landscape"
# Job logs and Snakemake benchmark files live under the results folder too, so two configs run from one
# directory (different `results`) keep their own, and the summary reads only its own run's run times.
LOGS = f"{R}/logs"
BENCHMARKS = f"{R}/benchmarks"

# Files of a `drgn train` run directory that later rules read (docs/architecture.md § Run directory of
# drgn train); learning_curve.png is declared by each training rule itself, for the report.
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
    """The run directory of the pilot of latent dimension `zdim`: the one place that names it.

    Rules pass the wildcard itself (`get_pilot_dir("{zdim}")`), the filter spec a format field.
    """
    return f"{R}/pilot/z{zdim}"


def get_log(stage, job):
    """The log file of one job: {results}/logs/<stage>/<job>.log."""
    return f"{LOGS}/{stage}/{job}.log"


def get_benchmark(stage, job):
    """The benchmark file of one job: {results}/benchmarks/<stage>/<job>.tsv (the summary reads these)."""
    return f"{BENCHMARKS}/{stage}/{job}.tsv"


def get_run_outputs(run_dir):
    """Named outputs of one training run: the files listed in RUN_FILES under run_dir."""
    return {Path(f).stem: f"{run_dir}/{f}" for f in RUN_FILES}


def get_convergence_outputs(stage, run_dir, labels):
    """convergence.png of a training run with `epochs: auto` (drgn train --epochs auto writes it), as a
    report item; nothing for a fixed number of epochs. Decided at parse time from the config.
    """
    if config[stage]["train"]["epochs"] != "auto":
        return {}
    return {
        "convergence": report(
            f"{run_dir}/convergence.png",
            caption="../report/convergence.rst",
            category=(
                "3. High-resolution training"
                if stage == "highres"
                else "1. Pilot training"
            ),
            labels={**labels, "figure": "convergence (epochs: auto)"},
        )
    }


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
    """The user's STAR or .cs file (input.mode star / cs), or the fetched one (input.mode empiar)."""
    if EMPIAR:
        return empiar_mode.fetched_path(config, "particles")
    return config["input"]["path"]


def get_import_second_files(wildcards=None):
    """The poses / CTF files given in input.poses and input.ctf, or fetched (input.mode empiar): the
    import reruns when they change."""
    return [get_second_file(key) for key in ("poses", "ctf") if get_second_file(key)]


def get_export_source(wildcards=None):
    """The file whose rows the export subsets: the user's input, or the simulator's STAR / .cs."""
    if SIMULATED:
        return f"{SIM_DIR}/particles.{config['export']['simulated_source']}"
    return get_import_source()


FETCH_DONE = f"{R}/data/fetch.done"


def get_fetched_files():
    """Named outputs of fetch_empiar (input.mode empiar), the particle file and any poses / CTF file.

    The stacks themselves are not named (the include globs are resolved by the server's listing, at run
    time); the import waits for the rule's flag file, which appears only when every file is complete.
    """
    files = {key: empiar_mode.fetched_path(config, key) for key in empiar_mode.SOURCES}
    return {key: path for key, path in files.items() if path}


def get_fetch_flag(wildcards=None):
    """The fetch rule's flag file in input.mode empiar (an input of the import), else nothing."""
    return [FETCH_DONE] if EMPIAR else []


def get_second_file(key):
    """The poses / ctf file `drgn import` reads besides the particle file: fetched, or input.<key>."""
    if EMPIAR and key in get_fetched_files():
        return get_fetched_files()[key]
    if key == "poses" and ABINIT:  # no file: drgn abinit finds the poses
        return ""
    return config["input"].get(key, "")


def get_import_options():
    """`drgn import` flags from the input section (pixel size, box, contrast, data folder)."""
    inp = config["input"]
    opts = []
    datadir = empiar_mode.import_datadir(config) if EMPIAR else inp["datadir"]
    if datadir:
        opts.append(f"--datadir {shlex.quote(datadir)}")
    if inp["apix"] is not None:
        opts.append(f"--apix {inp['apix']}")
    if inp["box"] is not None:
        opts.append(f"--box {inp['box']}")
    for key in ("kv", "cs", "amp_contrast", "phase_shift"):
        if inp.get(key) is not None:
            opts.append(f"--{key.replace('_', '-')} {inp[key]}")
    for key in ("poses", "ctf"):
        if get_second_file(key):
            opts.append(f"--{key} {shlex.quote(get_second_file(key))}")
    if ABINIT:
        opts.append("--no-poses")
    if inp.get("allow_pickle"):
        opts.append("--allow-pickle")
    if inp["invert"]:
        opts.append("--invert")
    return " ".join(opts)


def get_filter_spec():
    """The `drgn filter --spec` document written from the config (filter section)."""
    return filter_spec(config, run_dir=get_pilot_dir("{zdim}"))


def get_train_flags(stage):
    """The `drgn train` flags of a training stage ("pilot" or "highres") from its config section.

    One function for both stages, so that a new training option is added once. Returns an input function:
    a pilot's latent dimension is its `zdim` wildcard, the high-res run's is `highres.zdim`. Paths
    (table, stack, --ind, -o) and --threads stay in the rules, which own those files and the job size.
    """
    section = config[stage]
    t = section["train"]

    def flags(wildcards):
        zdim = wildcards.zdim if stage == "pilot" else section["zdim"]
        epochs = (
            f"--epochs auto --max-epochs {t['max_epochs']}"
            if t["epochs"] == "auto"
            else f"--epochs {t['epochs']}"
        )
        return (
            f"--zdim {zdim} {epochs} --enc-dim {t['enc_dim']} "
            f"--enc-layers {t['enc_layers']} --dec-dim {t['dec_dim']} --dec-layers {t['dec_layers']} "
            f"--batch-size {t['batch_size']} --lr {t['lr']} --seed {t['seed']} "
            f"--val-frac {section['val_frac']} --device {config['device']} {t['extra']}"
        ).strip()

    return flags


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
        **({"landscape": LANDSCAPE} if config["landscape"]["enabled"] else {}),
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
        *([LANDSCAPE] if config["landscape"]["enabled"] else []),
        *get_backproject_outputs(),
        *get_metrics_files(),
    ]


def get_landscape_flags():
    """`drgn landscape` options from the config's landscape section (null keys: the command's defaults)."""
    c = config["landscape"]
    flags = [
        f"--pcs {c['pcs']}",
        f"--states {c['states']}",
        f"--cluster {c['cluster']}",
        f"--seed {c['seed']}",
    ]
    flags += [f"--maps {c['maps']}"] if c["maps"] is not None else []
    flags += [f"-D {c['D']}"] if c["D"] is not None else []
    return " ".join([*flags, c["extra"]]).strip()


def get_traverse_anchors():
    """`drgn traverse` anchor flags: the configured rows, or k-means on-data centres."""
    t = config["traverse"]
    if t["anchors"]:
        return "--anchors " + ",".join(str(a) for a in t["anchors"])
    return f"--kmeans {t['kmeans']} --seed {t['seed']}"


# ---- the report's map pictures ------------------------------------------------------------------------
# Every series of decoded maps (k-means centres, PC traversals, the graph traversal) has a contact sheet
# beside it, <series>/maps.png (drgn_core.plots.volume_sheet); the report shows them in a category of their
# own, so all maps of a run are seen together, each labelled by what its series is.
MAPS_CATEGORY = "4. Maps"


def is_map_sheet(name):
    """Whether a report pattern's {name} (a path inside analyze/ or traverse/) is a map contact sheet."""
    return Path(name).name == "maps"


def get_report_category(default):
    """Report category of the figures of a directory output: map sheets go to MAPS_CATEGORY."""
    return lambda wildcards: MAPS_CATEGORY if is_map_sheet(wildcards.name) else default


def describe_map_series(folder):
    """What a volume-series folder of drgn analyze / drgn traverse holds, in words, for the report."""
    if folder.startswith("kmeans"):
        return f"k-means centres, k = {folder[len('kmeans'):]}"
    if folder.startswith("vol_pc"):
        return f"landscape, along volume PC{folder[len('vol_pc'):]}"
    if folder.startswith("pc"):
        return f"along PC{folder[len('pc'):]}"
    named = {
        "percentiles": "z percentiles",
        "labels": "label means",
        "volumes": "along the traversal",
        "maps": "landscape maps (k-means centres)",
    }
    return named.get(folder, folder)


def get_report_label(prefix=""):
    """Report label of the figures of a directory output: map sheets are named by their series."""

    def label(wildcards):
        if is_map_sheet(wildcards.name):
            folder = Path(wildcards.name).parent.as_posix()
            return {"figure": f"maps: {describe_map_series(folder)} ({folder}/)"}
        return {"figure": prefix.format(name=wildcards.name)}

    return label


# ---- data-parallel high-res training (highres.nodes, highres.processes; rules/highres.smk)
def highres_resources():
    """The job's scheduler resources: those of any training job, and for several nodes --nodes, G GPUs
    per node (gres) and `mpi` (the job step's plugin then runs the shell as is, and srun is ours).
    """
    res = get_resources("highres")
    nodes = config["highres"]["nodes"]
    if nodes > 1:
        gpus = res.pop("gpu", 0)
        res.update(nodes=nodes, tasks=nodes, mpi="srun")
        if gpus:
            res["gres"] = f"gpu:{gpus}"
    return res


def highres_launch():
    """The command prefix that starts the training processes: srun, one per node, for several nodes."""
    nodes = config["highres"]["nodes"]
    if nodes > 1:
        return f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 "
    return ""


def highres_process_flags(threads):
    """`drgn train` flags for the job's processes: each its share of the job's threads, --nproc/--nnodes."""
    nodes, procs = config["highres"]["nodes"], config["highres"]["processes"]
    flags = f"--threads {max(1, threads // procs)}"
    if nodes > 1:
        return f"{flags} --nproc {procs} --nnodes {nodes}"
    return f"{flags} --nproc {procs}" if procs > 1 else flags
