"""One module per `drgn` subcommand; see drgn_core/cli.py for the contract each module follows."""
