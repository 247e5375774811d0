"""The one exception type that speaks to users.

Raise `SlimlmError` for anything a user can fix (a wrong path, a bad file, an unknown name): the CLI
prints its message (what was wrong, what was expected, what to do) and exits with code 2, with no
traceback unless `--debug`.
"""


class SlimlmError(Exception):
    """A user-facing error: `str(err)` is a complete, actionable message."""

    def __init__(self, what: str, hint: str | None = None):
        self.what, self.hint = what, hint
        super().__init__(what if hint is None else f"{what}\n{hint}")
