"""Exceptions for failures a user can fix; the command-line tools print them as one line."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model being built."""
