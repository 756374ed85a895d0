"""One exception type for everything a user can fix; the CLI prints its message without a traceback."""


class TunesmithError(Exception):
    """A problem with the user's input (config, data, model reference, run folder) and how to fix it."""
