"""Rotary position embedding parameters, computed exactly as transformers computes them.

relaxlm applies RoPE itself (see ``layers.Rotations``) instead of inside TVM's KV-cache kernels:
those know only one base per model and get yarn wrong (their ramp runs over the element index
instead of the pair index, without transformers' truncation or attention factor), while Gemma 3
needs a base per layer kind and OLMo 3 needs yarn. Here each variant is just a table of inverse
frequencies plus a scale of cos/sin, built once at export time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .errors import FrontendError
from .hf_config import HFConfigReader

# Keys that transformers folds into rope_parameters, besides rope_type itself.
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class RopeParameters:
    """One RoPE variant: its type, base and scaling parameters (HF names)."""

    rope_type: str
    theta: float
    scaling: dict[str, Any] = dataclasses.field(default_factory=dict)

    def inv_freq(self, dim: int) -> np.ndarray:
        """The ``dim // 2`` inverse frequencies, float32, as transformers' rope init computes them."""
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        base_freq = (1.0 / np.power(np.float32(self.theta), exponents)).astype(np.float32)
        return _SCALERS[self.rope_type](self, base_freq, dim).astype(np.float32)

    @property
    def attention_factor(self) -> float:
        """The scale transformers applies to cos and sin (only yarn changes it)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.scaling.get("attention_factor") is not None:
            return float(self.scaling["attention_factor"])
        factor = self.scaling["factor"]
        mscale, mscale_all_dim = self.scaling.get("mscale"), self.scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        return _yarn_mscale(factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _default(p: RopeParameters, freq: np.ndarray, dim: int) -> np.ndarray:
    return freq


def _linear(p: RopeParameters, freq: np.ndarray, dim: int) -> np.ndarray:
    return freq / np.float32(p.scaling["factor"])


def _llama3(p: RopeParameters, freq: np.ndarray, dim: int) -> np.ndarray:
    s = p.scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old_context / low, freq / factor, freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(medium, smoothed, scaled)


def _yarn(p: RopeParameters, freq: np.ndarray, dim: int) -> np.ndarray:
    s = p.scaling
    factor, original = s["factor"], s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(p.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.astype(np.float32)
    interpolation = freq / np.float32(factor)
    return interpolation * (1 - extrapolation) + freq * extrapolation


_SCALERS = {"default": _default, "linear": _linear, "llama3": _llama3, "yarn": _yarn}


def rope_from_dict(params: dict[str, Any], family: str, default_theta: float = 10000.0) -> RopeParameters:
    """A :class:`RopeParameters` from one HF rope dict (``rope_parameters`` or ``rope_scaling`` style)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SCALERS:
        raise FrontendError(
            f"{family}: RoPE type '{rope_type}' is not supported (supported: {', '.join(_SCALERS)})"
        )
    missing = [k for k in _ROPE_KEYS[rope_type] if params.get(k) is None]
    if missing:
        raise FrontendError(f"{family}: RoPE type '{rope_type}' needs {', '.join(missing)} in its parameters")
    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}
    return RopeParameters(rope_type, float(params.get("rope_theta", default_theta)), scaling)


def rope_parameters_from_hf(r: HFConfigReader, default_theta: float = 10000.0) -> RopeParameters:
    """The model-wide RoPE of a HF config, from either transformers 5's ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling`` pair."""
    params = dict(r.get("rope_parameters", None) or {})
    legacy_scaling = r.get("rope_scaling", None)
    if legacy_scaling:
        params.update(legacy_scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = r.get("rope_theta", default_theta)
    return rope_from_dict(params, r.family, default_theta)
