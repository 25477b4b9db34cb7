"""`tandem` command line: one subcommand module per concern, imported lazily.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` on them. Lazy import keeps `tandem plan` free of torch and Ray.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "tandem.deploy.cmd_models",
    "tandem.deploy.cmd_placement",
    "tandem.deploy.cmd_serve",
    "tandem.deploy.cmd_profile",
    "tandem.deploy.cmd_demo",
    "tandem.deploy.cmd_bench",
)


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command module not written yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tandem plan ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    # Re-import so CommandError raised by subcommands is the class main() catches.
    from tandem.deploy.cli import main as _main

    sys.exit(_main())
