"""The filter vocabulary — kinds, their parameters, types, defaults and allowed values — as one table.

Three places accept filters: the workflow config's `filter:` section (JSON schema), `drgn check-config`
(the schema plus rules a schema cannot say) and `drgn filter --spec`. All three answer from `FILTERS`
below, so a filter means the same everywhere and a new kind is added once:

- `check_filter(entry)` validates one `{kind: {params}}` entry and fills its defaults; `drgn filter`
  (drgn_core.filtering) and `drgn check-config` (drgn_core.config_check) both call it;
- `filter_item_schema()` is the JSON-schema fragment of a filter entry; the workflow schema's
  `$defs.filter_item` must equal it (tests/test_filter_vocab.py checks, so the YAML cannot drift).

The meaning of each kind (what it removes) is documented in drgn_core.filtering, which applies them.
This module imports nothing heavy: the Snakefile validates configs with it at parse time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REQUIRED = object()   # a parameter without default that must be given
OPTIONAL = object()   # a parameter without default that may be left out (then it is absent)

OUTLYING_FACTOR = 2.0  # gmm rule outlying_mean_norm: junk when a component's mean ‖z‖ > 2 × the median ‖z‖
# The rules remove an outer shell of components only when its ‖z‖ is separated from the rest's by Ashman's
# D >= this (2 = the classical threshold for two cleanly separated modes; drgn_core.filtering.shell_cut).
SEPARATION = 2.0
GMM_RULES = ("largest_mean_norm", "outlying_mean_norm")
BOX_BOUNDS = ("xmin", "xmax", "ymin", "ymax")


class VocabError(ValueError):
    """A filter entry outside the vocabulary; `param` is the dotted parameter it is about (or None)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Param:
    """One parameter of a filter kind.

    `type`: integer, number, string, ids (a non-empty list of integers >= 0) or gmm_remove (the gmm
    filter's `remove` mapping); `choices` makes it an enum of those values.
    """

    type: str
    description: str
    default: Any = REQUIRED
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None


@dataclass(frozen=True)
class Kind:
    description: str
    params: dict[str, Param]
    check: Callable[[dict], None] | None = field(default=None)   # rules between parameters


def _check_gmm(p: dict) -> None:
    rm = p["remove"]
    by_ids = isinstance(rm, dict) and set(rm) == {"ids"}
    by_rule = isinstance(rm, dict) and "rule" in rm and set(rm) <= {"rule", "n", "factor", "separation"}
    if not (by_ids or by_rule):
        raise VocabError("'remove' must be {ids: [..]}, {rule: largest_mean_norm, n: 1} or "
                         "{rule: outlying_mean_norm, factor: 2} (either rule with an optional separation: 2)",
                         "remove")
    if "ids" in rm:
        ids = _ids(rm["ids"], "remove.ids", "component")
        bad = [i for i in ids if not i < p["components"]]
        if bad:
            raise VocabError(f"component id {bad[0]} is out of range 0..{p['components'] - 1}", "remove.ids")
        p["remove"] = {"ids": ids}
    elif rm["rule"] == "largest_mean_norm":
        if "factor" in rm:
            raise VocabError("'remove.factor' belongs to rule outlying_mean_norm", "remove.factor")
        n = _to_int(rm.get("n", 1), "remove.n")
        if not 1 <= n < p["components"]:
            raise VocabError(f"'remove.n' must be between 1 and components - 1, got {n}", "remove.n")
        p["remove"] = {"rule": "largest_mean_norm", "n": n, "separation": _separation(rm)}
    elif rm["rule"] == "outlying_mean_norm":
        if "n" in rm:
            raise VocabError("'remove.n' belongs to rule largest_mean_norm", "remove.n")
        factor = rm.get("factor", OUTLYING_FACTOR)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 1:
            raise VocabError(f"'remove.factor' must be a number > 1, got {factor!r}", "remove.factor")
        p["remove"] = {"rule": "outlying_mean_norm", "factor": float(factor), "separation": _separation(rm)}
    else:
        raise VocabError(f"unknown rule {rm['rule']!r} (known: {', '.join(GMM_RULES)})", "remove.rule")


