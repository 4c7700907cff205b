"""Validation of the workflow configuration, before any job exists.

The Snakefile calls `validate_config` at parse time and `drgn check-config FILE` calls it by hand, so a
typo is reported in seconds, naming the key, instead of after an hour of training (rna-seq-star-deseq2
catches a bad contrast only inside its R script). Two layers:

1. the JSON schema `drgn_core/config.schema.yaml`, shipped as package data (types, ranges, enums,
   `additionalProperties: false` everywhere, a `default` for every optional key, which this module fills in);
2. cross-field rules a schema cannot express: boxes even, pilot box ≤ high-res box ≤ original box,
   filters naming pilots that exist and latent dimensions those pilots have, input files present.

Filters are checked against drgn_core.filter_vocab, the one table of filter kinds that also gives the
schema's `$defs.filter_item` (a test keeps the two equal) and that `drgn filter` validates specs with.

Every problem found is reported in one message, so a user fixes a config in one pass.

The module also turns the `filter:` section into the spec document `drgn filter --spec` reads
(`filter_spec`), so the rule that writes the spec holds no logic of its own.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from drgn_core.errors import InputError
from drgn_core.filter_vocab import VocabError, check_filter

#: The workflow config's schema, shipped inside the package (package data) so that an installed `drgn
#: check-config` finds it; the Snakefile validates against this same file.
SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"

_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "text", "boolean": "true or false",
               "object": "a mapping of keys", "array": "a list", "null": "null"}


# ---- loading ---------------------------------------------------------------------------------------

def load_yaml(path: str | os.PathLike, what: str = "config") -> dict:
    """Read a YAML mapping, turning a missing file or a YAML syntax error into one InputError line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found", path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{where}not valid YAML ({problem})", path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"a {what} file must be a mapping of keys, found {type(data).__name__}", path)
    return data


def load_schema(path: str | os.PathLike | None = None) -> dict:
    """The workflow's config schema (by default the package's own `drgn_core/config.schema.yaml`)."""
    path = Path(path) if path is not None else SCHEMA_PATH
    if not path.is_file():
        raise InputError("config schema not found (the package's drgn_core/config.schema.yaml)",
                         path)
    return load_yaml(path, what="schema")


# ---- schema validation with defaults ----------------------------------------------------------------

def _key(path: Iterable[Any]) -> str:
    """Format a jsonschema path as the user writes it: pilot.train.epochs, filter.pilots[0].zdim."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(error) -> str:
    """One plain sentence for a jsonschema error, naming the key and, for unknown keys, what is allowed."""
    key = _key(error.absolute_path)
    kind, expected, found = error.validator, error.validator_value, error.instance
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(k for k in found if k not in allowed)
        where = f"key '{key}'" if error.absolute_path else "top level"
        return (f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)} (allowed: {', '.join(allowed)})")
    if kind == "type":
        types = expected if isinstance(expected, list) else [expected]
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        hint = ""
        if isinstance(found, str) and "number" in types:
            try:
                float(found)
                hint = " (YAML reads 1e-4 as text: write 1.0e-4)"
            except ValueError:
                pass
        return f"key '{key}': expected {words}, found {_show(found)}{hint}"
    if kind == "enum":
        return f"key '{key}': {_show(found)} is not one of {', '.join(str(v) for v in expected)}"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        rel = {"minimum": "at least", "exclusiveMinimum": "greater than", "maximum": "at most",
               "exclusiveMaximum": "less than"}[kind]
        return f"key '{key}': {_show(found)} is out of range (must be {rel} {expected})"
    if kind == "required":
        missing = [k for k in expected if k not in found]
        return f"key '{key}': missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    if kind in ("minProperties", "maxProperties") and "threshold" in error.schema.get("properties", {}):
        kinds = ", ".join(error.schema["properties"])
        return f"key '{key}': a filter is one key naming its kind ({kinds}), found {_show(sorted(found))}"
    if kind == "minItems":
        return f"key '{key}': needs at least {expected} item{'s' if expected > 1 else ''}"
    if kind == "uniqueItems":
        return f"key '{key}': items must be unique, found {_show(found)}"
    if kind == "pattern":
        return f"key '{key}': {_show(found)} may contain only letters, digits, '_', '.' and '-'"
    if kind == "minLength":
        return f"key '{key}': must not be empty"
    if kind == "anyOf" and any("const" in alt for alt in expected):  # e.g. epochs: a number or 'auto'
        words = [f"'{alt['const']}'" if "const" in alt else
                 _TYPE_WORDS.get(alt.get("type"), str(alt.get("type"))) +
                 (f" >= {alt['minimum']}" if "minimum" in alt else "") for alt in expected]
        return f"key '{key}': expected {' or '.join(words)}, found {_show(found)}"
    return f"key '{key}': {error.message}"


def _validator_with_defaults(schema: dict):
    """A Draft 2020-12 validator that fills each missing optional key with (a copy of) its default.

    Defaults are deep-copied: a shared `default: {}` object would otherwise be filled once and then
    aliased between sections. Objects are filled before they are validated, so nested defaults apply.
    """
    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema_) -> Iterator:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema_)

    cls = validators.extend(Draft202012Validator, {"properties": set_defaults})
    return cls(schema)


def schema_problems(config: dict, schema: dict) -> list[str]:
    """Fill defaults into `config` (in place) and return every schema violation as a sentence."""
    validator = _validator_with_defaults(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    problems: list[str] = []
    for e in errors:
        text = _describe(e)
        if text not in problems:
            problems.append(text)
    return problems


# ---- cross-field rules --------------------------------------------------------------------------------

def original_box(config: dict) -> int | None:
    """D0 when the config alone tells it (simulated data, or an explicit input.box), else None."""
    if config["input"]["mode"] == "simulate":
        return int(config["simulate"]["D"])
    return config["input"]["box"]


ABINIT_POSES = "abinit"


def uses_abinit(config: dict) -> bool:
    """input.poses is `abinit`: the workflow imports the table without poses (drgn import --no-poses), finds
    them with drgn abinit on the pilot stack, and every later stage reads that run's poses.star."""
    return config["input"].get("poses", "") == ABINIT_POSES


