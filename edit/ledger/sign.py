"""Signed heads: the ledger's head authenticated with a key that only its signer holds.

The hash chain catches damage and hand edits, not a forger who rewrites an entry and
recomputes every hash after it; a head the user kept (``edit verify --head``) catches that
too, if it was kept where the forger cannot reach. A signature keeps it in the workspace:
where the user has a signing key, every change also writes ``signature.json``, the head and
HMAC-SHA256(key, head), and ``edit verify`` checks it with the same key. Without the key no
one can sign a rewritten ledger; someone without it can still record a change (the
signature then covers an earlier head, and verify says how many lines came after it) or
delete the file (the workspace is then unsigned: ``edit verify --signed`` refuses both).

The key is the file ``$EDIT_SIGNING_KEY`` names, else ``signing.key`` in the user's
configuration folder (``$XDG_CONFIG_HOME/edit/``, by default ``~/.config/edit/``), at least
16 bytes; ``EDIT_SIGNING_KEY=`` (empty) turns signing off. Make one with::

    mkdir -p ~/.config/edit && head -c 32 /dev/urandom > ~/.config/edit/signing.key
    chmod 600 ~/.config/edit/signing.key
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from edit.atomic import write_json
from edit.errors import EditError
from edit.ledger.read import Ledger

SIGNATURE = "signature.json"
KEY_ENV = "EDIT_SIGNING_KEY"
MIN_KEY_BYTES = 16
_HEAD = re.compile(r"sha256:[0-9a-f]{64}")


def key_path() -> Path | None:
    """Where the signing key is looked for; None: signing turned off (``EDIT_SIGNING_KEY=``)."""
    named = os.environ.get(KEY_ENV)
    if named is not None:
        return Path(named).expanduser() if named else None
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "edit" / "signing.key"


def signing_key() -> bytes | None:
    """The user's signing key; None where there is none (changes are then not signed). A key
    that ``EDIT_SIGNING_KEY`` names but cannot be read, or one too short, is refused in one
    line: read before any work, so a change is never half signed."""
    path = key_path()
    if path is None:
        return None
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        if os.environ.get(KEY_ENV):
            raise EditError(
                f"{KEY_ENV} names {path}, which does not exist: make the key (see "
                f"'edit verify --help') or set {KEY_ENV}= to sign nothing"
            ) from None
        return None
    except OSError as e:
        raise EditError(f"cannot read the signing key {path}: {e.strerror or e}") from None
    if len(key) < MIN_KEY_BYTES:
        raise EditError(
            f"the signing key {path} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}: make "
            f"a new one with 'head -c 32 /dev/urandom > {path}'"
        )
    return key


def key_id(key: bytes) -> str:
    """A name for ``key`` that tells keys apart without revealing them."""
    return hmac.new(key, b"edit signing key id", hashlib.sha256).hexdigest()[:16]


def _mac(key: bytes, head: str) -> str:
    return "hmac-sha256:" + hmac.new(key, f"edit ledger head {head}".encode(),
                                     hashlib.sha256).hexdigest()  # fmt: skip


def sign(ledger: Ledger, key: bytes | None) -> Ledger:
    """Write ``signature.json`` for the ledger's head (nothing without a key); the ledger."""
    if key is not None:
        head = ledger.head
        signed = {"head": head, "key": key_id(key), "hmac": _mac(key, head)}
        write_json(ledger.path / SIGNATURE, signed)
    return ledger


@dataclass(frozen=True)
class Signature:
    """What ``signature.json`` says of a ledger, checked with the user's key."""

    # "signed": by this key, over the current head; "behind": over an earlier head, lines
    # recorded after it without the key; "unsigned": no signature (a key here); "other key",
    # "no key": signed, not checkable here; "damaged": unreadable or a link; "forged": it
    # contradicts the key (written without it) or the ledger (rewritten after signing)
    state: str
    message: str  # one line: what was found, and what to do where something is wrong

    @property
    def whole(self) -> bool:
        return self.state == "signed"


def check(ledger: Ledger, key: bytes | None) -> Signature | None:
    """Check the ledger's ``signature.json`` with ``key`` (the user's, or None); None where
    signing is not in use (no signature and no key)."""
    path = ledger.path / SIGNATURE
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return Signature("damaged", f"{path} is a symbolic link: a workspace holds plain "
                             f"files; restore the workspace from a copy you trust")  # fmt: skip
        found = json.loads(path.read_bytes())
        head, signer, mac = found["head"], found["key"], found["hmac"]
        if not all(isinstance(v, str) for v in (head, signer, mac)):
            raise TypeError
    except FileNotFoundError:
        return Signature("unsigned", "not signed") if key else None
    except (OSError, ValueError, KeyError, TypeError):
        return Signature("damaged", f"{path} is damaged: it cannot be checked; restore the "
                         f"workspace from a copy you trust")  # fmt: skip
    # text a neighbour may have chosen: shown as written only where it is what we write
    signer = signer if signer.isalnum() else repr(signer)
    shown = head[:19] if _HEAD.fullmatch(head) else repr(head[:19])
    if key is None:
        return Signature("no key", f"signed by key {signer}, and there is no signing key "
                         f"here to check it ({KEY_ENV} names one)")  # fmt: skip
    if signer != key_id(key):
        return Signature("other key", f"signed by key {signer}, not by this key "
                         f"({key_id(key)}): it cannot be checked here")  # fmt: skip
    if not hmac.compare_digest(mac, _mac(key, head)):
        return Signature("forged", f"{path} does not match its head: it was written without "
                         f"the key; restore the workspace from a copy you trust")  # fmt: skip
    at = ledger.pinned_at(head)
    if at is None:
        return Signature("forged", f"the signed head {shown}… is nowhere in the ledger: "
                         f"it was rewritten after it was signed; restore it from a copy you "
                         f"trust")  # fmt: skip
    later = len(ledger.lines) - at
    if later == 0:
        return Signature("signed", f"signed by key {signer}: the head is the signed one")
    return Signature("behind", f"signed by key {signer} at manifest line {at}; {later} "
                     f"line{'s' * (later != 1)} recorded after it without the key")  # fmt: skip


def check_before_signing(ledger: Ledger, key: bytes | None) -> None:
    """Refuse to sign on top of a forged signature (a change made with the key would bless
    the rewritten ledger); lines recorded without the key are signed with the change."""
    if key is None:
        return
    found = check(ledger, key)
    if found is not None and found.state == "forged":
        raise EditError(f"workspace {ledger.path}: signature: {found.message}; nothing was "
                        f"recorded")  # fmt: skip
