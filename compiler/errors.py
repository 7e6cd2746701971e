"""The compiler's exception type."""


class CompileError(Exception):
    """A compile request that cannot be carried out; the message says what to do."""