def _separation(rm: dict) -> float:
    v = rm.get("separation", SEPARATION)
    if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
        raise VocabError(f"'remove.separation' must be a number >= 0, got {v!r}", "remove.separation")
    return float(v)


def _check_kmeans(p: dict) -> None:
    if "remove_ids" not in p and "separation" not in p:
        raise VocabError("give remove_ids (clusters to remove), separation (remove the clusters whose ‖z‖ "
                         "is separated from the rest's by at least this Ashman's D), or both", "remove_ids")
    bad = [i for i in p.get("remove_ids", []) if not i < p["k"]]
    if bad:
        raise VocabError(f"cluster id {bad[0]} is out of range 0..{p['k'] - 1}", "remove_ids")


def _check_box(p: dict) -> None:
    if not any(b in p for b in BOX_BOUNDS):
        raise VocabError("give at least one of xmin, xmax, ymin, ymax")
    for lo, hi in (("xmin", "xmax"), ("ymin", "ymax")):
        if lo in p and hi in p and p[lo] >= p[hi]:
            raise VocabError(f"needs {lo} < {hi}, got {p[lo]:g} and {p[hi]:g}", lo)


_SEED = "Seed of {}."
_INSIDE = ("inside", "outside")

#: Every filter kind drgnflow knows, in the order they are listed to users.
FILTERS: dict[str, Kind] = {
    "threshold": Kind(
        "Remove particles whose latent coordinate `dim` compares with `value` as `op` says.",
        {"dim": Param("integer", "Latent dimension (0-based).", 0, minimum=0),
         "op": Param("string", "Comparison selecting removed particles.", "<=",
                     choices=("<=", ">=", "<", ">")),
         "value": Param("number", "Threshold on the latent coordinate.")}),
    "gmm": Kind(
        "Fit a Gaussian mixture to the latents and remove whole components; the paper's outlier component "
        "is the one with the largest mean norm ‖z‖ (rule largest_mean_norm). The rules remove components "
        "only when their ‖z‖ is separated from the rest's (Ashman's D >= remove.separation, default 2).",
        {"components": Param("integer", "Number of mixture components.", 5, minimum=2, maximum=100),
         "covariance": Param("string", "Covariance type.", "full",
                             choices=("full", "tied", "diag", "spherical")),
         "seed": Param("integer", _SEED.format("the mixture fit"), 0, minimum=0),
         "remove": Param("gmm_remove", "Which components to remove, by id or by rule.",
                         {"rule": "largest_mean_norm", "n": 1})},
        _check_gmm),
    "kmeans": Kind(
        "Cluster the latents with k-means and remove the listed clusters; with separation, only the "
        "clusters (the listed ones, or any when none are listed) whose ‖z‖ is separated from the rest's by "
        "Ashman's D >= separation.",
        {"k": Param("integer", "Number of clusters.", 20, minimum=2, maximum=1000),
         "seed": Param("integer", _SEED.format("k-means"), 0, minimum=0),
         "remove_ids": Param("ids", "Cluster ids to remove.", OPTIONAL),
         "separation": Param("number", "Remove only clusters whose ‖z‖ is separated from the rest's by at "
                             "least this Ashman's D (2: two cleanly separated modes).", OPTIONAL, minimum=0)},
        _check_kmeans),
    "norm": Kind(
        "Remove particles whose latent norm ‖z‖ exceeds mean + k_std · std.",
        {"k_std": Param("number", "Number of standard deviations.", 3.0, exclusive_minimum=0)}),
    "box": Kind(
        "Keep (or remove) particles inside a rectangle of the PCA or UMAP plane; give at least one edge "
        "(a missing edge is open). A 1-D latent has only x (its PC1).",
        {"space": Param("string", "Plane the rectangle lives in.", "pca", choices=("pca", "umap")),
         "xmin": Param("number", "Left edge.", OPTIONAL),
         "xmax": Param("number", "Right edge.", OPTIONAL),
         "ymin": Param("number", "Bottom edge.", OPTIONAL),
         "ymax": Param("number", "Top edge.", OPTIONAL),
         "keep": Param("string", "Which side of the rectangle is kept.", "inside", choices=_INSIDE),
         "umap": Param("string", "UMAP embedding (.npy, rows aligned with the run's z.npy); computed when "
                       "not given.", OPTIONAL),
         "seed": Param("integer", _SEED.format("the UMAP computed when needed"), 0, minimum=0)},
        _check_box),
    "selection": Kind(
        "Keep (or remove) a saved selection of particles: an index file (.npy or .txt) of 0-based rows of "
        "the canonical table, e.g. one hand-picked in the explorer, so the choice is reproducible.",
        {"path": Param("string", "The index file (relative to the working directory).", REQUIRED),
         "keep": Param("string", "inside keeps only the selected particles; outside removes them.", "inside",
                       choices=_INSIDE)}),
    "abinit_confidence": Kind(
        "Remove particles whose ab initio pose confidence (drgn abinit's confidence.npy: the Δχ² gap between "
        "the best pose and the best one > 20° away) is below `min`: images without a distinct best pose.",
        {"min": Param("number", "Smallest confidence kept (read it off the run's confidence.png).",
                      minimum=0),
         "run": Param("string", "The drgn abinit run directory; when not given, the one whose poses.star "
                      "the filtered run was trained on (input.poses: abinit in the workflow).", OPTIONAL)}),
}


