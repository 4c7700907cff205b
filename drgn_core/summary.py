"""The workflow's summary table: what happened to the particles, how long each stage took, how good it is.

`drgn summarize` reads the outputs the stages already wrote (the canonical table, the filter's index
files and filter.json, each training run's config.yaml and train_log.csv, the back-projection's
fsc.json, ground-truth metrics JSON) and Snakemake's benchmark files, and writes one JSON document plus
an HTML page (shown in `snakemake --report`) and optionally reStructuredText. It computes nothing new:
every number traces back to a file, so the table can never disagree with the stage outputs.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from drgn_core.errors import InputError

#: Ground-truth metrics shown per evaluated run: (label in the table, dotted key in drgn evaluate's JSON).
GT_METRICS = (
    ("particles", "n_particles"),
    ("junk among them", "junk_in_run"),
    ("|Spearman ρ| vs GT coordinate", "spearman.value"),
    ("latent summary", "spearman.summary"),
    ("held-out particles (never trained on)", "held_out.n"),
    ("|Spearman ρ|, trained particles", "held_out.spearman_trained"),
    ("|Spearman ρ|, held-out particles", "held_out.spearman_held_out"),
    ("ARI (k-means vs GT states)", "clustering.ari"),
    ("NMI", "clustering.nmi"),
    ("per-image FSC-AUC, mean", "per_image_fsc.auc_mean"),
    ("per-image FSC-AUC, std", "per_image_fsc.auc_std"),
    ("FSC-AUC, best possible", "per_image_fsc.auc_max_possible"),
    ("per-image FSC = 0.5 (Å), mean", "per_image_fsc.resolution_0.5_mean_A"),
)


@dataclass
class SummaryInputs:
    """Paths the summary reads; any may be None (that part of the table is then left out)."""

    table: Path | None = None
    filter_dir: Path | None = None
    pilots: list[Path] = field(default_factory=list)
    highres: Path | None = None
    backproject: Path | None = None
    metrics: list[Path] = field(default_factory=list)
    benchmarks: Path | None = None
    landscape: Path | None = None


# ---- readers (each names its file when something is wrong) ---------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("not found", path) from None
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON (line {e.lineno}: {e.msg})", path) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", path)
    return data


def _count_rows(path: Path) -> int:
    """Rows in an index file (read, and checked, like every index file: drgn_core.io.indices)."""
    from drgn_core.io.indices import read_index_file

    return len(read_index_file(path, allow_empty=True))


def particle_counts(table: Path | None, filter_dir: Path | None) -> dict:
    """Particles in the dataset, kept and removed by the filter, and injected junk when simulated."""
    out: dict[str, Any] = {}
    if table is not None:
        from drgn_core.io.table import read_table

        t = read_table(table)
        out["input"] = len(t)
        if t.has_ground_truth():
            out["junk_injected"] = int(np.nansum(t.gt("drgnGtJunk")))
    if filter_dir is not None:
        out["kept"] = _count_rows(filter_dir / "kept.npy")
        removed = filter_dir / "removed.npy"
        out["removed"] = _count_rows(removed) if removed.exists() else out.get("input", 0) - out["kept"]
        if out.get("input"):
            out["kept_percent"] = round(100.0 * out["kept"] / out["input"], 2)
    return out


def read_training_run(run: Path, label: str) -> dict:
    """Epochs, particle counts, final losses, throughput and time of one `drgn train` run directory."""
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise InputError("has no config.yaml: not a drgn train run directory", run)
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML ({e})", cfg_path) from None
    model, training, inputs = cfg.get("model", {}), cfg.get("training", {}), cfg.get("inputs", {})
    row: dict[str, Any] = {"run": label, "path": str(run), "zdim": model.get("zdim"),
                           "D": model.get("D", inputs.get("D")),
                           "encoder": _arch(model, "enc"), "decoder": _arch(model, "dec"),
                           "particles": inputs.get("n_particles"), "train": inputs.get("n_train"),
                           "validation": inputs.get("n_val"), "epochs_planned": training.get("epochs")}
    stopped = cfg.get("stopped") or {}  # why training ended (drgn train; --epochs auto may end it early)
    if stopped:
        row["stopped"] = stopped.get("reason")
    log = _read_train_log(run / "train_log.csv")
    if log:
        last = log[-1]
        row.update({"epochs": int(last.get("epoch", len(log))), "final_loss": last.get("loss"),
                    "final_val_loss": last.get("val_loss"), "images_per_s": last.get("images_per_s"),
                    "train_seconds": round(sum(r.get("seconds", 0.0) or 0.0 for r in log), 1)})
    return row


def _arch(model: dict, prefix: str) -> str | None:
    dim, layers = model.get(f"{prefix}_dim"), model.get(f"{prefix}_layers")
    return f"{dim}×{layers}" if dim is not None and layers is not None else None


def _read_train_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: _number(v) for k, v in r.items()} for r in rows]


def _number(text: str | None) -> float | int | str | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    if math.isnan(value):
        return None  # no validation set, for instance: JSON has no NaN
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def read_backprojection(folder: Path) -> dict:
    """Particles and GSFSC resolutions (unmasked and with the paper's mask) of `drgn backproject`."""
    rep = _read_json(folder / "fsc.json")
    out = {"n_particles": rep.get("n_particles"), "D": rep.get("D"), "apix": rep.get("apix"),
           "gsfsc_0.143_A": rep.get("resolution_0.143_A"), "gsfsc_0.5_A": rep.get("resolution_0.5_A")}
    masked = rep.get("masked")
    if isinstance(masked, dict):
        out["gsfsc_0.143_masked_A"] = masked.get("resolution_0.143_A")
    return {k: v for k, v in out.items() if v is not None}


def flatten_metrics(data: Any, prefix: str = "") -> dict[str, float | int | str]:
    """Scalar leaves of a nested metrics document, keyed by dotted path.

    Lists of records (e.g. one entry per filter) are flattened with their index; lists of numbers (curves)
    are left out, since a table cell cannot show them.
    """
    out: dict[str, float | int | str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten_metrics(v, f"{prefix}{k}."))
    elif isinstance(data, list) and any(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out.update(flatten_metrics(v, f"{prefix.rstrip('.')}[{i}]."))
    elif isinstance(data, bool):
        out[prefix.rstrip(".")] = str(data).lower()
    elif isinstance(data, int | float | str):
        out[prefix.rstrip(".")] = data
    return out


def read_metrics(path: Path) -> dict:
    """The headline ground-truth metrics of one `drgn evaluate` file (GT_METRICS), labelled by its run."""
    flat = flatten_metrics(_read_json(path))
    run = str(flat.get("run", path.stem))
    out: dict[str, Any] = {"run": "/".join(Path(run).parts[-2:])}
    for label, key in GT_METRICS:
        if key in flat:
            out[label] = flat[key]
    return out


def read_filter(path: Path) -> dict:
    """What `drgn filter` did: per run and filter how many it removed, the combination, and, with ground
    truth, precision / recall / F1 of the removed set against the injected junk."""
    rep = _read_json(path)
    out: dict[str, Any] = {}
    for r in rep.get("runs", []):
        name = "/".join(Path(str(r.get("run", "?"))).parts[-2:])
        for f in r.get("filters", []):
            out[f"{name}: {f.get('filter', '?')} removed"] = f.get("removed")
            if f.get("best_separation") is not None:  # the figure behind a gmm / k-means decision
                out[f"{name}: {f.get('filter', '?')} separation (Ashman's D, removed if >= "
                    f"{f.get('separation_threshold', 2):g})"] = f["best_separation"]
        out[f"{name}: kept"] = r.get("kept")
    combined = rep.get("combined", {})
    if combined:
        out[f"combined ({combined.get('how', '?')}): kept"] = combined.get("kept")
        out[f"combined ({combined.get('how', '?')}): removed"] = combined.get("removed")
    gt = rep.get("ground_truth")
    if isinstance(gt, dict):
        for key in ("true_junk", "true_positives", "precision", "recall", "f1"):
            if key in gt:
                out[f"junk filter {key.replace('_', ' ')}"] = gt[key]
    return out


def read_landscape(folder: Path) -> dict:
    """The landscape analysis (drgn landscape's summary.json): its settings and a row per state."""
    s = _read_json(folder / "summary.json")
    try:
        st = s["states"]
        n = int(s["n_particles"])
        r2 = s["regressor"]["r2_per_pc"]
        return {"folder": str(folder), "maps": s["n_maps"], "D": s["D"], "volume PCs": s["vol_pca"]["n_pcs"],
                "clustering": st["method"], "held-out R², z → volume PC1": r2[0] if r2 else None,
                "states": [{"state": k, "particles": c, "percent": round(100.0 * c / n, 1), "maps": m,
                            "indices": f"states/state_{k}/indices.npy"}
                           for k, (c, m) in enumerate(zip(st["counts"], st["n_maps"]))]}
    except (KeyError, TypeError, IndexError) as e:
        raise InputError(f"is not a drgn landscape summary (missing {e})", folder / "summary.json") from None


def read_benchmarks(folder: Path) -> list[dict]:
    """One row per Snakemake benchmark file (<folder>/<stage>/<job>.tsv): seconds and peak memory.

    Files directly in `folder` are not read: the workflow keeps the summary's own benchmark there, since
    a job cannot report its own run time.
    """
    rows = []
    for f in sorted(p for p in folder.rglob("*.tsv") if p.parent != folder):
        with open(f, newline="") as fh:
            records = list(csv.DictReader(fh, delimiter="\t"))
        if not records or "s" not in records[0]:
            raise InputError("not a Snakemake benchmark file (no 's' column)", f)
        rec = records[-1]  # with `repeat()`, the last repetition
        stage = f.parent.relative_to(folder).as_posix()
        rows.append({"stage": stage, "job": f.stem, "seconds": round(float(rec["s"]), 1),
                     "max_rss_mb": _float_or_none(rec.get("max_rss"))})
    return rows


def _float_or_none(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else round(value, 1)


# ---- the summary ---------------------------------------------------------------------------------------

def build_summary(inputs: SummaryInputs) -> dict:
    """Gather every part of the summary the given paths allow."""
    summary: dict[str, Any] = {}
    counts = particle_counts(inputs.table, inputs.filter_dir)
    if counts:
        summary["particles"] = counts
    if inputs.filter_dir is not None and (inputs.filter_dir / "filter.json").exists():
        summary["filter"] = read_filter(inputs.filter_dir / "filter.json")
    runs = [read_training_run(p, f"pilot {p.name}") for p in inputs.pilots]
    if inputs.highres is not None:
        runs.append(read_training_run(inputs.highres, "high-res"))
    if runs:
        summary["training"] = runs
    if inputs.backproject is not None:
        summary["backprojection"] = read_backprojection(inputs.backproject)
    if inputs.metrics:
        summary["ground_truth"] = [read_metrics(p) for p in inputs.metrics]
    if inputs.benchmarks is not None and inputs.benchmarks.is_dir():
        bench = read_benchmarks(inputs.benchmarks)
        summary["runtimes"] = bench
        summary["total_seconds"] = round(sum(r["seconds"] for r in bench), 1)
    if inputs.landscape is not None:
        summary["landscape"] = read_landscape(inputs.landscape)
    if inputs.highres is not None:
        summary["explore"] = explore_command(inputs.highres)
    summary["headline"] = headline(summary)
    return {"headline": summary.pop("headline"), **summary}


def explore_command(run: Path) -> str:
    """The command line that opens the high-res run in the explorer (`drgn explore`), for the report.

    The path is the one the summary was given, so in the workflow it is relative to the folder Snakemake
    ran in, where the user reads the report; it is shell-quoted so it can be pasted as it is.
    """
    import shlex

    return f"drgn explore {shlex.quote(str(run))}"


def headline(summary: dict) -> dict:
    """The few numbers a reader wants first, picked from the sections above."""
    h: dict[str, Any] = {}
    p = summary.get("particles", {})
    for key, label in (("input", "particles in"), ("kept", "kept"), ("removed", "removed")):
        if key in p:
            h[label] = p[key]
    f = summary.get("filter", {})
    for key in ("junk filter precision", "junk filter recall", "junk filter f1"):
        if key in f:
            h[key.replace("f1", "F1")] = f[key]
    for m in summary.get("ground_truth", []):
        if "|Spearman ρ| vs GT coordinate" in m:
            h[f"|Spearman ρ|, {m['run']}"] = m["|Spearman ρ| vs GT coordinate"]
    bp = summary.get("backprojection", {})
    if "gsfsc_0.143_A" in bp:
        h["back-projection GSFSC 0.143 (Å)"] = bp["gsfsc_0.143_A"]
    if "total_seconds" in summary:
        h["job time, all jobs (s)"] = summary["total_seconds"]
    return h


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The summary as titled tables of formatted cells (shared by the HTML and RST writers)."""
    tables = []
    if summary.get("headline"):
        tables.append(("Key results", ["", "value"], [[k, _fmt(v)] for k, v in summary["headline"].items()]))
    if "particles" in summary:
        p = summary["particles"]
        names = {"input": "particles in", "junk_injected": "junk injected (ground truth)", "kept": "kept",
                 "removed": "removed", "kept_percent": "kept (%)"}
        tables.append(("Particles", ["", "count"], [[names.get(k, k), _fmt(v)] for k, v in p.items()]))
    if "filter" in summary:
        tables.append(("Filter", ["", "value"], [[k, _fmt(v)] for k, v in summary["filter"].items()]))
    if summary.get("ground_truth"):
        runs = summary["ground_truth"]
        labels = [label for label, _ in GT_METRICS if any(label in m for m in runs)]
        tables.append(("Ground-truth metrics", ["metric", *[m["run"] for m in runs]],
                       [[label, *[_fmt(m.get(label)) for m in runs]] for label in labels]))
    if "backprojection" in summary:
        tables.append(("Back-projection of the kept particles", ["", "value"],
                       [[k, _fmt(v)] for k, v in summary["backprojection"].items()]))
    if "landscape" in summary:
        ls = summary["landscape"]
        head = ", ".join(f"{k} {_fmt(v)}" for k, v in ls.items() if k not in ("folder", "states"))
        tables.append((f"Landscape states ({ls['folder']}: {head})", ["state", "particles", "%", "maps",
                                                                     "particles' index file"],
                       [[str(r["state"]), _fmt(r["particles"]), _fmt(r["percent"]), _fmt(r["maps"]),
                         r["indices"]] for r in ls["states"]]))
    if "training" in summary:
        cols = ["run", "zdim", "D", "encoder", "decoder", "train", "validation", "epochs", "final_loss",
                "final_val_loss", "images_per_s", "train_seconds", "stopped"]
        tables.append(("Training", [c.replace("_", " ") for c in cols],
                       [[_fmt(r.get(c)) for c in cols] for r in summary["training"]]))
    if "runtimes" in summary:
        rows = [[r["stage"], r["job"], _fmt(r["seconds"]), _fmt(r["max_rss_mb"])]
                for r in summary["runtimes"]]
        rows.append(["total", "", _fmt(summary["total_seconds"]), ""])
        tables.append(("Run times (Snakemake benchmarks)", ["stage", "job", "seconds", "peak RSS (MB)"],
                       rows))
    return tables


def to_html(summary: dict, title: str = "drgnflow summary") -> str:
    """A self-contained HTML page of the summary tables (what the Snakemake report embeds)."""
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:0 0 1.5em}"
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f0f0f0}"
             "td:not(:first-child){font-variant-numeric:tabular-nums}</style></head><body>",
             f"<h1>{e(title)}</h1>"]
    if summary.get("explore"):
        parts.append("<h2>Explore the run</h2><p>Look at the latent space, select particles and decode their "
                     f"maps in the browser:</p><pre><code>{e(summary['explore'])}</code></pre>")
    for name, header, rows in _tables(summary):
        parts.append(f"<h2>{e(name)}</h2><table><tr>{''.join(f'<th>{e(h)}</th>' for h in header)}</tr>")
        parts.extend(f"<tr>{''.join(f'<td>{e(c)}</td>' for c in row)}</tr>" for row in rows)
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def to_rst(summary: dict) -> str:
    """The summary tables as reStructuredText list-tables."""
    out = []
    if summary.get("explore"):
        out += ["Explore the run", "---------------", "", "::", "", f"   {summary['explore']}", ""]
    for name, header, rows in _tables(summary):
        out += [name, "-" * len(name), "", ".. list-table::", "   :header-rows: 1", ""]
        for row in [header, *rows]:
            out.append(f"   * - {row[0] or ' '}")
            out.extend(f"     - {c or ' '}" for c in row[1:])
        out.append("")
    return "\n".join(out)


def write_summary(summary: dict, json_path: str | os.PathLike, html_path: str | os.PathLike | None = None,
                  rst_path: str | os.PathLike | None = None) -> None:
    """Write the JSON (and HTML / RST when asked), each atomically."""
    from drgn_core.io.atomic import atomic_path

    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    if html_path is not None:
        with atomic_path(html_path) as tmp:
            tmp.write_text(to_html(summary))
    if rst_path is not None:
        with atomic_path(rst_path) as tmp:
            tmp.write_text(to_rst(summary))
