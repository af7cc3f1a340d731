"""User-facing errors.

Every problem a user can cause (bad input, a missing file, an unknown method) raises an
`EditError` whose message is one line naming the problem and what to do. The CLI prints that
line and exits non-zero; anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class EditError(Exception):
    """A problem with the user's input or environment, described in one line."""


class InvalidRequest(EditError, ValueError):
    """A fact, statement or config that cannot be used as given."""


class EditFailed(EditError):
    """The method produced an update that is not finite or did not take; nothing was changed."""
