"""User-facing errors: the CLI prints the message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Something the user can fix: a missing file, a wrong folder, a bad flag value."""
