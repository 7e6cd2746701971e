"""Checks every family's tests run: logits against transformers, batch entry points against
single-sequence runs, and the random weights that make a tiny model's features matter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support import TinyModel, relative_error

# fp32 logits against transformers.
TOLERANCE = 1e-4
# A GGUF's projections with their activations rounded to int16 (the default on a CPU with AVX2):
# measured 1.4e-4 on tests/passes/test_gguf_native.py's model, 1.0e-4 on the bench model.
INT16_BOUND = 5e-4
# Batched kernels sum in a different order than single-sequence ones; this is float32 noise.
BATCH_TOLERANCE = 1e-5
# 12 prompt tokens and 8 decode steps: 20 positions, past the tiny sliding windows (8).
PROMPT = [1, 17, 42, 5, 88, 23, 9, 61, 30, 12, 77, 3]
CONTINUATION = [40, 8, 93, 15, 66, 2, 51, 34]


def randomize_norms(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Add noise to every norm weight: HF initialises them to a constant, which would hide a
    wrong norm convention (Gemma's ``1 + w``) or a norm applied to the wrong tensor."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * std)
    return model


def prefill_and_decode_errors(tiny: TinyModel, prompt=PROMPT, continuation=CONTINUATION,
                              expected: np.ndarray | None = None) -> list[float]:
    """Relative errors of our logits against transformers' (or ``expected``: logits at every
    position of ``prompt + continuation``) after the prompt and after each decode step."""
    if expected is None:
        expected = tiny.reference_logits(prompt + continuation)
    with tiny.model.new_sequence() as seq:
        errors = [relative_error(seq.prefill(prompt), expected[len(prompt) - 1])]
        for step, token in enumerate(continuation):
            errors.append(relative_error(seq.decode(token), expected[len(prompt) + step]))
    assert len(errors) == 1 + len(continuation)
    return errors


def batch_vs_single_errors(model, prefixes, chunks, decode_rounds) -> list[float]:
    """Relative errors of batched runs against single-sequence runs of the same tokens.

    Each sequence is first prefilled alone with its prefix; then ``batch_prefill`` appends one
    chunk to every sequence and ``batch_decode`` runs each round of ``decode_rounds`` (one token
    per sequence). The single runs prefill ``prefix + chunk`` and decode the same tokens.
    """
    seqs = [model.new_sequence() for _ in prefixes]
    try:
        for seq, prefix in zip(seqs, prefixes):
            if prefix:
                seq.prefill(prefix)
        batched = [model.batch_prefill(seqs, chunks)]
        batched += [model.batch_decode(seqs, tokens) for tokens in decode_rounds]
    finally:
        for seq in seqs:
            seq.close()
    errors = []
    for i, (prefix, chunk) in enumerate(zip(prefixes, chunks)):
        with model.new_sequence() as seq:
            single = [seq.prefill(prefix + chunk)] + [seq.decode(tokens[i]) for tokens in decode_rounds]
        assert all(b.shape == (len(prefixes), model.vocab_size) for b in batched)
        errors += [relative_error(b[i], s) for b, s in zip(batched, single)]
    return errors


def greedy_tokens(model, prompt: list[int], count: int) -> list[int]:
    """Our first ``count`` greedy tokens after ``prompt``: one prefill, then decode steps."""
    tokens = []
    with model.new_sequence() as seq:
        logits = seq.prefill(prompt)
        for _ in range(count):
            tokens.append(int(np.argmax(logits)))
            logits = seq.decode(tokens[-1])
    return tokens


def reference_greedy_tokens(hf_model, prompt: list[int], count: int, pad_token_id=0) -> list[int]:
    """transformers' first ``count`` greedy tokens after ``prompt`` (EOS does not stop it)."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=count, do_sample=False,
                                eos_token_id=None, pad_token_id=pad_token_id)
    return out[0, len(prompt):].tolist()


def greedy_tokens_agree(tiny: TinyModel, prompt=PROMPT, steps: int = 10) -> tuple[list[int], list[int]]:
    """Greedy continuations of ``prompt``: ours and transformers' ``generate``."""
    return greedy_tokens(tiny.model, prompt, steps), reference_greedy_tokens(tiny.reference, prompt, steps)


def family_tests(specs: dict):
    """The tests every family runs over its tiny specs, for a test module to bind at top level:
    logits against transformers, and the batch entry points against single sequences (with
    histories of 9, 3 and 0 tokens, then a batch prefill and 8 batch decodes: every sequence ends
    up past the sliding windows of 8)."""
    by_spec = pytest.mark.parametrize("spec", specs.values(), ids=specs.keys())

    @by_spec
    def test_prefill_and_decode_match_transformers(tiny_models, spec):
        errors = prefill_and_decode_errors(tiny_models(spec))
        assert max(errors) < TOLERANCE, errors

    @by_spec
    def test_batch_prefill_and_decode_agree_with_single_sequences(tiny_models, spec):
        errors = batch_vs_single_errors(tiny_models(spec).model, prefixes=[PROMPT[:9], PROMPT[:3], []],
                                        chunks=[[20, 21], [22, 23, 24], [25]],
                                        decode_rounds=[[t, (t + 1) % 96, (t + 2) % 96] for t in CONTINUATION])
        assert max(errors) < BATCH_TOLERANCE, errors

    return test_prefill_and_decode_match_transformers, test_batch_prefill_and_decode_agree_with_single_sequences
