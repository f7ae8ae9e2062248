"""The one exception type for mistakes a user can fix (bad data, bad flags, a missing run)."""


class PotionError(Exception):
    """A problem with the user's input. The command line prints its message as one line and exits with code 2."""
