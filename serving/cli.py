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
import os
import sys
from collections.abc import Callable, Sequence

# Exit status after the reader of stdout went away (`polytask predict ... | head -1`): 128 +
# SIGPIPE, as a shell reports a command killed by it (130 = 128 + SIGINT for Ctrl-C).
EXIT_BROKEN_PIPE = 141


def bounded_int(
    low: int, high: int | None = None, what: str = "an integer"
) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if number < low or (high is not None and number > high):
            bounds = f">= {low}" if high is None else f"{low}-{high}"
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {number}")
        return number

    return parse


positive_int = bounded_int(1)
# 0, "any free port", is refused: the log and the clients would not know which port was taken.
port_number = bounded_int(1, 65535, "a port number")


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone: poll reports an error or
    a hang-up on it. True where poll is missing (not Unix); False for a stdout without a file
    descriptor (a test's StringIO), whose writes raise no BrokenPipeError."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def quiet_broken_pipe(err: BrokenPipeError) -> int:
    """After BrokenPipeError on stdout (`... | head -1`): point stdout at /dev/null, so that
    the interpreter's final flush does not fail again, and return EXIT_BROKEN_PIPE. A broken
    pipe that is not stdout's (a subprocess, a connection) is raised again, not hidden."""
    if not _stdout_reader_gone():
        raise err
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`serve`'s options (also what `polytask serve` can take)."""
    parser.add_argument("--model", help="model tag to pin (default: promoted, else latest)")
    parser.add_argument(
        "--port", type=port_number, default=3000, help="HTTP port, 1-65535 (default 3000)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1, this machine only; 0.0.0.0 for every "
        "interface, e.g. in a container: set POLYTASK_API_KEYS before exposing the service)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        help="model worker processes (default 1; a warning above the CPU count, refused above "
        "4 per CPU)",
    )
    parser.add_argument(
        "--api-workers", type=positive_int, help="HTTP worker processes (default 1)"
    )


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
            sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's exit
    except ValueError as err:  # no model in the store, a bad setting: the message names it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError as err:  # `... | head -1`: the reader has what it wanted
        return quiet_broken_pipe(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
