"""Gemma 3 (``Gemma3ForCausalLM``, and the language model of ``Gemma3ForConditionalGeneration``).

What is special, against transformers' ``models/gemma3``: four norms per block, RMSNorm that
scales by ``1 + w`` (the 1 is folded into the weights at conversion), per-head q/k RMSNorm,
embeddings scaled by ``sqrt(hidden_size)`` in the weights' dtype, the softmax scale from
``query_pre_attn_scalar``, a GELU (tanh) MLP, and optionally soft-capped final logits. Sliding and
full layers (with their own RoPE bases) come from the shared :class:`LayerTypesConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from tvm.relax.frontend.nn import Tensor, op

from .causal_lm import CausalLM
from .config import HFConfigReader, LayerTypesConfig
from .errors import FrontendError


@dataclasses.dataclass
class Gemma3Config(LayerTypesConfig):
    """Gemma 3's text config (``Gemma3TextConfig``)."""

    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None

    family: ClassVar[str] = "Gemma 3"
    supported_activations: ClassVar[tuple[str, ...]] = ("gelu_pytorch_tanh",)
    default_theta: ClassVar[float] = 1_000_000.0

    @classmethod
    def activation_key(cls) -> str:
        return "hidden_activation"

    @classmethod
    def default_layer_types(cls, r: HFConfigReader, num_layers: int) -> list[str]:
        # Older configs: every ``sliding_window_pattern``-th layer is global (transformers' default: 6).
        pattern = r.get("sliding_window_pattern", None) or r.get("_sliding_window_pattern", 6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]

    @classmethod
    def legacy_sliding_theta(cls, r: HFConfigReader) -> float:
        return r.get("rope_local_base_freq", 10_000.0)

    @classmethod
    def read_family(cls, r: HFConfigReader) -> dict[str, Any]:
        if r.get("attn_logit_softcapping", None) is not None:
            raise FrontendError(
                f"{cls.family}: attn_logit_softcapping={r.hf['attn_logit_softcapping']!r} is not supported: "
                "TVM's paged attention kernels cannot soft-cap attention logits"
            )
        r.require("use_bidirectional_attention", (False,), False)
        return dict(
            **super().read_family(r),
            query_pre_attn_scalar=r.get("query_pre_attn_scalar", 256),
            final_logit_softcapping=r.get("final_logit_softcapping", None),
        )

    @property
    def sm_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3: norms before and after both sublayers, per-head q/k norms."""

    config_class = Gemma3Config
    layer_norms = {
        "pre_attention": "input_layernorm",
        "post_attention": "post_attention_layernorm",
        "pre_mlp": "pre_feedforward_layernorm",
        "post_mlp": "post_feedforward_layernorm",
    }
    qk_norm = "per_head"

    def scale_embeddings(self, embeds: Tensor) -> Tensor:
        # transformers keeps sqrt(hidden) as a float32 tensor and casts it to the weights' dtype.
        return embeds * float(np.float32(self.config.hidden_size**0.5))

    def process_logits(self, logits: Tensor) -> Tensor:
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        return op.tanh(logits / cap) * cap


def fold_norm_offset(name: str, tensor: np.ndarray, config: Gemma3Config) -> np.ndarray:
    """Gemma's RMSNorm multiplies by ``1 + w``; store ``1 + w`` (in float32, as transformers
    computes it) so that the shared RMSNorm applies it as an ordinary weight."""
    if name.endswith("norm.weight"):
        return np.float32(1.0) + tensor.astype(np.float32)
    return tensor


def unfold_gguf_norm_offset(name: str, tensor: np.ndarray, config: Gemma3Config) -> np.ndarray:
    """llama.cpp's converter stores Gemma's norm weights as ``1 + w``; take the 1 off again, as
    transformers' GGUF loader does, so that :func:`fold_norm_offset` sees HF's ``w``."""
    if name.endswith("norm.weight"):
        return tensor.astype(np.float32) - np.float32(1.0)
    return tensor
