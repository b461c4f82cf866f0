"""The exception for an unusable checkpoint file: corrupt, truncated, foreign or unsafe."""


class CheckpointError(ValueError):
    """A checkpoint a user pointed at cannot be used; the message names the file and the fix.

    It never suggests loading with `weights_only=False`: a file that needs it can run code.
    """
