"""The one error type a user can cause.

Every bad input (file, class list, option) raises `UserError` with a single line that says which
input, what is wrong and what to do. The CLI prints it and exits with code 2; the Python API lets
it propagate. Anything else escaping is a bug in minidiffseg.
"""


class UserError(ValueError):
    """A problem with the user's input: one line, printed without a traceback (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always exactly one line
