"""The compiler: ``compile_model`` and the ``relaxlm`` command line."""

from .compile import compile_model
from .errors import CompileError

__all__ = ["CompileError", "compile_model"]
