"""Quantization schemes, named as users know them from MLC LLM (``q0f32``, ``q4f16_1`` …).

A scheme says which dtype the model computes in and how each weight is stored. The registry
``passes.schemes.SCHEMES`` is the one place a new scheme is added.

Group schemes (``q4f32_1``, ``q4f16_1``, ``q8f32_1``, ``q8f16_1``) follow MLC LLM's ``_1``
layout: groups of :data:`GROUP_SIZE` consecutive weights along the input dimension, ``32 // bits``
codes packed into each uint32 (lowest bits first), one float16 scale per group and a fixed zero
point ``z = 2**(bits-1) - 1`` (7, or 127). The 4-bit schemes depart from MLC in one place: the
attention projections and ``down_proj`` (:data:`FINE_GROUP_LAYERS`), whose rounding errors cost
the most, have a scale per :data:`FINE_GROUP_SIZE` weights (0.625 bytes per weight instead of
0.5625); the gate/up projection and the embedding keep groups of 32. A code ``q`` in
``0 .. 2**bits - 1`` stands for::

    w' = (q - z) * scale

so the levels are ``-z .. z + 1`` times the scale, and a negative scale mirrors them. Each group's
scale is the one, among candidates around ``± max|w| / z``, with the least squared error
(:meth:`GroupQuantization.best_scales`); MLC's plain ``max|w| / z`` is one of the candidates, so
the error is never larger than its. Why search: the weights of a GGUF source are often already on
llama.cpp's asymmetric ``Q4_1`` grid, which plain absmax maps badly onto a symmetric one; trying
other top levels, the mirrored grid and a least-squares refit recovers much of that loss.
Calibration (activation statistics, ``compiler.calibration``) weighs each channel's error by its
mean ``x²``, and rounds the logits weight by GPTQ. Groups of 16 everywhere would weigh more than
the 0.6 bytes per parameter that 4-bit models are held to, so only some layers get them: the
attention and down projections, not the gate/up projection (half the linear weights) nor the tied
embedding (which gains nothing from finer groups).
Scales are stored as float16 even when the model computes in float32: it keeps 4-bit weights at
0.5625 bytes per parameter in groups of 32, 0.625 in groups of 16 (float32 scales would make them
0.625 and 0.75).

Every ``nn.Linear`` whose input dimension is a multiple of the group size, and the token
embedding (which also serves the tied logits), are quantized; anything else stays in the model
dtype. The dequantize is a TE ``dequantize`` op feeding the matmul, so that FuseOps/FuseTIR fuse
it into the matmul kernel and decode reads the packed weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .errors import PassError

GROUP_SIZE = 32
# The group size of the 4-bit schemes' attention projections and down_proj (see the docstring).
FINE_GROUP_SIZE = 16
FINE_GROUP_LAYERS = ("qkv_proj", "o_proj", "down_proj")
# Names of the stored parts of a quantized weight ``<prefix>.weight``.
Q_WEIGHT, Q_SCALE = "q_weight", "q_scale"
SCALE_DTYPE = "float16"
# Where the largest weight of a group may land, as fractions of the top level z + 1: candidates of
# the scale search, densest near the top. Each one costs the search a pass over every weight.
_TOP_LEVEL_FRACTIONS = np.array([0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.9375, 0.97, 1.0], np.float32)
# The least weight a channel has in an importance-weighted search, relative to the mean.
_MIN_CHANNEL_WEIGHT = 1e-6
# Weights per chunk of the search: its float32 temporaries (4 MB each) stay in cache.
_CHUNK_ELEMENTS = 1 << 20


@dataclasses.dataclass(frozen=True)
class QuantizationScheme:
    """A way to store weights; ``q0`` schemes keep every weight unquantized in ``model_dtype``."""

    name: str
    model_dtype: str
    description: str

    @property
    def calibrates(self) -> bool:
        """Whether compiling at this scheme measures activation statistics by default (see
        ``compiler.calibration``): worth it where rounding error is large, at 4 bits."""
        return False

    def quantize_module(self, module: nn.Module) -> nn.Module:
        """Rewrite the module's layers for this scheme (unquantized schemes keep it as it is)."""
        return module

    def notes(self, params: list[tuple[str, tuple[int, ...], str]]) -> list[str]:  # pylint: disable=unused-argument
        """What the compile should tell the user about how these parameters ``(name, shape,
        dtype)`` are stored, beyond the scheme's name."""
        return []

    def keeps_blocks(self, name: str, shape: tuple[int, ...]) -> bool:  # pylint: disable=unused-argument
        """Whether the parameter is converted from the source's raw GGUF blocks rather than from
        float32 values (only the ``gguf`` scheme's are)."""
        return False

    def convert(self, name: str, array: np.ndarray, importance: np.ndarray | None = None,
                hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One parameter of the unquantized module → the arrays stored for it, by parameter name.
        ``importance`` and ``hessian`` (activation statistics, see :meth:`GroupQuantization.quantize`)
        matter only to quantized parameters."""
        return {name: array.astype(self.model_dtype)}


@dataclasses.dataclass(frozen=True)
class GroupQuantization(QuantizationScheme):
    """Symmetric ``bits``-bit group quantization (see the module docstring for the exact rule)."""

    bits: int = 4
    # Parameters (by the last part of their name, e.g. ``down_proj``) stored in groups of
    # FINE_GROUP_SIZE rather than GROUP_SIZE: see the module docstring.
    fine_groups: tuple[str, ...] = ()

    @property
    def zero_point(self) -> int:
        """The code that stands for 0 and the largest magnitude a code reaches (7 or 127)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def per_word(self) -> int:
        """Codes per uint32."""
        return 32 // self.bits

    @property
    def calibrates(self) -> bool:
        return self.bits <= 4

    def group_size(self, name: str) -> int:
        """The weights per scale of the parameter ``name`` (``<prefix>.weight``)."""
        layer = name.rsplit(".", 2)[-2] if name.count(".") else name
        return FINE_GROUP_SIZE if layer in self.fine_groups else GROUP_SIZE

    def quantizes(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether the parameter ``name`` of the unquantized module is stored quantized."""
        return name.endswith(".weight") and len(shape) == 2 and shape[1] % self.group_size(name) == 0

    def quantize_module(self, module: nn.Module) -> nn.Module:
        return _Quantizer(self).visit("", module)

    def convert(self, name: str, array: np.ndarray, importance: np.ndarray | None = None,
                hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if not self.quantizes(name, array.shape):
            return super().convert(name, array)
        q_weight, q_scale = self.quantize(array, importance, hessian, self.group_size(name))
        prefix = name[: -len("weight")]
        return {prefix + Q_WEIGHT: q_weight, prefix + Q_SCALE: q_scale}

    # ---- the numbers ------------------------------------------------------------------------
    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None,
                 hessian: np.ndarray | None = None, group_size: int = GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """``w`` of shape (rows, k) → packed codes (rows, k / per_word) uint32 and scales
        (rows, k / group_size) float16.

        ``importance`` (k,), if given, weighs each input channel's squared error in the scale
        search: with E[x_j²] of the inputs the weight meets, the search minimises the expected
        squared error of the layer's outputs (for uncorrelated inputs), not of its weights.
        ``hessian`` (k, k), E[x xᵀ], if given, rounds by GPTQ (:func:`_gptq`)."""
        if hessian is not None:
            return _gptq(self, w, hessian, group_size)
        rows, k = w.shape
        groups = w.astype(np.float32).reshape(rows, k // group_size, group_size)
        scale = self.best_scales(groups, _channel_weights(importance, k, group_size))
        return self.pack(self.levels(groups, scale.astype(np.float32)[..., None])), scale

    def pack(self, levels: np.ndarray) -> np.ndarray:
        """Levels ``-z .. z + 1`` (rows, ..., k) → codes packed into uint32 (rows, k / per_word)."""
        codes = (levels.reshape(len(levels), -1) + self.zero_point).astype(np.uint32)
        codes = codes.reshape(len(codes), -1, self.per_word)
        shifts = np.arange(self.per_word, dtype=np.uint32) * self.bits
        return np.bitwise_or.reduce(codes << shifts, axis=-1).astype(np.uint32)

    def best_scales(self, groups: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """The float16 scale of each group (rows, groups, group size) with the least squared
        error (weighted by ``weights`` (groups, group size) if given): among ``± max|w| / t`` for
        a few ``t`` up to the top level ``z + 1``, each also refitted by least squares to the
        codes it gives, and MLC's ``max|w| / z`` rounded up. Rows go in chunks whose temporaries
        stay in cache."""
        weights = np.ones(groups.shape[1:], np.float32) if weights is None else weights
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // (groups.shape[1] * groups.shape[2]))
        return np.concatenate([self._search(groups[r:r + rows_per_chunk], weights)
                               for r in range(0, len(groups), rows_per_chunk)])

    def _search(self, groups: np.ndarray, weights: np.ndarray) -> np.ndarray:
        signed_max = np.take_along_axis(groups, np.abs(groups).argmax(-1)[..., None], -1)
        best = _round_up_to_float16(np.abs(signed_max) / self.zero_point)
        best_error = self._squared_error(groups, best, weights)
        for top in (self.zero_point + 1) * _TOP_LEVEL_FRACTIONS:
            for sign in (1, -1):
                candidate = (sign * signed_max / top).astype(np.float16)
                for scale in (candidate, self._refit(groups, candidate, weights)):
                    error = self._squared_error(groups, scale, weights)
                    better = error < best_error
                    best, best_error = np.where(better, scale, best), np.where(better, error, best_error)
        return best[..., 0]

    def levels(self, groups: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Levels ``-z .. z + 1`` of ``groups`` at float32 ``scale`` (a zero scale gives 0)."""
        levels = np.divide(groups, np.where(scale == 0, np.float32(1), scale))
        np.rint(levels, out=levels)
        return np.clip(levels, -self.zero_point, self.zero_point + 1, out=levels)

    def _squared_error(self, groups: np.ndarray, scale16: np.ndarray, weights: np.ndarray) -> np.ndarray:
        scale = scale16.astype(np.float32)
        error = self.levels(groups, scale)
        np.multiply(error, scale, out=error)
        np.subtract(error, groups, out=error)
        return np.einsum("rgk,gk,rgk->rg", error, weights, error)[..., None]

    def _refit(self, groups: np.ndarray, scale16: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The (weighted) least-squares scale for the levels ``scale16`` gives:
        sum(h w q) / sum(h q q)."""
        levels = self.levels(groups, scale16.astype(np.float32))
        weighted = levels * weights
        norm = np.einsum("rgk,rgk->rg", weighted, levels)[..., None]
        fitted = np.einsum("rgk,rgk->rg", groups, weighted)[..., None] / np.where(norm == 0, 1, norm)
        return fitted.astype(np.float16)

    def dequantize(self, q_weight: np.ndarray, q_scale: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`quantize` (up to the rounding), in float32: the numpy reference
        of the ``dequantize`` op the compiled model runs. The group size is the shapes' ratio."""
        rows, words = q_weight.shape
        shifts = np.arange(self.per_word, dtype=np.uint32) * self.bits
        codes = (q_weight[..., None] >> shifts) & np.uint32((1 << self.bits) - 1)
        values = codes.reshape(rows, q_scale.shape[1], -1).astype(np.float32) - self.zero_point
        return (values * q_scale.astype(np.float32)[..., None]).reshape(rows, words * self.per_word)

    def dequantize_op(self, q_weight: Tensor, q_scale: Tensor, dtype: str) -> Tensor:
        """The TE ``dequantize`` op: packed (rows, k / per_word), scales (rows, k / group size)
        → (rows, k) in ``dtype``. Injective, so FuseOps fuses it into the matmul that reads it."""
        bits, per_word, zero = self.bits, self.per_word, self.zero_point
        mask = (1 << bits) - 1
        group_size = int(q_weight.shape[-1]) * per_word // int(q_scale.shape[-1])

        def compute(packed: te.Tensor, scale: te.Tensor) -> te.Tensor:
            rows, words = packed.shape

            def element(i, j):
                shift = (j % per_word * bits).astype("uint32")
                code = tirx.bitwise_and(tirx.shift_right(packed[i, j // per_word], shift), tirx.const(mask, "uint32"))
                # Through int32: uint32 → float has no AVX2 instruction, int32 → float does.
                value = code.astype("int32").astype(dtype) - tirx.const(zero, dtype)
                return value * scale[i, j // group_size].astype(dtype)

            return te.compute((rows, words * per_word), element, name="dequantize")

        return op.tensor_expr_op(compute, "dequantize", [q_weight, q_scale])


# GPTQ adds this to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned where
# calibration saw little energy.
GPTQ_DAMPING = 0.1


def _gptq(scheme: GroupQuantization, w: np.ndarray, hessian: np.ndarray,
          group_size: int = GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al., 2022): round ``w``'s columns one at a time and push each column's
    rounding error onto the columns not yet rounded, through the inverse of its inputs' second
    moment ``H = E[x xᵀ]``, so that errors cancel in ``W x`` instead of adding up. Each group's
    scale is chosen (weighted by ``diag(H)``) when the group is reached; the result is stored as
    :meth:`GroupQuantization.quantize` stores it."""
    rows, k = w.shape
    upper = _inverse_cholesky(hessian)
    energy = np.diag(hessian).astype(np.float32)
    work = w.astype(np.float32).copy()
    levels = np.empty((rows, k), np.float32)
    scales = np.empty((rows, k // group_size), np.float16)
    for g in range(k // group_size):
        start, stop = g * group_size, (g + 1) * group_size
        block = work[:, start:stop]
        weights = energy[start:stop] / max(float(energy.mean()), 1e-30)
        scales[:, g] = scheme.best_scales(block[:, None, :], np.maximum(weights, 1e-6)[None, :])[:, 0]
        scale = scales[:, g : g + 1].astype(np.float32)
        errors = np.empty((rows, group_size), np.float32)
        for j in range(group_size):
            column = start + j
            levels[:, column] = scheme.levels(block[:, j : j + 1], scale)[:, 0]
            errors[:, j] = (block[:, j] - levels[:, column] * scale[:, 0]) / upper[column, column]
            block[:, j + 1 :] -= np.outer(errors[:, j], upper[column, column + 1 : stop])
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    return scheme.pack(levels), scales


def _inverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``), float32."""
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # a channel never seen: its column is rounded on its own
    h[np.diag_indices_from(h)] += GPTQ_DAMPING * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)


def _channel_weights(importance: np.ndarray | None, k: int, group_size: int = GROUP_SIZE) -> np.ndarray | None:
    """Per-channel importance (k,) → search weights (groups, group_size), mean 1; channels the
    calibration never saw (0) keep a small weight, so their group still gets a sensible scale."""
    if importance is None:
        return None
    importance = np.asarray(importance, np.float64).reshape(k)
    if not np.all(np.isfinite(importance)) or importance.min() < 0 or importance.max() <= 0:
        raise PassError("quantization importance must be finite, non-negative and not all zero")
    weights = importance / importance.mean()
    return np.maximum(weights, _MIN_CHANNEL_WEIGHT).astype(np.float32).reshape(k // group_size, group_size)


def _round_up_to_float16(scale: np.ndarray) -> np.ndarray:
    """``scale`` as float16, rounded up where rounding to nearest went down, so that the largest
    weight of a group still has a code (|w| / stored scale <= zero point)."""
    half = scale.astype(np.float16)
    low = half.astype(np.float32) < scale
    return np.where(low, np.nextafter(half, np.float16(np.inf)), half).astype(np.float16)


class GroupQuantizedLinear(nn.Module):
    """``nn.Linear`` with its weight stored as ``q_weight`` / ``q_scale``."""

    def __init__(self, linear: nn.Linear, scheme: GroupQuantization, group_size: int):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.scheme = scheme
        self.q_weight, self.q_scale = _quantized_parameters(self.out_features, self.in_features, scheme, group_size)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        weight = self.scheme.dequantize_op(self.q_weight, self.q_scale, self.dtype)
        # The same permute_dims + matmul nn.Linear emits, so FuseTransposeMatmul applies.
        y = op.matmul(x, op.permute_dims(weight))
        return y + self.bias if self.bias is not None else y


class GroupQuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with its table stored as ``q_weight`` / ``q_scale``: a lookup gathers
    packed rows and dequantizes only those."""

    def __init__(self, embedding: nn.Embedding, scheme: GroupQuantization, dtype: str, group_size: int):
        self.num, self.dim = embedding.num, embedding.dim
        self.dtype = dtype
        self.scheme = scheme
        self.q_weight, self.q_scale = _quantized_parameters(self.num, self.dim, scheme, group_size)

    @property
    def weight(self) -> Tensor:
        """The dequantized table, for code that reads ``embed_tokens.weight`` directly (tied
        logits). Each access emits a ``dequantize`` op, which fuses into the matmul that reads it."""
        return self.scheme.dequantize_op(self.q_weight, self.q_scale, self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        ids = op.reshape(x, (-1,))
        rows = self.scheme.dequantize_op(op.take(self.q_weight, ids, axis=0), op.take(self.q_scale, ids, axis=0),
                                         self.dtype)
        return op.reshape(rows, (*x.shape, self.dim))


def _quantized_parameters(rows: int, k: int, scheme: GroupQuantization,
                          group_size: int) -> tuple[nn.Parameter, nn.Parameter]:
    return (nn.Parameter((rows, k // scheme.per_word), dtype="uint32"),
            nn.Parameter((rows, k // group_size), dtype=SCALE_DTYPE))


class _Quantizer(nn.Mutator):
    """Replaces the layers whose weight ``scheme.quantizes``, MLC-style: the frontends never see it."""

    def __init__(self, scheme: GroupQuantization):
        self.scheme = scheme

    def visit_module(self, name: str, node: nn.Module):
        weight, weight_name = getattr(node, "weight", None), f"{name}.weight"
        group_size = self.scheme.group_size(weight_name)
        if isinstance(node, nn.Linear) and self.scheme.quantizes(weight_name, weight.shape):
            return GroupQuantizedLinear(node, self.scheme, group_size)
        if isinstance(node, nn.Embedding) and self.scheme.quantizes(weight_name, weight.shape):
            return GroupQuantizedEmbedding(node, self.scheme, weight.dtype, group_size)
        return self.visit(name, node)


def group_scheme(bits: int, dtype: str) -> GroupQuantization:
    """The ``q{bits}f{16,32}_1`` scheme."""
    short = {"float32": "f32", "float16": "f16"}[dtype]
    fine = FINE_GROUP_LAYERS if bits == 4 else ()
    groups = f"group {GROUP_SIZE}" + (f", {FINE_GROUP_SIZE} for {' / '.join(fine)}" if fine else "")
    return GroupQuantization(
        f"q{bits}{short}_1", dtype,
        f"{bits}-bit symmetric group quantization ({groups}; float16 scales), computing in {dtype}",
        bits=bits, fine_groups=fine,
    )
