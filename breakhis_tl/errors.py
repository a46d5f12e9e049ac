"""One exception type for mistakes a user can fix.

The command line prints its message as one sentence and exits with status 2, so a wrong
path or value never ends in a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the file or value and says what to do."""
