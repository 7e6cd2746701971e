"""Where the time of a decode step goes: each kind of kernel, attention, and what is left.

TVM 0.27's Relax VM has no profiler, and timing each call from its Python instrument hook costs
microseconds per call and wakes TVM's thread pool late (a parallel kernel measured so takes 25 us
longer than it does). So one decode step is recorded through the hook, every kernel and attention
call with its arguments, and then each kind is replayed on its own: all its calls of the step in
order, so that the weights stream from memory as they do in decode, not from a cache warmed by one
call repeated. Attention is replayed inside a forward of its own over the same sequence, where it
writes the same keys and values to the same new slot each time. What the replays do not explain
is the VM and the runtime: dispatch, allocation, shape checks, the Python around a step, the copy
of the logits, and the thread pool's waits between kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections import defaultdict
from typing import Callable

import numpy as np

from .bench import BenchError
from .model import Model

# Kernel kinds by what a name produced by the compiler says; the first match wins (a fused
# dequantize-matmul is a matmul, a fused split-rope a rope).
_KINDS = (("matmul", "matmul"), ("attention", "attention"), ("norm", "norm"), ("rope", "rope"),
          ("activation", "silu"), ("activation", "gelu"), ("activation", "vector_math"), ("embedding", "take"),
          ("embedding", "dequantize"))
# The KV cache's calls that attend (the others only look up bookkeeping, in the overhead).
_ATTENTION_CALL = "vm.builtin.attention_kv_cache_"
_BOOKKEEPING = "get_query_positions"
OVERHEAD = "VM and runtime"
# Untimed decode steps before the timed ones.
_WARM_UP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class ProfileRow:
    kind: str
    calls: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class DecodeProfile:
    """Seconds per decode token: the whole step and its parts (the parts sum to the step)."""

    step_seconds: float
    rows: list[ProfileRow]
    context: int


@dataclasses.dataclass
class _Call:
    kind: str
    func: Callable
    args: tuple


def kind_of(symbol: str, args: tuple, vocab_size: int) -> str:
    """The kind of one VM call; a matmul is told apart by its shape (the logits by their width)."""
    for kind, word in _KINDS:
        if word in symbol:
            if kind == "matmul":
                out, inp = args[-1].shape[-1], _activation_width(args)
                return "logits matmul" if out == vocab_size else f"matmul {out}x{inp}"
            return kind
    return "other kernels"


def _activation_width(args: tuple) -> int:
    """The reduction width of a GEMV: its activation is its first (batch, rows, width) float32 input."""
    floats = [a for a in args[:-1] if hasattr(a, "dtype") and str(a.dtype) == "float32" and len(a.shape) == 3]
    return floats[0].shape[-1] if floats else 0


def profile_decode(model: Model, context: int = 128, steps: int = 16, repeats: int = 5) -> DecodeProfile:
    """Profile decode after ``context`` random tokens (see the module docstring)."""
    check_can_profile(model, context, steps, repeats)
    seq = model.new_sequence()
    try:
        token = int(seq.prefill(np.random.default_rng(0).integers(0, model.vocab_size, context).tolist()).argmax())

        def decode_steps(n: int) -> float:
            nonlocal token
            start = time.perf_counter()
            for _ in range(n):
                token = int(seq.decode(token).argmax())
            return (time.perf_counter() - start) / n

        decode_steps(_WARM_UP_STEPS)
        step = statistics.median(decode_steps(steps) for _ in range(repeats))
        calls = _record(model, lambda: decode_steps(1))
        by_kind = defaultdict(list)
        for call in calls:
            by_kind[call.kind].append(call)
        rows = [ProfileRow(kind, len(kind_calls), _replay(model, seq, kind_calls, repeats))
                for kind, kind_calls in by_kind.items()]
    finally:
        seq.close()
    rows.sort(key=lambda r: -r.seconds)
    rows.append(ProfileRow(OVERHEAD, 0, step - sum(r.seconds for r in rows)))
    return DecodeProfile(step, rows, context)


def check_can_profile(model: Model, context: int, steps: int = 16, repeats: int = 5) -> None:
    """Raise BenchError unless :func:`profile_decode` can run on ``model`` as asked."""
    if model.manifest.device != "cpu":
        raise BenchError(f"--profile times CPU kernels; {model.path} runs on {model.manifest.device}")
    needed = context + _tokens_decoded(steps, repeats)
    if needed > model.context_window:
        raise BenchError(f"the profile needs {needed} tokens of context, more than the model's {model.context_window}; "
                         "lower the depth or the prompt length")


def _tokens_decoded(steps: int, repeats: int) -> int:
    """The tokens a profile appends after its context: warm-up, timed steps, the recorded step and
    attention's replay."""
    return _WARM_UP_STEPS + steps * repeats + 1 + 1


def _record(model: Model, decode_step: Callable[[], float]) -> list[_Call]:
    """The kernels and attention calls of one decode step, with their arguments. (The VM's other
    builtins, allocation and shape bookkeeping, stay in the overhead.)"""
    calls: list[_Call] = []

    def hook(func, symbol, before, _ret, *args):
        attends = symbol.startswith(_ATTENTION_CALL) and _BOOKKEEPING not in symbol
        if before and (attends or not symbol.startswith("vm.builtin.")):
            calls.append(_Call(kind_of(symbol, args, model.vocab_size), func, args))
        return 0

    model.vm.set_instrument(hook)
    try:
        decode_step()
    finally:
        model.vm.set_instrument(None)
    return calls


def _replay(model: Model, seq, calls: list[_Call], repeats: int) -> float:
    """The median seconds of running ``calls`` once each, in order. Attention runs inside a
    forward that appends one token to ``seq``; every repeat writes the same slot."""
    times = []
    with model.forward([seq], [1]) if calls[0].kind == "attention" else contextlib.nullcontext():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for call in calls:
                call.func(*call.args)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def format_profile(profile: DecodeProfile) -> str:
    """The profile as a table: ms per token, calls per token and share of the step for each part."""
    lines = [f"decode step after {profile.context} tokens: {profile.step_seconds * 1e3:.2f} ms "
             f"({1 / profile.step_seconds:.1f} tok/s)",
             f"{'part':<24} {'ms/token':>9} {'calls':>6} {'share':>6}"]
    for row in profile.rows:
        calls = str(row.calls) if row.calls else ""
        lines.append(f"{row.kind:<24} {row.seconds * 1e3:>9.3f} {calls:>6} {row.seconds / profile.step_seconds:>6.1%}")
    return "\n".join(lines)