# ---- validation -----------------------------------------------------------------------------------------
def _is_numpy(v: Any, kinds: str) -> bool:
    return hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0 and v.dtype.kind in kinds


def _to_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not (isinstance(v, int) or _is_numpy(v, "iu")):
        raise VocabError(f"'{name}' must be an integer, got {v!r}", name)
    return int(v)


def _to_float(v: Any, name: str) -> float:
    if isinstance(v, bool) or not (isinstance(v, int | float) or _is_numpy(v, "iuf")):
        raise VocabError(f"'{name}' must be a number, got {v!r}", name)
    return float(v)


def _ids(v: Any, name: str, what: str) -> list[int]:
    if not isinstance(v, list) or not v:
        raise VocabError(f"'{name}' must be a list of {what} ids, got {v!r}", name)
    ids = [_to_int(i, name) for i in v]
    if min(ids) < 0:
        raise VocabError(f"{what} id {min(ids)} is negative", name)
    return sorted(set(ids))


def _one_of(choices: tuple) -> str:
    return " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)


def _value(v: Any, name: str, spec: Param) -> Any:
    """One parameter value checked against its table entry (type, choices, range)."""
    if spec.choices:
        if v not in spec.choices:
            raise VocabError(f"'{name}' must be {_one_of(spec.choices)}, got {v!r}", name)
        return v
    if spec.type == "integer":
        v = _to_int(v, name)
    elif spec.type == "number":
        v = _to_float(v, name)
    elif spec.type == "string":
        if not isinstance(v, str) or not v:
            raise VocabError(f"'{name}' must be a non-empty text, got {v!r}", name)
        return v
    elif spec.type == "ids":
        return _ids(v, name, "cluster")
    else:  # gmm_remove: a mapping, checked with the kind's other parameters
        return v
    if spec.minimum is not None and v < spec.minimum:
        raise VocabError(f"'{name}' must be >= {spec.minimum:g}, got {v:g}", name)
    if spec.maximum is not None and v > spec.maximum:
        raise VocabError(f"'{name}' must be <= {spec.maximum:g}, got {v:g}", name)
    if spec.exclusive_minimum is not None and not v > spec.exclusive_minimum:
        raise VocabError(f"'{name}' must be > {spec.exclusive_minimum:g}, got {v:g}", name)
    return v


