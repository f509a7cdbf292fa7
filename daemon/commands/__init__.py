"""One module per `gitlora` subcommand; each exposes `add_parser(subparsers)` and `run(args) -> int`."""


class CommandFailed(Exception):
    """Already explained to the user on stderr; carries the exit code. (Here, not in common.py, so that the
    CLI can catch it without importing the socket and logging stack before it picks a subcommand.)"""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
