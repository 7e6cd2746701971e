"""The error a frontend raises: the model given cannot be read or is not supported."""


class FrontendError(Exception):
    """A model source or config that relaxlm cannot turn into a module; the message says what to do."""