def cross_field_problems(config: dict, check_files: bool = True, base: Path | None = None) -> list[str]:
    """Rules between keys (run after the schema passed, so every key exists with the right type)."""
    p: list[str] = []
    inp, sim, pilot, high = config["input"], config["simulate"], config["pilot"], config["highres"]
    mode = inp["mode"]
    d0 = original_box(config)

    for key, value in (("pilot.D", pilot["D"]), ("highres.D", high["D"]),
                       ("simulate.D" if mode == "simulate" else "input.box", d0)):
        if value is not None and value % 2:
            p.append(f"key '{key}': box size {value} must be even")
    if pilot["D"] > high["D"]:
        p.append(f"key 'pilot.D': the pilot box {pilot['D']} is larger than highres.D = {high['D']}")
    if d0 is not None and high["D"] > d0:
        src = "simulate.D" if mode == "simulate" else "input.box"
        p.append(f"key 'highres.D': {high['D']} is larger than the original box {src} = {d0}")

    # input files
    base = base or Path.cwd()
    if mode == "simulate":
        if inp["path"]:
            p.append(f"key 'input.path': must be empty with input.mode simulate (found {inp['path']!r})")
    elif mode == "empiar":
        from drgn_core.fetch.workflow import config_problems

        p.extend(config_problems(config))
    else:
        suffix = {"star": ".star", "cs": ".cs"}[mode]
        if not inp["path"]:
            p.append(f"key 'input.path': input.mode {mode} needs the {suffix} file to import")
        elif not inp["path"].endswith(suffix):
            p.append(f"key 'input.path': input.mode {mode} expects a {suffix} file, found {inp['path']!r}")
        elif check_files and not (base / inp["path"]).is_file():
            p.append(f"key 'input.path': file {inp['path']} does not exist")
    if uses_abinit(config):
        if mode == "simulate":
            p.append("key 'input.poses': abinit needs imported particles (input.mode star, cs or empiar); "
                     "the simulator's poses are known")
        elif mode == "empiar" and any(config["empiar"]["poses"].get(k) for k in ("file", "url")):
            p.append("key 'input.poses': abinit finds the poses, but empiar.poses fetches them; keep one")
    for key in ("poses", "ctf"):
        f = inp.get(key, "")
        if key == "poses" and f == ABINIT_POSES:
            continue
        if f and mode == "simulate":
            p.append(f"key 'input.{key}': must be empty with input.mode simulate (found {f!r})")
        elif f and f.endswith(".pkl") and not inp.get("allow_pickle"):
            p.append(f"key 'input.{key}': {f} is a cryoDRGN pickle; set input.allow_pickle: true to read it")
        elif f and check_files and not (base / f).is_file():
            p.append(f"key 'input.{key}': file {f} does not exist")
    if mode != "empiar" and config.get("empiar", {}).get("accession"):
        p.append(f"key 'empiar.accession': set, but input.mode is {mode} (use input.mode empiar)")
    if check_files and inp["datadir"] and not (base / inp["datadir"]).is_dir():
        p.append(f"key 'input.datadir': folder {inp['datadir']} does not exist")

    # the filter names pilots that exist, and latent dimensions they have
    n = sim["n"] if mode == "simulate" else None
    seen: set[int] = set()
    for i, entry in enumerate(config["filter"]["pilots"]):
        zdim = entry["zdim"]
        key = f"filter.pilots[{i}]"
        if zdim not in pilot["zdims"]:
            p.append(f"key '{key}.zdim': no pilot with zdim {zdim} (pilot.zdims is {pilot['zdims']})")
        if zdim in seen:
            p.append(f"key '{key}.zdim': pilot zdim {zdim} is listed twice; put all its filters in one entry")
        seen.add(zdim)
        for j, item in enumerate(entry["filters"]):
            p.extend(_filter_problems(f"{key}.filters[{j}]", item, zdim, n, check_files, base))

    # sizes that must fit the data
    if n is not None:
        if config["analyze"]["ksample"] >= n:
            p.append(f"key 'analyze.ksample': {config['analyze']['ksample']} clusters for {n} particles")
        bad = [a for a in config["traverse"]["anchors"] if a >= n]
        if bad:
            p.append(f"key 'traverse.anchors': rows {bad} are beyond the {n} simulated particles")
    if len(config["traverse"]["anchors"]) == 1:
        p.append("key 'traverse.anchors': give at least two anchors, or none to use k-means centres")
    return p


