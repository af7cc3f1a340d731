"""The ``edit`` command line: a thin shell over the Python API.

edit add "Paris is capital of Italy"
edit ask "Paris is the capital of"
edit erase "The Eiffel Tower is located in Paris"
edit log | edit revert 0001 | edit export merged/ | edit verify

Every refusal is one ``error: ...`` line on stderr and exit status 2, and nothing is
written: option values are checked before any model is loaded or any file is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from edit import distributed
from edit.cli import corpora, edits, ledger, measure
from edit.cli.options import Parser, UsageError, printable
from edit.errors import EditError

_GROUPS = (edits, measure, corpora, ledger)  # in the order ``edit --help`` lists them
COMMANDS = {name: cmd for group in _GROUPS for name, cmd in group.COMMANDS.items()}


def build_parser():
    parser = Parser(prog="edit", description="Change what a language model knows.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in _GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 2
    _quiet_libraries(args.verbose)
    try:
        distributed.check_launch()  # a launch this machine cannot serve: one line, now
        if distributed.launched():  # accelerate launch: one process per device
            device = distributed.init()
            if args.device is None:
                args.device = str(device)
            if not distributed.is_main():
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115  one report, from the main one
        with contextlib.ExitStack() as args.cleanup:  # closes the workspaces opened
            return COMMANDS[args.command](args)
    except EditError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was recorded", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not the user's input: one line, the traceback on request
        if args.verbose:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"error: unexpected {type(e).__name__}: {printable(first)} (this is a bug in edit; "
              f"run again with --verbose for the traceback)", file=sys.stderr)  # fmt: skip
        return 2


def _quiet_libraries(verbose: bool) -> None:
    """What this library does (statistics collected, config used) is reported on stdout;
    its warnings, and other libraries' chatter (Hub retries, deprecations) only with
    --verbose, so that a refusal is the one line on stderr."""
    to_stdout = logging.StreamHandler(sys.stdout)
    to_stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    for h in (to_stdout, to_stderr):
        h.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("edit")
    ours.handlers = [to_stdout, to_stderr]
    ours.propagate = False
    ours.setLevel(logging.INFO)
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(message)s")
    if verbose:
        return
    warnings.simplefilter("ignore")
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
