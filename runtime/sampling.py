"""Choosing the next token from float32 logits (numpy, on the host)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

# What a chat samples with when the model's generation_config says nothing (Ollama's defaults:
# greedy chat loops, and a penalty over the whole conversation would forbid the question's own
# words, so it covers the last 64 tokens as llama.cpp's repeat_last_n does).
CHAT_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "repetition_window": 64}


@dataclasses.dataclass
class SamplingParams:
    """Greedy when ``temperature`` is 0; otherwise softmax sampling, narrowed by top-k / top-p.
    The repetition penalty applies to the last ``repetition_window`` tokens (0: all of them)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    repetition_window: int = 0

    def __post_init__(self):
        checks = (("temperature", self.temperature >= 0, ">= 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("top_k", self.top_k >= 0, ">= 0"), ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                  ("repetition_window", self.repetition_window >= 0, ">= 0"))
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"sampling: {name} must be {rule}, not {getattr(self, name)}")


def chat_sampling(model_defaults: Mapping[str, Any], **overrides) -> SamplingParams:
    """A chat's sampling: :data:`CHAT_DEFAULTS`, then what the model's generation_config gives
    (``do_sample: false`` means greedy), then the caller's ``overrides`` that are not None."""
    settings = dict(CHAT_DEFAULTS)
    settings.update({k: v for k, v in model_defaults.items() if k in settings})
    if model_defaults.get("do_sample") is False:
        settings["temperature"] = 0.0
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**settings)


class Sampler:
    """Samples tokens with one seeded random generator per generation."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def penalise(self, logits: np.ndarray, previous: Sequence[int]) -> np.ndarray:
        """CTRL-style repetition penalty, as transformers applies it, over the penalty window."""
        penalty = self.params.repetition_penalty
        if self.params.repetition_window:
            previous = previous[-self.params.repetition_window:]
        if penalty == 1.0 or not len(previous):
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
        if p.top_k and p.top_k < scaled.size:
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
