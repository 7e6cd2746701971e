"""Choosing the next token from float32 logits (numpy, on the host)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class SamplingParams:
    """Greedy when ``temperature`` is 0; otherwise softmax sampling, narrowed by top-k / top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(
                "sampling: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0"
            )


class Sampler:
    """Samples tokens with one seeded random generator per generation."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def penalise(self, logits: np.ndarray, previous: Sequence[int]) -> np.ndarray:
        """CTRL-style repetition penalty, as transformers applies it."""
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or not previous:
            return logits
        logits = logits.copy()
        seen = np.unique(np.asarray(previous, dtype=np.int64))
        values = logits[seen]
        logits[seen] = np.where(values < 0, values * penalty, values / penalty)
        return logits

    def __call__(self, logits: np.ndarray, previous: Sequence[int] = ()) -> int:
        logits = self.penalise(logits, previous)
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        if p.top_k:
            kth = np.partition(scaled, -p.top_k)[-p.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(len(probs), p=probs))
