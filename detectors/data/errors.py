"""The exception for bad datasets: a missing image, a malformed annotation file or record."""


class DatasetError(ValueError):
    """A dataset a user pointed at is unusable; the message names the file (and record) and the fix."""
