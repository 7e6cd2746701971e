"""Real weights: perplexity of SmolLM2-135M-Instruct on a fixed English text (tests/data), at
q0f32 against transformers loading the same GGUF, and at q4f32_1 (calibrated) against q0f32."""

import math
from pathlib import Path

import pytest
import torch

from relaxlm.runtime import load
from relaxlm.runtime.perplexity import perplexity

pytestmark = pytest.mark.real
TEXT = (Path(__file__).parent.parent / "data" / "pride_and_prejudice.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def q0f32_perplexity(smollm2_artifacts):
    return perplexity(load(smollm2_artifacts("q0f32")), TEXT)


def test_q0f32_perplexity_equals_transformers(smollm2_reference, smollm2_artifacts, q0f32_perplexity):
    tokenizer, hf_model = smollm2_reference
    ids = tokenizer(TEXT)["input_ids"]
    assert load(smollm2_artifacts("q0f32")).tokenizer(TEXT)["input_ids"] == ids
    # The whole text fits one window (the context is 8192 tokens).
    assert q0f32_perplexity.windows == 1 and q0f32_perplexity.scored_tokens == len(ids) - 1
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
    expected = math.exp(nll / (len(ids) - 1))
    assert abs(q0f32_perplexity.perplexity - expected) / expected < 1e-3, (q0f32_perplexity.perplexity, expected)


@pytest.fixture(scope="module")
def q4f32_1_perplexity(smollm2_artifacts):
    """The default q4f32_1 compile, calibrated (compiler.calibration)."""
    return perplexity(load(smollm2_artifacts("q4f32_1")), TEXT)


def test_q4f32_1_perplexity_is_within_10_percent_of_q0f32(q4f32_1_perplexity, q0f32_perplexity):
    """Measured 17.63 against 16.30 (+8.2%). The bundled weights are already on llama.cpp's
    asymmetric Q4_1 grid (a per-group offset), which a symmetric grid cannot hold, so requantizing
    adds a second rounding error: +46% with plain absmax scales, +29% with the scale search, +15%
    with calibration, and +8.2% with groups of 16 for the attention and down projections and a
    finer grid of scale candidates (passes.quantization). Groups of 16 with the coarser grid
    measured +10.2% (in transformers, with the same weights)."""
    assert abs(q4f32_1_perplexity.perplexity - q0f32_perplexity.perplexity) / q0f32_perplexity.perplexity < 0.10, (
        q4f32_1_perplexity.perplexity, q0f32_perplexity.perplexity)
