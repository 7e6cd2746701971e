"""The compiler: ``compile_model`` and the ``relaxlm`` command line."""

from .errors import CompileError


def __getattr__(name: str):
    # compile_model imports TVM's compiler; the command line imports this package for every
    # command, and a run-side command should not pay for (or need) the compiler.
    if name == "compile_model":
        from .compile import compile_model

        return compile_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CompileError", "compile_model"]
