"""Calibration for 4-bit quantization: how much each input channel of each weight matters
(llama.cpp's "importance matrix").

A float32 build of the same model, for the CPU, writes its own calibration text: a few sequences
sampled from plain openings. No dataset is needed, so none has to be shipped or licensed, and the
text is in the model's own language and style. While it samples (every token of the text but the
last goes through the model, so this is the text's forward pass too), the VM's instrument hook
sums ``x_j²`` over the input of every kernel call that reads a weight, and the full ``x xᵀ`` over
the input of the logits weight. ``passes.quantization`` weighs each channel's squared error by
the mean ``x_j²`` (the scale search then minimises the error of the layer's outputs rather than
of its weights), and rounds the logits weight by GPTQ.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import tvm
from tqdm import tqdm

from relaxlm.runtime.model import Model
from relaxlm.runtime.sampling import Sampler, SamplingParams

# Each sequence starts from one of these and is sampled at temperature 1 (top-p 0.95).
OPENINGS = ("The", "In the", "It was", "Chapter I", "My dear", "When the", "She", "There is")
SEQUENCE_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Mean ``x_j²`` of each weight's inputs, by parameter name; the full second moment
    ``E[x xᵀ]`` of the logits weight's inputs (for GPTQ); the text they were measured on, and
    the model's perplexity on it."""

    importance: dict[str, np.ndarray]
    hessians: dict[str, np.ndarray]
    sequences: list[list[int]]
    perplexity: float

    @property
    def tokens(self) -> int:
        """Tokens of calibration text."""
        return sum(map(len, self.sequences))

    def summary(self) -> dict:
        """What the artifact's manifest records about it."""
        return {"method": "importance (mean x^2 per input channel); GPTQ for the logits weight; self-generated text",
                "sequences": len(self.sequences), "tokens": self.tokens, "perplexity": round(self.perplexity, 3)}


def calibrate(model: Model, length: int | None = None, *, verbose: bool = False) -> Calibration:
    """Sample one sequence of ``length`` tokens (default :data:`SEQUENCE_TOKENS`, at most the
    context window) per opening from ``model`` (a float build), in one batch, while measuring
    each weight's inputs: the sampling feeds every token but the last of each sequence through
    the model, which is exactly the text's forward pass, so no second pass is needed. Seeded:
    the same model gives the same text."""
    length = length or min(SEQUENCE_TOKENS, model.context_window)
    hook = ImportanceHook(model)
    model.vm.set_instrument(hook)
    try:
        sequences, nll = _sample(model, length, verbose)
    finally:
        model.vm.set_instrument(None)
    scored = sum(len(s) - 1 for s in sequences)
    return Calibration(hook.means(), hook.second_moments(), sequences, math.exp(nll / scored))


def _sample(model: Model, length: int, verbose: bool) -> tuple[list[list[int]], float]:
    """The sequences, and the sum of ``-log p`` of each sampled token."""
    samplers = [Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=i)) for i in range(len(OPENINGS))]
    tokens = [[_first_token(model, opening)] for opening in OPENINGS]
    seqs = [model.new_sequence() for _ in OPENINGS]
    nll = 0.0
    try:
        logits = model.batch_prefill(seqs, tokens)
        for position in tqdm(range(1, length), desc="calibration text", unit="token", disable=not verbose,
                             file=sys.stderr):
            step = [sample(row) for sample, row in zip(samplers, logits)]
            nll += float(sum(_negative_log_likelihood(row, token) for row, token in zip(logits, step)))
            for sequence, token in zip(tokens, step):
                sequence.append(token)
            if position < length - 1:  # the last token is text, not input
                logits = model.batch_decode(seqs, step)
    finally:
        for seq in seqs:
            seq.close()
    return tokens, nll


def _negative_log_likelihood(logits: np.ndarray, token: int) -> float:
    shifted = logits.astype(np.float64) - logits.max()
    return float(np.log(np.exp(shifted).sum()) - shifted[token])


def _first_token(model: Model, opening: str) -> int:
    """The opening's last token (after the tokenizer's own prefix, if any); a model without a
    tokenizer starts from token 1."""
    if not model.manifest.tokenizer.present:
        return 1
    return int(model.tokenizer(opening)["input_ids"][-1])


class ImportanceHook:
    """A VM instrument that sums ``x_j²`` of the input of every kernel call reading a weight.

    A weight is recognised by its buffer (one of the model's parameters); its input is the float
    tensor passed just before it, with as many columns as the weight (``NT_matmul(x, W, …)``). A
    gather (``take(W, ids, …)``, the embedding lookup) passes nothing before it and adds nothing.
    The weight with a row per token (the logits) also gets its inputs' full ``xᵀ x``: it is one
    hidden × hidden matrix, and GPTQ needs it.
    """

    def __init__(self, model: Model):
        self.weights = {p.data_ptr(): name for name, p in zip(model.manifest.params, model.params)
                        if len(p.shape) == 2}
        self.logits_weights = {name for name, p in zip(model.manifest.params, model.params)
                               if len(p.shape) == 2 and int(p.shape[0]) == model.vocab_size}
        self.sums: dict[str, np.ndarray] = {}
        self.products: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}

    def __call__(self, func, symbol, before_run, ret_value, *args) -> int:
        if before_run:
            for previous, arg in zip(args, args[1:]):
                name = self.weights.get(arg.data_ptr()) if isinstance(arg, tvm.runtime.Tensor) else None
                if name and self._is_input(previous, arg):
                    self._add(name, previous.numpy())
        return 0  # go on with the call

    def _is_input(self, x, weight) -> bool:
        return (isinstance(x, tvm.runtime.Tensor) and x.data_ptr() not in self.weights
                and "float" in str(x.dtype) and int(x.shape[-1]) == int(weight.shape[1]))

    def _add(self, name: str, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.sums[name] = self.sums.get(name, 0) + np.einsum("ij,ij->j", rows, rows)
        self.rows[name] = self.rows.get(name, 0) + len(rows)
        if name in self.logits_weights:
            self.products[name] = self.products.get(name, 0) + rows.T @ rows

    def means(self) -> dict[str, np.ndarray]:
        """Mean ``x_j²`` per weight."""
        return {name: total / self.rows[name] for name, total in self.sums.items()}

    def second_moments(self) -> dict[str, np.ndarray]:
        """``E[x xᵀ]`` of the logits weight's inputs."""
        return {name: total / self.rows[name] for name, total in self.products.items()}
