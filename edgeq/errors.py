"""The one exception type for user errors.

Raise `EdgeqError` for anything the user can fix (a bad file, an unknown name, an unsupported
combination). The CLI prints its message on one line and exits with code 2. Internal invariants
use `assert`.
"""


class EdgeqError(Exception):
    """A user-facing error: the message names the field, the bad value and what is allowed."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def choice_error(field: str, value: object, allowed) -> EdgeqError:
    """An error for a value outside a known set of choices."""
    allowed = ", ".join(str(a) for a in allowed)
    return EdgeqError(f"{field}: {value!r} is not one of: {allowed}")
