"""OLMo 1, 2 and 3 (``OlmoForCausalLM``, ``Olmo2ForCausalLM``, ``Olmo3ForCausalLM``).

What is special, against transformers' ``models/olmo{,2,3}``:

- OLMo 1: LayerNorm without weight or bias (eps fixed at 1e-5, not in the config), and
  ``clip_qkv`` clamping the projected q, k and v.
- OLMo 2: RMSNorm applied to the attention and MLP outputs before the residual add (no pre-norms),
  and q/k RMSNorm over all heads together (``q_norm`` has ``heads * head_dim`` weights).
- OLMo 3: OLMo 2's block, with sliding or full attention per layer (``layer_types``); as in
  transformers, rope scaling applies to the full-attention layers only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .causal_lm import CausalLM
from .config import HFConfigReader, LayerTypesConfig, ModelConfig
from .layers import PagedAttention

# transformers' OlmoLayerNorm hard-codes its epsilon.
OLMO_LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass
class OlmoConfig(ModelConfig):
    """OLMo 1's config."""

    clip_qkv: float | None = None

    family: ClassVar[str] = "OLMo"

    @classmethod
    def read_family(cls, r: HFConfigReader) -> dict[str, Any]:
        return dict(clip_qkv=r.get("clip_qkv", None), norm_eps=OLMO_LAYER_NORM_EPS)


class ClippedAttention(PagedAttention):
    """Attention whose projected q, k and v are clamped to ``[-clip_qkv, clip_qkv]``."""

    def __init__(self, config: OlmoConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.clip_qkv = config.clip_qkv

    def transform_qkv(self, qkv: Tensor) -> Tensor:
        if self.clip_qkv is None:
            return qkv
        low = Tensor.from_scalar(-self.clip_qkv, qkv.dtype)
        high = Tensor.from_scalar(self.clip_qkv, qkv.dtype)
        return op.minimum(op.maximum(qkv, low), high)


class OlmoForCausalLM(CausalLM):
    """OLMo 1: Llama's block with parameter-free LayerNorms and clamped q/k/v."""

    config_class = OlmoConfig
    attention_class = ClippedAttention

    def make_norm(self, dim: int | None = None) -> nn.Module:
        return nn.LayerNorm(dim or self.config.hidden_size, self.config.norm_eps, elementwise_affine=False,
                            dtype=self.dtype)


class Olmo2Config(ModelConfig):
    """OLMo 2's config: exactly the shared fields."""

    family: ClassVar[str] = "OLMo 2"


class Olmo2ForCausalLM(CausalLM):
    """OLMo 2: norms after each sublayer, q/k norms over all heads."""

    config_class = Olmo2Config
    layer_norms = {"post_attention": "post_attention_layernorm", "post_mlp": "post_feedforward_layernorm"}
    qk_norm = "all_heads"


@dataclasses.dataclass
class Olmo3Config(LayerTypesConfig):
    """OLMo 3's config: OLMo 2's plus sliding/full layers."""

    family: ClassVar[str] = "OLMo 3"
    default_theta: ClassVar[float] = 500_000.0

    @classmethod
    def default_layer_types(cls, r: HFConfigReader, num_layers: int) -> list[str]:
        return ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(num_layers)]

    @classmethod
    def legacy_sliding_theta(cls, r: HFConfigReader) -> float:
        # transformers 5 consumes a legacy rope_theta for the full layers and gives the sliding
        # layers the default base.
        return cls.default_theta


class Olmo3ForCausalLM(Olmo2ForCausalLM):
    """OLMo 3: OLMo 2's model over sliding and full attention layers."""

    config_class = Olmo3Config
