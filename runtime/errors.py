"""The runtime's exception for requests a loaded model cannot serve."""


class GenerationError(Exception):
    """A request the loaded model cannot serve (too long, bad token); the message says why."""
