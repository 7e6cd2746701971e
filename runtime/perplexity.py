"""Perplexity of a compiled model over a text: exp of the mean negative log-likelihood of each token
given the tokens before it.

The text is tokenized once and cut into consecutive, non-overlapping windows (the context window by
default). Each window starts a fresh sequence, so its first token is context only and is not
scored; every other token is scored from the logits after the tokens before it in the window —
what ``transformers`` gives for the same window in one forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence as Seq

import numpy as np

from .engine import GenerationError, Model

# TVM 0.27's paged KV cache refuses a token tree (what ``verify`` appends) over 256 tokens
# (``kTreeAttnMaxTreeSize``).
MAX_VERIFY_TOKENS = 256


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


def _logits_after_each(model: Model, token_ids: list[int]) -> np.ndarray:
    """Logits after each of ``token_ids`` (n, vocab), appended to a fresh sequence.

    ``verify`` returns every position's logits in one call (``prefill`` only the last), so the
    window goes through it in chunks of ``model.max_append`` (at most ``MAX_VERIFY_TOKENS``). Its tree-attention kernel knows
    nothing of sliding windows, so a model with sliding-window layers goes through ``decode``, one
    token per call, the path that is exact for those layers.
    """
    rows = []
    with model.new_sequence() as seq:
        if model.config.get("sliding_window") or model.max_append == 1:
            rows = [seq.decode(token)[None, :] for token in token_ids]
        else:
            step = min(model.max_append, MAX_VERIFY_TOKENS)
            for start in range(0, len(token_ids), step):
                rows.append(seq.verify(token_ids[start : start + step]))
    return np.concatenate(rows)


def _window_nll(model: Model, ids: list[int]) -> float:
    """-sum log p(ids[i] | ids[:i]) for i ≥ 1, in float64."""
    logits = _logits_after_each(model, ids[:-1]).astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1))
    targets = np.asarray(ids[1:])
    return float((log_norm - shifted[np.arange(targets.size), targets]).sum())


def perplexity_of_ids(model: Model, token_ids: Seq[int], window: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` over ``token_ids`` in windows of ``window`` tokens (see the module doc)."""
    size = window_size(model, window)
    chunks = windows_of(token_ids, size)
    if not chunks:
        raise GenerationError("perplexity needs a text of at least 2 tokens")
    nll = sum(_window_nll(model, ids) for ids in chunks)
    scored = sum(len(ids) - 1 for ids in chunks)
    return PerplexityResult(math.exp(nll / scored), nll, scored, len(chunks), size)


def perplexity(model: Model, text: str, window: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` over ``text``, tokenized by the artifact's tokenizer as it does by default."""
    return perplexity_of_ids(model, model.tokenizer(text)["input_ids"], window)
