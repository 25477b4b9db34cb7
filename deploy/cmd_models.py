"""`tandem models prepare NAME [--force]` and `tandem models list`."""
from __future__ import annotations

import argparse
import sys
import time

from tandem.deploy.cli import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `models` command group to the top-level parser."""
    models = subparsers.add_parser("models", help="prepare and list servable models")
    actions = models.add_subparsers(dest="models_command", required=True)

    prepare = actions.add_parser(
        "prepare", help="convert a known model into a local HF directory (once) and print its path")
    prepare.add_argument("name", help="known model name, e.g. smollm2")
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prepare.set_defaults(func=_prepare)

    listing = actions.add_parser("list", help="known models and where they are prepared")
    listing.set_defaults(func=_list)


def _prepare(args: argparse.Namespace) -> int:
    from tandem.engine.prepare import prepare_model

    start = time.monotonic()
    try:
        path = prepare_model(args.name, force=args.force)
    except FileNotFoundError as exc:  # unknown name, or the package carrying the weights is missing
        raise CommandError(str(exc)) from None
    except ImportError as exc:  # conversion needs the optional converters
        raise CommandError(f"{exc}; install the converters with: pip install 'tandem[models]'") from None
    elapsed = time.monotonic() - start
    if elapsed > 1.0:  # only worth saying when work was done; stdout stays just the path
        print(f"prepared {args.name} in {elapsed:.1f} s", file=sys.stderr)
    print(path)
    return 0


def _list(args: argparse.Namespace) -> int:
    from tandem.engine.prepare import list_models

    for model, path, prepared in list_models():
        state = str(path) if prepared else f"not prepared (run: tandem models prepare {model.name})"
        print(f"{model.name:<10} {state}\n{'':<10} {model.description}")
    return 0
