"""RoPE inverse frequencies and cos/sin scale against transformers' own rope init functions."""

import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from relaxlm.frontends.config import HFConfigReader
from relaxlm.frontends.errors import FrontendError
from relaxlm.frontends.rope import rope_parameters_from_hf

HEAD_DIM = 32
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_no_truncate": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128,
                         "beta_fast": 16, "beta_slow": 2, "truncate": False},
}


def _configs(scaling):
    hf = LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, rope_theta=50000.0, rope_scaling=scaling,
                     max_position_embeddings=512)
    return hf, rope_parameters_from_hf(HFConfigReader(hf.to_dict(), "Llama"))


@pytest.mark.parametrize("name", SCALINGS)
def test_inverse_frequencies_match_transformers(name):
    hf, ours = _configs(SCALINGS[name])
    rope_type = hf.rope_parameters["rope_type"]
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, attention_factor = init(hf)
    np.testing.assert_allclose(ours.inv_freq(HEAD_DIM), inv_freq.numpy(), rtol=1e-6)
    assert ours.attention_factor == pytest.approx(attention_factor)


def test_unknown_rope_type_is_an_error():
    with pytest.raises(FrontendError, match="dynamic"):
        rope_parameters_from_hf(HFConfigReader({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "Llama"))