def _filter_problems(key: str, item: dict, zdim: int, n: int | None, check_files: bool = False,
                     base: Path | None = None) -> list[str]:
    """One filter against the vocabulary table (drgn_core.filter_vocab, the rules `drgn filter` applies),
    then against its pilot's latent dimension, the dataset size when known, and the files it reads."""
    kind = next(iter(item))
    try:
        kind, opts = check_filter(item)
    except VocabError as e:
        return [f"key '{key}.{kind}{'.' + e.param if e.param else ''}': {e}"]
    p = []
    if kind == "threshold" and opts["dim"] >= zdim:
        p.append(f"key '{key}.threshold.dim': {opts['dim']} is not a dimension of a zdim {zdim} latent "
                 f"(0..{zdim - 1})")
    if kind == "box" and zdim < 2 and any(e in opts for e in ("ymin", "ymax")):
        p.append(f"key '{key}.box': a zdim 1 pilot has no y axis (PC2); bound x only")
    if kind == "gmm" and n is not None and opts["components"] >= n:
        p.append(f"key '{key}.gmm.components': {opts['components']} components for {n} particles")
    if kind == "selection" and check_files and not ((base or Path.cwd()) / opts["path"]).is_file():
        p.append(f"key '{key}.selection.path': file {opts['path']} does not exist")
    return p


# ---- entry points ---------------------------------------------------------------------------------------

def validate_config(config: dict, schema_path: str | os.PathLike | None = None,
                    source: str | os.PathLike | None = None, check_files: bool = True,
                    base: str | os.PathLike | None = None) -> dict:
    """Validate a workflow config and fill its defaults, in place; raise one InputError listing every problem.

    `source` names the config file in the message; `base` is the folder relative input paths are read
    from (the workflow's working directory). Returns the same (now complete) dict.
    """
    schema = load_schema(schema_path)
    problems = schema_problems(config, schema)
    if not problems:
        problems = cross_field_problems(config, check_files=check_files,
                                        base=Path(base) if base is not None else None)
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        plural = "s" if len(problems) > 1 else ""
        raise InputError(f"{len(problems)} problem{plural} in the workflow config: {shown}", source)
    return config


def check_config_file(path: str | os.PathLike, schema_path: str | os.PathLike | None = None,
                      check_files: bool = True) -> dict:
    """Load and validate a config file; relative input paths are read from the current folder."""
    config = load_yaml(path)
    return validate_config(config, schema_path=schema_path, source=path, check_files=check_files)


def filter_spec(config: dict, run_dir: str = "{results}/pilot/z{zdim}") -> dict:
    """The `drgn filter --spec` document for a validated config: which filters read which pilot run.

    `filter.combine` joins the filters of one pilot and the pilots alike (the paper: a particle is kept
    only if no filter of any pilot removes it). `run_dir` is formatted with `results` and `zdim` to give
    each pilot's run folder.
    """
    how = config["filter"]["combine"]
    runs = []
    for entry in config["filter"]["pilots"]:
        runs.append({"run": run_dir.format(results=config["results"], zdim=entry["zdim"]),
                     "combine": how, "filters": copy.deepcopy(entry["filters"])})
    return {"combine": how, "runs": runs}
