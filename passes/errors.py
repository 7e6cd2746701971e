"""The error the passes raise: a quantization or pass request that cannot be honoured."""


class PassError(Exception):
    """A pass-level problem with a message the user can act on."""
