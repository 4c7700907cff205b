"""`drgn check-config`: validate a workflow config file before running the workflow."""

from __future__ import annotations

import argparse

HELP = "validate a workflow config (schema and cross-field checks)"
DESCRIPTION = """\
Check a drgnflow workflow config against the workflow's schema (types, ranges, allowed keys) and the
rules between keys (boxes even, pilot box <= high-res box <= original box, filters that name existing
pilots, input files present). Every problem is listed in one message naming its key; exit status 0 when
the config is valid, 2 otherwise. The workflow runs the same checks before any job starts.

Example:
  drgn check-config config/config.yaml
  drgn check-config my_run.yaml --print-defaults > my_run.full.yaml
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="workflow config file (YAML)")
    parser.add_argument("--schema", default=None,
                        help="schema file (default: the package's own drgn_core/config.schema.yaml)")
    parser.add_argument("--no-file-checks", action="store_true",
                        help="skip checking that input files exist (e.g. when validating on another machine)")
    parser.add_argument("--print-defaults", action="store_true",
                        help="print the complete config, with every default filled in, as YAML")


def run(args: argparse.Namespace) -> int:
    import yaml

    from drgn_core.config_check import check_config_file

    config = check_config_file(args.config, schema_path=args.schema, check_files=not args.no_file_checks)
    if args.print_defaults:
        print(yaml.safe_dump(config, sort_keys=False), end="")
    else:
        inp = config["input"]
        source = ("simulated" if inp["mode"] == "simulate"
                  else f"empiar {config['empiar']['accession']}" if inp["mode"] == "empiar"
                  else f"{inp['mode']} {inp['path']}")
        pilot, high = config["pilot"], config["highres"]
        zdims = ", ".join(str(z) for z in pilot["zdims"])
        print(f"{args.config}: valid ({source}; pilots zdim {zdims} at D={pilot['D']}; "
              f"high-res zdim {high['zdim']} at D={high['D']})")
    return 0
