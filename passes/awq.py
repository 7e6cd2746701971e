"""Activation-aware channel scaling (AWQ), folded exactly into the float weights before 4-bit
quantization.

A few input channels of each projection carry most of the activation energy. Multiplying such a
column of ``W`` by ``t_j > 1`` and its input by ``1 / t_j`` leaves the product unchanged, but the
column now spans more quantization levels, so its relative rounding error shrinks where it counts
most. The ``1 / t`` is folded exactly into the float parameter that makes the input:

==================  ==========================================================================
scaled weight       absorbs ``1 / t``
==================  ==========================================================================
``qkv_proj``        the norm before attention (its weight), if the family has one
``o_proj``          the v rows of ``qkv_proj`` (attention is linear in v); one ``t`` per kv head
``gate_up_proj``    the norm before the MLP, if the family has one
``down_proj``       the up rows of ``gate_up_proj`` (``act(gate) * up`` is linear in up)
==================  ==========================================================================

``t = rms(x)^α`` per channel, with ``α`` searched on a grid per projection for the least expected
output error ``Σ_j E[x_j²] Δw_j²`` after quantization (the same diagonal statistic the importance
search uses, so calibration collects nothing more). The float model computes exactly what it did;
only the rounding moves.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import numpy as np

from .quantization import GroupQuantization

ALPHAS = np.round(np.arange(0.0, 1.01, 0.1), 2)
# Rows of a weight the α search quantizes (evenly spaced): rows are independent, and the sample
# keeps the search to seconds per model.
SEARCH_ROWS = 256
_LAYER = re.compile(r"^(.*\.layers\.\d+\.)")


@dataclasses.dataclass(frozen=True)
class Fold:
    """Scale the columns of ``scaled``; divide ``absorber`` by the same ``t``: all of it (a norm
    weight), or only its ``rows`` (``"v"`` of a fused qkv, ``"up"`` of a fused gate_up)."""

    scaled: str
    absorber: str
    rows: str | None = None


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the folds need to know of the model."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int


def folds(layer_norms: dict[str, str], value_is_linear: bool) -> list[Fold]:
    """The folds of one decoder layer, in the order they run (see the module docstring)."""
    plan = []
    if "pre_attention" in layer_norms:
        plan.append(Fold("self_attn.qkv_proj", layer_norms["pre_attention"]))
    if value_is_linear:
        plan.append(Fold("self_attn.o_proj", "self_attn.qkv_proj", rows="v"))
    if "pre_mlp" in layer_norms:
        plan.append(Fold("mlp.gate_up_proj", layer_norms["pre_mlp"]))
    plan.append(Fold("mlp.down_proj", "mlp.gate_up_proj", rows="up"))
    return plan


def scale_channels(params: Iterator[tuple[str, np.ndarray]], plan: list[Fold], shape: Shape,
                   importance: dict[str, np.ndarray], scheme: GroupQuantization) -> Iterator[tuple[str, np.ndarray]]:
    """Apply ``plan`` to each decoder layer of the parameter stream (in module order, a layer's
    parameters together). ``importance`` is updated in place for the scaled weights (their inputs
    are now ``x / t``)."""
    layer: list[tuple[str, np.ndarray]] = []
    prefix = None
    for name, array in params:
        match = _LAYER.match(name)
        if layer and (match is None or match.group(1) != prefix):
            yield from _scaled_layer(layer, prefix, plan, shape, importance, scheme)
            layer = []
        if match is None:
            yield name, array
        else:
            prefix = match.group(1)
            layer.append((name, array))
    yield from _scaled_layer(layer, prefix, plan, shape, importance, scheme)


def _scaled_layer(layer, prefix, plan, shape, importance, scheme) -> list[tuple[str, np.ndarray]]:
    arrays = dict(layer)
    for fold in plan:
        weight = f"{prefix}{fold.scaled}.weight"
        if weight not in arrays or f"{prefix}{fold.absorber}.weight" not in arrays or weight not in importance:
            continue  # e.g. a norm without weights (OLMo's LayerNorm): nothing can absorb t
        energy = importance[weight]
        rms = np.sqrt(np.maximum(energy, 0))
        if fold.rows == "v":  # one t per kv head's channel: the query heads of a group share v
            rep = shape.num_q_heads // shape.num_kv_heads
            grouped = rms.reshape(shape.num_kv_heads, rep, shape.head_dim).mean(1, keepdims=True)
            rms = np.broadcast_to(grouped, (shape.num_kv_heads, rep, shape.head_dim)).reshape(-1)
        t = _best_scale(arrays[weight], rms, energy, scheme)
        arrays[weight] = arrays[weight] * t
        importance[weight] = energy / np.square(t)
        if fold.rows == "v":
            t = t.reshape(shape.num_kv_heads, -1, shape.head_dim)[:, 0, :].reshape(-1)
        for suffix in ("weight", "bias"):
            key = f"{prefix}{fold.absorber}.{suffix}"
            if key in arrays:
                arrays[key] = _divide(arrays[key], t, fold.rows, shape)
    return [(name, arrays[name]) for name, _ in layer]


def _best_scale(w: np.ndarray, rms: np.ndarray, energy: np.ndarray, scheme: GroupQuantization) -> np.ndarray:
    """``t = rms^α``, for the ``α`` of the grid with the least expected output error after
    quantization (on a sample of rows; α = 0 is no scaling, so it never does worse there)."""
    rows = w[np.linspace(0, len(w) - 1, min(SEARCH_ROWS, len(w))).astype(int)]
    best, best_error = None, np.inf
    for alpha in ALPHAS:
        t = np.maximum(rms, 1e-5) ** alpha
        t = (t / np.sqrt(t.max() * t.min())).astype(np.float32)
        scaled_energy = energy / np.square(t)
        restored = scheme.dequantize(*scheme.quantize(rows * t, scaled_energy))
        error = float(np.einsum("ij,j->", np.square(restored - rows * t), scaled_energy))
        if error < best_error:
            best, best_error = t, error
    return best


def _divide(array: np.ndarray, t: np.ndarray, rows: str | None, shape: Shape) -> np.ndarray:
    """Divide the absorber by ``t``: a norm weight element-wise, or one part's rows of a fused
    projection (v of qkv, up of gate_up; a bias the same rows)."""
    if rows is None:
        return (array / t).astype(array.dtype)
    if rows == "v":
        start = (shape.num_q_heads + shape.num_kv_heads) * shape.head_dim
        stop = start + shape.num_kv_heads * shape.head_dim
    else:
        start, stop = len(array) // 2, len(array)
    out = array.copy()
    out[start:stop] = (out[start:stop].T / t).T
    return out
