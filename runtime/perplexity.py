"""Perplexity of a compiled model over a text: exp of the mean negative log-likelihood of each token
given the tokens before it.

The text is tokenized once and cut into consecutive, non-overlapping windows (the context window by
default). Each window starts a fresh sequence, so its first token is context only and is not
scored; every other token is scored from the logits after the tokens before it in the window —
what ``transformers`` gives for the same window in one forward pass.

Scoring streams: each call appends a chunk of the window and returns the logits after each of its
tokens, which are reduced to one sum before the next call. Memory is then bounded by the chunk,
whatever the text and the window. With ``decode``, each call appends one token through the decode
entry point, as generation does: what an artifact whose decode kernels differ from its prefill
ones (integer activations) scores when it generates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence as Seq

import numpy as np

from .errors import GenerationError
from .model import Model

# Logits held at once, in values: the chunk one call returns (float32), and the rows reduced in
# float64 at a time: 64 MiB of float32, 16 MiB of float64.
LOGITS_PER_CALL = 1 << 24
LOGITS_PER_REDUCTION = 1 << 21


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """The perplexity and what it was computed over."""

    perplexity: float
    # Sum of -log p(token | tokens before it in its window), in nats.
    nll: float
    scored_tokens: int
    windows: int
    window: int


def window_size(model: Model, window: int | None = None) -> int:
    """The window to score in: ``window`` capped by the context window (default: the context window)."""
    if window is not None and window < 2:
        raise GenerationError(f"a perplexity window needs at least 2 tokens, not {window}")
    return min(window or model.context_window, model.context_window)


def windows_of(token_ids: Seq[int], window: int) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens; a last window of one token (nothing to score) is dropped."""
    ids = list(token_ids)
    return [ids[start : start + window] for start in range(0, len(ids), window) if len(ids) - start >= 2]


def tokens_per_call(model: Model) -> int:
    """The chunk one scoring call appends: as many as one call may append exactly, and no more
    than :data:`LOGITS_PER_CALL` logits."""
    return max(1, min(model.max_append, LOGITS_PER_CALL // model.vocab_size))


def nll_of(logits: np.ndarray, targets: np.ndarray) -> float:
    """-sum log softmax(logits[i])[targets[i]], in float64, a few rows at a time."""
    rows = max(1, LOGITS_PER_REDUCTION // logits.shape[-1])
    total = 0.0
    for start in range(0, len(targets), rows):
        block = logits[start : start + rows].astype(np.float64)
        shifted = block - block.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        chosen = shifted[np.arange(len(block)), targets[start : start + rows]]
        total += float((log_norm - chosen).sum())
    return total


def _window_nll(model: Model, ids: list[int], progress: Callable[[int], None], decode: bool) -> float:
    """-sum log p(ids[i] | ids[:i]) for i ≥ 1, scored chunk by chunk (one decode call per token
    with ``decode``)."""
    step = tokens_per_call(model)
    inputs, targets = ids[:-1], np.asarray(ids[1:])
    total = 0.0
    with model.new_sequence() as seq:
        if decode:
            for i, token in enumerate(inputs):
                total += nll_of(seq.decode(token)[None], targets[i:i + 1])
                progress(1)
            return total
        for start in range(0, len(inputs), step):
            chunk = inputs[start : start + step]
            total += nll_of(seq.logits_after_each(chunk), targets[start : start + len(chunk)])
            progress(len(chunk))
    return total


def perplexity_of_ids(model: Model, token_ids: Seq[int], window: int | None = None,
                      progress: Callable[[int], None] | None = None, decode: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` over ``token_ids`` in windows of ``window`` tokens (see the module
    doc; ``decode``: a token per call); ``progress(n)`` is told each time ``n`` more tokens are scored."""
    size = window_size(model, window)
    chunks = windows_of(token_ids, size)
    if not chunks:
        raise GenerationError("perplexity needs a text of at least 2 tokens")
    nll = sum(_window_nll(model, ids, progress or (lambda _n: None), decode) for ids in chunks)
    scored = sum(len(ids) - 1 for ids in chunks)
    return PerplexityResult(math.exp(nll / scored), nll, scored, len(chunks), size)


def scored_tokens(token_ids: Seq[int], window: int) -> int:
    """How many tokens :func:`perplexity_of_ids` scores (for a progress bar)."""
    return sum(len(ids) - 1 for ids in windows_of(token_ids, window))


def perplexity(model: Model, text: str, window: int | None = None,
               progress: Callable[[int], None] | None = None, decode: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` over ``text``, tokenized by the artifact's tokenizer as it does by default."""
    return perplexity_of_ids(model, model.tokenizer(text)["input_ids"], window, progress, decode)
