"""The compiler: ``compile_model`` and the ``relaxlm`` command line."""

from .compile import CompileError, compile_model

__all__ = ["CompileError", "compile_model"]
