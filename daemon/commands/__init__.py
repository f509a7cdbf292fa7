"""One module per `gitlora` subcommand; each exposes `add_parser(subparsers)` and `run(args) -> int`."""
