"""``edit log``, ``edit revert``, ``edit export`` and ``edit verify``: the ledger."""

from __future__ import annotations

from edit.atomic import check_new_folder
from edit.cli.options import common, head_line, open_workspace, pinned_head, printable
from edit.errors import EditError


def add_parsers(sub) -> None:
    p = sub.add_parser("log", help="list the edits in the workspace")
    common(p)
    p = sub.add_parser("revert", help="undo an edit exactly")
    p.add_argument("id")
    common(p)
    p = sub.add_parser("export", help="write base + edits as a Hugging Face model folder")
    p.add_argument("dir")
    common(p)
    p = sub.add_parser("verify", help="check the ledger: every entry, hash and manifest line")
    p.add_argument(
        "--head", type=pinned_head, help="a ledger head kept earlier: check it is still there"
    )
    p.add_argument(
        "--signed",
        action="store_true",
        help="require the head to be signed by your signing key (the file $EDIT_SIGNING_KEY "
        "names, else ~/.config/edit/signing.key; make one with 'head -c 32 /dev/urandom > "
        "~/.config/edit/signing.key'): with a key, every change signs the head",
    )
    common(p)


def cmd_verify(args) -> int:
    from pathlib import Path

    from edit.api.workspace import check_shapes
    from edit.ledger import read_ledger, read_meta, sign
    from edit.lock import WorkspaceLock

    path = Path(args.workspace)
    key = sign.signing_key()
    meta = read_meta(path)
    if meta is None:
        raise EditError(f"no workspace at {path}: nothing to verify")
    with WorkspaceLock(path).shared():
        ledger = read_ledger(path)
    shapes = check_shapes(ledger, meta["base"]["source"])
    for problem in ledger.problems:
        print(printable(f"problem: {problem}"))  # a name a neighbour chose: escaped
    if ledger.problems:
        n = len(ledger.problems)
        raise EditError(
            f"workspace {path} has {n} problem{'s' * (n != 1)}"
            + (" (listed above)" if n > 1 else "") + f": {ledger.problems[0]}"
        )  # fmt: skip
    if args.head is not None:
        at = ledger.pinned_at(args.head)
        if at is None:
            raise EditError(
                f"workspace {path}: the pinned head sha256:{args.head[:16]}… is nowhere in the "
                f"ledger: it was rewritten since (or the head is another workspace's); restore "
                f"it from a copy you trust"
            )
        later = len(ledger.lines) - at
        print(f"pinned head: found at manifest line {at}; {later} line{'s' * (later != 1)} "
              f"recorded after it")  # fmt: skip
    signature = sign.check(ledger, key)
    if signature is not None and (signature.state in ("damaged", "forged")
                                  or (args.signed and not signature.whole)):  # fmt: skip
        raise EditError(printable(f"workspace {path}: signature: {signature.message}"))
    if args.signed and key is None:
        where = sign.key_path()
        raise EditError(f"workspace {path}: --signed needs a signing key: "
                        + (f"make one with 'head -c 32 /dev/urandom > {where}'" if where else
                           f"{sign.KEY_ENV} is empty, which turns signing off"))  # fmt: skip
    if signature is not None:
        print(printable(f"signature: {signature.message}"))
    base = meta["base"]
    print(printable(f"workspace {path}: ok: base {base['source']} ({base['hash'][:19]}…); "
          f"{len(ledger.lines)} manifest line{'s' * (len(ledger.lines) != 1)}, chained; "
          f"{len(ledger.active)} active and {len(ledger.reverted)} reverted entries, every "
          f"content hash as recorded, every factor finite"
          + ("" if shapes else "; shapes not checked (the base model's config is not at hand: "
             "they are checked when it is loaded)")))  # fmt: skip
    if ledger.repairs or ledger.leftovers:
        print(f"note: an interrupted write left {len(ledger.repairs)} rename(s) to finish and "
              f"{len(ledger.leftovers)} temporary file(s); the next change to the workspace "
              f"completes and removes them")  # fmt: skip
    return 0


def cmd_log(args) -> int:
    from edit.api.workspace import Workspace

    ws = Workspace.inspect(args.workspace)
    entries = ws.entries()
    print(printable(f"workspace {ws.path}: base {ws.base['source']} ({ws.base['hash'][:19]}…)"))
    print(f"ledger head: {ws.head}")
    if (signature := ws.signature()) is not None:
        print(printable(f"signature: {signature.message}"))
    if not entries:
        print("no edits")
    for e in entries:
        print(printable(e.summary()))  # stored text: escaped, as the parsed: line shows it
    reverted = ws.entries("reverted")
    if reverted:
        print(printable(f"({len(reverted)} reverted: {', '.join(e.id for e in reverted)})"))
    return 0


def cmd_revert(args) -> int:
    ws = open_workspace(args, create=False, writer=True, dropping=args.id)
    if args.id.zfill(4) in ws.broken:
        problem = ws.drop(args.id)
        n = len(ws.entries())
        print(f"dropped entry {args.id.zfill(4)}: {problem.split(', or drop')[0]}")
        print(f"the model is now the base plus {n} edit{'s' * (n != 1)}")
        return 0
    entry = ws.revert(args.id)
    print(printable(f"reverted {entry.id}: {entry.summary()}"))
    print(head_line(ws))
    left = ws.entries()
    print(
        f"the model is now the base plus {len(left)} edit{'s' * (len(left) != 1)}; "
        f"the file moved to {ws.path / 'reverted' / entry.path.name}"
    )
    return 0


def cmd_export(args) -> int:
    from edit.api.workspace import check_outside

    check_new_folder(args.dir)  # before loading the model
    check_outside(args.dir, args.workspace)
    ws = open_workspace(args, create=False)
    out = ws.export(args.dir)
    n = len(ws.entries())
    print(
        f"exported {ws.base['source']} + {n} edit{'s' * (n != 1)} to {out} (safetensors; "
        f"load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))"
    )
    return 0


COMMANDS = {"log": cmd_log, "revert": cmd_revert, "export": cmd_export, "verify": cmd_verify}
