"""What every command shares: option types that refuse bad values in one line, the common
options (workspace, model, device), the edit options, ``--set`` and ``--layer`` as method
settings, and opening the workspace."""

from __future__ import annotations

import argparse
import math
import os

from edit import distributed
from edit.errors import EditError

MAX_PROMPT_CHARS = 4000


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped as ``repr`` writes it
    (``\\x1b``, ``\\n``), as the ``parsed:`` line shows a fact: text from a file, a ledger or
    an error never moves the reader's terminal, and a line stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def head_line(ws) -> str:
    """The ledger's head after a change, to keep for ``edit verify --head``, and whether the
    change signed it (``edit.ledger.sign``)."""
    signature = ws.signature()
    signed = f"{signature.message}; " if signature is not None and signature.whole else ""
    return f"ledger head: {ws.head} ({signed}keep it: 'edit verify --head HASH' checks it later)"


def pinned_head(text: str) -> str:
    """An argparse type: a ledger head, ``sha256:`` and hex digits (at least 12)."""
    digits = text.strip().lower().removeprefix("sha256:")
    if not 12 <= len(digits) <= 64 or any(c not in "0123456789abcdef" for c in digits):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ledger head: give the 'sha256:...' hash that 'edit log' prints"
        )
    return digits


class UsageError(EditError):
    """A command line that argparse cannot read."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other refusal
    (its default prints the usage block and exits on its own)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in lo..hi."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    return parse


def number(positive: bool):
    """An argparse type: a finite float, > 0 (``positive``) or >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}"
            )
        return value

    return parse


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workspace",
        "-w",
        default=os.environ.get("EDIT_WORKSPACE", "edit-workspace"),
        help="ledger folder (default: $EDIT_WORKSPACE or ./edit-workspace)",
    )
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="HF id, model folder or .gguf file (default: the workspace's base model, "
        "else the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument(
        "--device-map",
        default=None,
        type=device_map,
        help="accelerate's layer placement: auto (GPUs, then CPU memory, then disk), "
        "balanced, sequential, or JSON {module: device} (default: auto on CUDA)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="log what happens inside")


def device_map(text: str) -> str | dict:
    if not text.lstrip().startswith("{"):
        return text
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object {module: device}")
    return value


def edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "statement",
        nargs="?",
        help="e.g. 'Paris is capital of Italy' or '[Paris] is capital of [Italy]'",
    )
    p.add_argument(
        "--file",
        help="many facts in one batch: JSON Lines of {'statement': ...} or "
        "{'prompt', 'subject', 'target'} (or a CounterFact / zsRE file)",
    )
    p.add_argument("--subject", help="the subject, if the parse guesses wrong")
    p.add_argument("--target", help="the object at the end of the statement")
    p.add_argument(
        "--method",
        default=None,
        help="rome, memit or alphaedit (default: rome for one fact, and for --file where "
        "rome's tuned config adds neurons, as the default model's does; else memit on an "
        "empty workspace, alphaedit on one with edits)",
    )
    p.add_argument(
        "--layer",
        default=None,
        help="block(s) to edit: 4 (rome), 4,5,6 or 4-8 (memit, alphaedit); default: tuned config",
    )
    p.add_argument("--steps", type=int_in(1, 100_000), default=None, help="max optimization steps")
    stats_arg(p)
    set_arg(p)


def stats_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stats-corpus",
        default=None,
        help="text for the key statistics: a .txt, .jsonl or .parquet file ('text' column) or "
        "a datasets name NAME[:CONFIG[:SPLIT]] (default: the shipped WikiText-2)",
    )


def stats_setting(args) -> dict:
    """``--stats-corpus`` as the method's setting, checked before the model is loaded."""
    if getattr(args, "stats_corpus", None) is None:
        return {}
    from edit.readers.text import text_source

    text_source(args.stats_corpus)  # a missing file: one line, now
    return {"stats_corpus": args.stats_corpus}


def set_arg(p: argparse.ArgumentParser, what: str = "a setting of the method's config, e.g. "
             "stop_most_probable=true or cov_weight=2000") -> None:  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"{what} (repeatable)"
    )


def layer_settings(text: str | None, batch: bool) -> dict:
    """``--layer`` as the method's setting: ``layer=4`` (ROME) or ``layers=(4, 5, 6)``."""
    if text is None:
        return {}
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            if not 0 <= lo <= hi < lo + 1000:
                raise ValueError
            layers = tuple(range(lo, hi + 1))
        else:
            layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise EditError(
            f"--layer {text!r}: give a block index (4), a list (4,5,6) or a range (4-8)"
        ) from None
    if not batch:
        if len(layers) != 1:
            raise EditError(f"--layer {text!r}: this method edits one layer; give one index")
        return {"layer": layers[0]}
    return {"layers": layers}


def check_layers_fit(layers: dict, source: str | None) -> None:
    """``--layer`` (as :func:`layer_settings` gave it) against the depth of the model
    ``source`` names (None: the default model), read from its config alone, before any
    weights load; where the config is not at hand without a download or a dequantization,
    the method checks it once the model is loaded."""
    wanted = layers.get("layers") or ([layers["layer"]] if "layer" in layers else [])
    if not wanted or not all(isinstance(i, int) for i in wanted):
        return  # nothing asked, or a value the method's settings check refuses
    from edit import arch
    from edit.models import DEFAULT_MODEL, skeleton

    model = skeleton(source or DEFAULT_MODEL)
    try:
        n = arch.num_layers(model) if model is not None else None
    except Exception:  # an architecture the table does not know: refused at loading
        n = None
    if n is not None and max(wanted) >= n:
        raise EditError(
            f"--layer {max(wanted)}: this model has {n} layers: give indices in 0..{n - 1}"
        )


def open_workspace(args, create: bool = True, writer: bool = False, dropping: str | None = None):
    """The workspace with its model; a writer holds the workspace's lock until it exits (in
    data-parallel runs the main process, which alone writes)."""
    from edit.api.workspace import Workspace

    ws = Workspace.open(args.workspace, model_name=args.model, create=create,
                        exclusive=writer and distributed.is_main(), dropping=dropping,
                        device=args.device, dtype=args.dtype,
                        device_map=args.device_map)  # fmt: skip
    args.cleanup.callback(ws.close)
    return ws


def base_model_line(ws) -> str:
    dtype = str(ws.model.dtype).removeprefix("torch.")
    line = f"model: {ws.base['source']} ({ws.base['hash'][:19]}…) on {ws.model.device}/{dtype}"
    return printable(line)  # the source as workspace.json spells it
