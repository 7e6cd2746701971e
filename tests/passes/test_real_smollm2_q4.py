"""Real weights at q4f32_1: SmolLM2-135M-Instruct from the bundled GGUF (dequantized to float32,
then requantized), its artifact size, and that it still answers a factual question."""

import math

import pytest

from relaxlm import frontends
from relaxlm.runtime import load

pytestmark = pytest.mark.real
# 4-bit codes (0.5 bytes) plus a float16 scale per 32 weights (0.0625 bytes), or per 16 for the
# attention and down projections (0.125; 44% of the parameters), with the tied embedding quantized
# too; the float32 norms add under 0.001. Measured 0.588.
MAX_BYTES_PER_PARAMETER = 0.6


@pytest.fixture(scope="module")
def artifact(smollm2_artifacts):
    return smollm2_artifacts("q4f32_1")


def parameter_count() -> int:
    source = frontends.open_source("smollm2-135m")
    try:
        _, family = frontends.family_for(source.config)
        module = family.model_class(family.config_class.from_hf(source.config))
        return sum(math.prod(int(d) for d in p.shape) for _, p in module.named_parameters())
    finally:
        source.close()


def test_weights_take_at_most_0_6_bytes_per_parameter(artifact):
    stored = sum(f.stat().st_size for f in artifact.glob("*.safetensors"))
    assert stored / parameter_count() <= MAX_BYTES_PER_PARAMETER


def test_still_answers_paris(artifact):
    answer = load(artifact).generate("What is the capital of France?", chat=True, max_tokens=20)
    assert "Paris" in answer, answer
