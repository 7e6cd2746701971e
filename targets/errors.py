"""The one exception of the targets boundary."""


class TargetError(Exception):
    """A target name that cannot be built here; the message says what to do instead."""
