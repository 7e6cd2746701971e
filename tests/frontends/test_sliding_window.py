"""Sliding-window layers with multi-token prefill, against transformers (Gemma3ForCausalLM,
Olmo3ForCausalLM; query at p attends keys in (p - window, p]): prompts several windows long,
prefilled in one call or in uneven pieces, and batch prefills of sequences of different lengths
crossing the window. Window 8, page size 16: chunks start at every offset in the window and pages."""

import numpy as np
import pytest

from family_checks import TOLERANCE
from gemma3_specs import GEMMA3_SPECS
from olmo_specs import OLMO_SPECS
from support import relative_error

WINDOW = 8
SPECS = {"gemma3": GEMMA3_SPECS["sliding_global_softcap"], "olmo3": OLMO_SPECS["olmo3_sliding_yarn"]}
by_spec = pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())

rng = np.random.default_rng(7)
LONG_PROMPT = rng.integers(3, 96, 30).tolist()
CONTINUATION = rng.integers(3, 96, 4).tolist()


@by_spec
def test_a_prefill_call_appends_up_to_the_window(tiny_models, spec):
    """The runtime appends whole windows per call (not one token), so these tests run the
    multi-token kernels."""
    assert tiny_models(spec).model.max_append == WINDOW


@by_spec
def test_long_prompt_in_one_prefill_then_decode_matches_transformers(tiny_models, spec):
    tiny = tiny_models(spec)
    expected = tiny.reference_logits(LONG_PROMPT + CONTINUATION)
    with tiny.model.new_sequence() as seq:
        errors = [relative_error(seq.prefill(LONG_PROMPT), expected[len(LONG_PROMPT) - 1])]
        for step, token in enumerate(CONTINUATION):
            errors.append(relative_error(seq.decode(token), expected[len(LONG_PROMPT) + step]))
    assert max(errors) < TOLERANCE, errors


@pytest.mark.parametrize("pieces", [[3, 8, 7, 12], [1, 9, 2, 15, 3], [17, 13]], ids=str)
@by_spec
def test_prompt_prefilled_in_uneven_pieces_matches_transformers(tiny_models, spec, pieces):
    """Each piece starts at another offset in the window and in the page; the logits after every
    piece are checked, not only the last."""
    tiny = tiny_models(spec)
    expected = tiny.reference_logits(LONG_PROMPT)
    errors, start = [], 0
    with tiny.model.new_sequence() as seq:
        for n in pieces:
            errors.append(relative_error(seq.prefill(LONG_PROMPT[start : start + n]), expected[start + n - 1]))
            start += n
    assert start == len(LONG_PROMPT)
    assert max(errors) < TOLERANCE, errors


@by_spec
def test_batch_prefill_of_different_lengths_across_the_window_matches_transformers(tiny_models, spec):
    """Histories of 0, 5 and 13 tokens, then one batch prefill of 20, 11 and 6 tokens (each
    sequence crosses the window within it), then batch decodes; every row against transformers."""
    tiny = tiny_models(spec)
    histories = [[], LONG_PROMPT[:5], LONG_PROMPT[:13]]
    chunks = [LONG_PROMPT[:20], LONG_PROMPT[5:16], LONG_PROMPT[13:19]]
    decode_rounds = [CONTINUATION[:3], CONTINUATION[1:4]]
    seqs = [tiny.model.new_sequence() for _ in histories]
    try:
        for seq, history in zip(seqs, histories):
            if history:
                seq.prefill(history)
        batched = [tiny.model.batch_prefill(seqs, chunks)]
        batched += [tiny.model.batch_decode(seqs, tokens) for tokens in decode_rounds]
    finally:
        for seq in seqs:
            seq.close()
    errors = []
    for i, (history, chunk) in enumerate(zip(histories, chunks)):
        tokens = history + chunk + [r[i] for r in decode_rounds]
        expected = tiny.reference_logits(tokens)
        positions = [len(history + chunk) - 1 + step for step in range(len(batched))]
        errors += [relative_error(b[i], expected[p]) for b, p in zip(batched, positions)]
    assert max(errors) < TOLERANCE, errors
