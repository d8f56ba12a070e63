"""User-facing errors.

Every mistake a user can make (a bad path, a wrong layout, a bad option, a diverging loss) raises a
``SslbenchError`` whose message is one line naming the thing and the fix. The CLI prints it and exits
with code 2; nothing else in the package catches it, so library users see the same message.
"""


class SslbenchError(Exception):
    """A problem with the user's input or run, explained in one line."""


class DataError(SslbenchError):
    """A dataset root is missing, laid out wrongly, or holds a corrupt file."""


class ConfigError(SslbenchError):
    """An option or config value is unknown, of the wrong type, or out of range."""


class TrainingError(SslbenchError):
    """Training went wrong in a way the user must act on (for example a NaN loss)."""