def check_filter(entry: Any) -> tuple[str, dict]:
    """Validate one filter entry `{kind: {params}}` → (kind, params with every default filled in).

    Raises VocabError with a message that names the offending parameter; callers prefix where the
    entry sits (a spec's "run 1, filter 2 (gmm): ..." or a config's "key 'filter.pilots[0]...': ...").
    Parameters marked OPTIONAL stay absent when not given.
    """
    known = ", ".join(FILTERS)
    if not isinstance(entry, dict) or len(entry) != 1:
        raise VocabError(f"each filter is a mapping with one key (one of {known}), got {entry!r}")
    kind, params = next(iter(entry.items()))
    if kind not in FILTERS:
        raise VocabError(f"unknown filter '{kind}' (known: {known})")
    table = FILTERS[kind].params
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise VocabError(f"parameters must be a mapping, got {params!r}")
    unknown = [k for k in params if k not in table]
    if unknown:
        raise VocabError(f"unknown parameter '{unknown[0]}' (known: {', '.join(table)})", unknown[0])
    out: dict = {}
    for name, spec in table.items():
        if name in params and params[name] is not None:
            out[name] = _value(params[name], name, spec)
        elif spec.default is REQUIRED:
            raise VocabError(f"missing required parameter '{name}'", name)
        elif spec.default is not OPTIONAL:
            out[name] = _value(spec.default, name, spec) if spec.type != "gmm_remove" else dict(spec.default)
    if FILTERS[kind].check is not None:
        FILTERS[kind].check(out)
    return kind, out


# ---- the JSON schema -------------------------------------------------------------------------------------
_GMM_REMOVE_SCHEMA = {
    "type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 3,
    "properties": {
        "ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
                "description": "Component ids to remove."},
        "rule": {"enum": list(GMM_RULES),
                 "description": "largest_mean_norm removes the n components with the largest mean ‖z‖ (the "
                                "paper); outlying_mean_norm removes every component whose mean ‖z‖ exceeds "
                                "factor × the median ‖z‖ of all particles (junk of several kinds, without "
                                "knowing how many)."},
        "n": {"type": "integer", "minimum": 1,
              "description": "How many components largest_mean_norm removes (1 when not given)."},
        "factor": {"type": "number", "exclusiveMinimum": 1,
                   "description": "outlying_mean_norm: the multiple of the median ‖z‖ beyond which a "
                                  "component's mean marks it as junk (2 when not given)."},
        "separation": {"type": "number", "minimum": 0,
                       "description": "Either rule removes its components only when their ‖z‖ is separated "
                                      "from the other particles' by Ashman's D >= this (2 when not given; 0 "
                                      "removes them whatever the separation, as the paper's rule)."},
    },
}


def _param_schema(spec: Param) -> dict:
    if spec.type == "gmm_remove":
        s = dict(_GMM_REMOVE_SCHEMA)
    elif spec.choices:
        s = {"enum": list(spec.choices)}
    elif spec.type == "ids":
        s = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    elif spec.type == "string":
        s = {"type": "string", "minLength": 1}
    else:
        s = {"type": spec.type}
    for key, v in (("minimum", spec.minimum), ("maximum", spec.maximum),
                   ("exclusiveMinimum", spec.exclusive_minimum)):
        if v is not None:
            s[key] = v
    if spec.default is not REQUIRED and spec.default is not OPTIONAL:
        s["default"] = spec.default
    s["description"] = spec.description
    return s


def filter_item_schema() -> dict:
    """The JSON-schema fragment of one filter entry (the workflow schema's `$defs.filter_item`)."""
    kinds = {}
    for name, kind in FILTERS.items():
        s: dict = {"type": "object", "additionalProperties": False, "description": kind.description,
                   "properties": {p: _param_schema(spec) for p, spec in kind.params.items()}}
        required = [p for p, spec in kind.params.items() if spec.default is REQUIRED]
        if required:
            s["required"] = required
        kinds[name] = s
    return {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
            "description": f"One filter, as a single key naming its kind ({', '.join(FILTERS)}) whose value "
                           "holds the filter's settings; the same vocabulary as `drgn filter --spec` (see "
                           "`drgn filter --help`).",
            "properties": kinds}
