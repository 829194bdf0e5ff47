"""`polytask-serving`: `serve` and `predict` without the training code (the serve image's command).

The serve image holds `serving/` only, so `polytask` (pipeline/cli.py, which imports the
training pipeline) cannot start there; this entry point parses the same arguments and calls
the same functions in `serving/commands.py`. Outside the image, `polytask serve|predict` and
`polytask-serving serve|predict` are interchangeable.

    polytask-serving serve --host 0.0.0.0 --port 3000   # in a container: every interface
    polytask-serving predict "some text" "another text"  # from the model store, no server
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`serve`'s options (also what `polytask serve` can take)."""
    parser.add_argument("--model", help="model tag to pin (default: promoted, else latest)")
    parser.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1, this machine only; 0.0.0.0 for every "
        "interface, e.g. in a container: set POLYTASK_API_KEYS before exposing the service)",
    )
    parser.add_argument("--workers", type=int, help="model worker processes (default 1)")
    parser.add_argument("--api-workers", type=int, help="HTTP worker processes (default 1)")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """`predict`'s arguments (also what `polytask predict` can take)."""
    parser.add_argument("texts", nargs="+", help="texts to classify")
    parser.add_argument("--model", help="model tag (default: promoted, else latest)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polytask-serving",
        description="Serve or query a polytask model from the BentoML model store "
        "($BENTOML_HOME), without torch or training code.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(
        sub.add_parser("serve", help="serve the model over HTTP (BentoML): POST /predict")
    )
    add_predict_arguments(
        sub.add_parser("predict", help="every task's answer for some texts, from the model store")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Deferred: `--help` answers without importing BentoML.
    from serving import commands

    try:
        if args.command == "serve":
            commands.serve(
                model=args.model,
                port=args.port,
                host=args.host,
                workers=args.workers,
                api_workers=args.api_workers,
            )
        else:
            prediction = commands.predict_local(args.texts, model=args.model)
            print(commands.format_prediction(args.texts, prediction))
    except ValueError as err:  # no model in the store, a bad setting: the message names it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
