"""Batch entry points and sequence operations agree with single-sequence runs (which are checked
against transformers in tests/frontends)."""

import numpy as np
import pytest

from relaxlm.runtime import GenerationError
from llama_specs import LLAMA_SPECS
from support import relative_error

# Batched kernels sum in a different order than single-sequence ones; this is float32 noise.
TOLERANCE = 1e-5
PROMPTS = [[1, 5, 9, 33], [4, 50, 6, 7, 81, 12, 14], [9, 10]]


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models(LLAMA_SPECS["gqa_tied_fp16"]).model


def _single(model, prompt, next_token):
    with model.new_sequence() as seq:
        return seq.prefill(prompt), seq.decode(next_token)


def test_batch_prefill_and_decode_agree_with_single_sequences(model):
    next_tokens = [11, 12, 13]
    seqs = [model.new_sequence() for _ in PROMPTS]
    try:
        prefill_logits = model.batch_prefill(seqs, PROMPTS)
        decode_logits = model.batch_decode(seqs, next_tokens)
    finally:
        for seq in seqs:
            seq.close()
    assert prefill_logits.shape == decode_logits.shape == (3, model.vocab_size)
    for i, (prompt, token) in enumerate(zip(PROMPTS, next_tokens)):
        single_prefill, single_decode = _single(model, prompt, token)
        assert relative_error(prefill_logits[i], single_prefill) < TOLERANCE
        assert relative_error(decode_logits[i], single_decode) < TOLERANCE


def test_batch_verify_agrees_with_step_by_step_decoding(model):
    prompt, draft = [1, 17, 42, 5], [88, 23, 9, 61]
    with model.new_sequence() as seq:
        seq.prefill(prompt)
        stepwise = np.stack([seq.decode(t) for t in draft])
    with model.new_sequence() as seq:
        seq.prefill(prompt)
        verified = seq.verify(draft)
        assert seq.length == len(prompt) + len(draft)
        after_verify = seq.decode(30)
    with model.new_sequence() as seq:
        seq.prefill(prompt + draft)
        after_stepwise = seq.decode(30)
    assert verified.shape == stepwise.shape
    for row_verified, row_stepwise in zip(verified, stepwise):
        assert relative_error(row_verified, row_stepwise) < TOLERANCE
    assert relative_error(after_verify, after_stepwise) < TOLERANCE


def test_verify_refuses_more_draft_tokens_than_the_cache_takes(model, monkeypatch):
    """A chain past TVM's 256-node token tree is refused in one line, not inside TVM, even where
    the model would append more tokens per call."""
    monkeypatch.setattr(model, "max_append", 4096)
    with model.new_sequence() as seq:
        seq.prefill([1, 2, 3])
        with pytest.raises(GenerationError, match="at most 256 draft tokens"):
            seq.verify([5] * 257)
        assert seq.length == 3


def test_rollback_then_decode_matches_a_shorter_sequence(model):
    with model.new_sequence() as seq:
        seq.prefill([1, 17, 42, 5, 88])
        seq.rollback(2)
        rolled = seq.decode(7)
    with model.new_sequence() as seq:
        seq.prefill([1, 17, 42])
        direct = seq.decode(7)
    assert relative_error(rolled, direct) < TOLERANCE


def test_forked_sequence_continues_exactly_as_its_parent(model):
    continuation = [40, 8, 93]
    with model.new_sequence() as parent:
        parent.prefill([1, 17, 42, 5, 88])
        child = parent.fork()
        with child:
            child_logits = [child.decode(t) for t in continuation]
        parent_logits = [parent.decode(t) for t in continuation]
    for ours, theirs in zip(child_logits, parent_logits):
        np.testing.assert_array_equal(ours, theirs)


def test_logits_returned_earlier_stay_as_they_were(model):
    """On the CPU the logits are the VM's own output buffer (no copy): later calls must not write
    into an array the caller still holds, and the caller may change it."""
    with model.new_sequence() as seq:
        first = seq.prefill(PROMPTS[0])
        kept = first.copy()
        first_decode = seq.decode(11)
        kept_decode = first_decode.copy()
        first_decode[:] = 0
        for token in (12, 13, 14):
            seq.decode(token)
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(kept_decode, first_decode)
    with model.new_sequence() as seq:
        seq.prefill(PROMPTS[0])
        np.testing.assert_array_equal(seq.decode(11), kept_decode)
