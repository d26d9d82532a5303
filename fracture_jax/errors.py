"""The one exception type the command line turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix (a missing folder, a bad file, a wrong name); says how."""
