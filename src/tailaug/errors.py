"""User-facing errors.

Every problem a user can fix (bad config, missing data, corrupt file) is raised as a
:class:`TailaugError` whose message says what is wrong and how to fix it. The CLI prints
the message alone (no traceback unless ``--debug``) and exits with status 2.
"""


class TailaugError(Exception):
    """An error caused by the user's input, with a message that names the fix."""


class ConfigError(TailaugError):
    """A config file or override that cannot be accepted."""


class DataError(TailaugError):
    """Missing, corrupt or inconsistent data."""


class CheckpointError(TailaugError):
    """A checkpoint or other stage output (cache, stage1.json, ...) that is missing, truncated
    or does not match the run."""
