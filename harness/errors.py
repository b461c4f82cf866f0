"""The one exception type for mistakes a user can fix (bad study file, unreachable server, ...)."""


class UserError(Exception):
    """A mistake the user can fix; the CLI prints its message as one line and exits with 2.

    The message names what is wrong (the file, the key, the record, the address) and what to do.
    """
