"""``gguf``: a GGUF file run at its own precision, llama.cpp's quantized blocks kept as they are.

Requantizing a GGUF's weights to another grid adds a second rounding error on top of llama.cpp's
(Gemma 3 270M's perplexity rose by half at q4f32_1). This scheme stores each weight of a
supported block type (:data:`.gguf_blocks.LAYOUTS`) as the block's own codes and scales, split
losslessly into typed arrays, and computes with exactly the values ``gguf.quants.dequantize``
gives; the model computes in float32. Tensors stored as floats in the file stay floats (float32);
a weight of a block type not supported yet is stored by the scheme's ``fallback`` (``q8f32_1``:
8-bit groups, the least added error of the group schemes) and the compile says so.

A fused projection (``qkv_proj``, ``gate_up_proj``) whose parts are of one type is one weight (its
parts' block rows, concatenated); if llama.cpp gave the parts different types (Q4_K_M files mix
Q5_0 and Q8_0 among q, k and v), each part is its own weight and matmul, and the outputs are
concatenated.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np
from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from relaxlm.frontends.sources import BlockTensor
from relaxlm.frontends.weights import hf_names

from .errors import PassError
from .gguf_blocks import LAYOUTS, BlockLayout
from .quantization import GroupQuantization, GroupQuantizedEmbedding, GroupQuantizedLinear, QuantizationScheme

# How each parameter of the unquantized module is stored.
NATIVE, FLOAT, FALLBACK_GROUPS = "native", "float", "fallback"
# GGUF types that hold plain floats.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# The name of a weight part's components: ``<prefix>parts.<i>.<component>``.
PARTS = "parts"
# TE block attribute naming the layout of a dequantize (for the CPU kernels).
LAYOUT_ATTR = "gguf_type"


@dataclasses.dataclass(frozen=True)
class GGUFNative(QuantizationScheme):
    """The ``gguf`` scheme; :meth:`for_source` binds it to a file's tensor types."""

    fallback: GroupQuantization | None = None
    # HF tensor name -> its GGUF type name ("Q4_K", "F32") and rows; the type is None where the
    # source has no GGUF types (a Hugging Face directory).
    tensor_info: Callable[[str], tuple[str | None, int]] | None = None

    def for_source(self, tensor_info: Callable[[str], tuple[str | None, int]]) -> "GGUFNative":
        """This scheme for a source whose tensors have these GGUF types and rows."""
        return dataclasses.replace(self, tensor_info=tensor_info)

    def types_of(self, name: str) -> list[str | None]:
        """The GGUF types of the HF tensors the parameter ``name`` is made of."""
        return [ggml_type for ggml_type, _ in self.parts_of(name)]

    def parts_of(self, name: str) -> list[tuple[str | None, int]]:
        """``(GGUF type, rows)`` of each HF tensor the parameter ``name`` is made of."""
        if self.tensor_info is None:
            raise PassError("quantization 'gguf' needs a GGUF file as its input")
        return [self.tensor_info(hf) for hf in hf_names(name)]

    def storage(self, name: str, shape: tuple[int, ...]) -> str:
        """How the parameter ``name`` is stored: :data:`NATIVE`, :data:`FLOAT` or
        :data:`FALLBACK_GROUPS`."""
        types = self.types_of(name)
        if not name.endswith(".weight") or len(shape) != 2 or all(t is None or t in FLOAT_TYPES for t in types):
            return FLOAT
        if all(t in LAYOUTS and shape[1] % LAYOUTS[t].block == 0 for t in types):
            return NATIVE
        return FALLBACK_GROUPS if self.fallback.quantizes(name, shape) else FLOAT

    def runs_natively(self, types: set[str]) -> bool:
        """Whether weights of these GGUF types are all kept as they are (supported blocks or floats)."""
        return all(t in LAYOUTS or t in FLOAT_TYPES for t in types)

    def plan(self, params: Sequence[tuple[str, tuple[int, ...], str]]) -> dict[str, str]:
        """:meth:`storage` of every parameter ``(name, shape, dtype)`` of the unquantized module."""
        return {name: self.storage(name, shape) for name, shape, _ in params}

    def notes(self, params: Sequence[tuple[str, tuple[int, ...], str]]) -> list[str]:
        plan = self.plan(params)
        fallen = [name for name, storage in plan.items() if storage == FALLBACK_GROUPS]
        if not fallen:
            return []
        types = ", ".join(sorted({t for name in fallen for t in self.types_of(name) if t not in LAYOUTS}))
        quantized = sum(storage != FLOAT for storage in plan.values())
        return [f"weights in block types relaxlm does not run natively yet ({types}: {len(fallen)} of {quantized}) "
                f"are stored as {self.fallback.name}"]

    def keeps_blocks(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether the parameter is stored as the file's blocks (its conversion reads them raw)."""
        return self.storage(name, shape) == NATIVE

    def quantize_module(self, module: nn.Module) -> nn.Module:
        return _GGUFQuantizer(self).visit("", module)

    def convert(self, name: str, array, importance=None, hessian=None) -> dict[str, np.ndarray]:
        """``array``: float32 weights, or for a native parameter the blocks of its parts (a list
        of ``frontends.BlockTensor``)."""
        if isinstance(array, np.ndarray):
            if self.storage(name, array.shape) == FALLBACK_GROUPS:
                return self.fallback.convert(name, array, importance, hessian)
            return super().convert(name, array)
        prefix = name[: -len("weight")]
        return {f"{prefix}{PARTS}.{i}.{component}": values
                for i, part in enumerate(_merged(array))
                for component, values in LAYOUTS[part.ggml_type].split(part.data).items()}


def _merged(parts: list[BlockTensor]) -> list[BlockTensor]:
    """Consecutive parts of one type as one (their block rows concatenated)."""
    merged = []
    for ggml_type, group in itertools.groupby(parts, key=lambda p: p.ggml_type):
        group = list(group)
        merged.append(BlockTensor(ggml_type, np.concatenate([p.data for p in group]), group[0].columns))
    return merged


def dequantize_op(layout: BlockLayout, components: list[Tensor], rows: int, cols: int) -> Tensor:
    """The TE ``dequantize`` op of one block weight: its components → ``(rows, cols)`` float32.
    Injective, and fused into the matmul that reads it (``passes.fusion``)."""

    def compute(*tensors: te.Tensor) -> te.Tensor:
        named = {c.name: t for c, t in zip(layout.components, tensors)}
        return te.compute((rows, cols), lambda j, col: layout.value(named, j, col), name="dequantize",
                          attrs={LAYOUT_ATTR: layout.name})

    return op.tensor_expr_op(compute, "dequantize", components)


class BlockWeight(nn.Module):
    """One weight stored as a block layout's components."""

    def __init__(self, layout: BlockLayout, rows: int, cols: int):
        self.layout, self.rows, self.cols = layout, rows, cols
        blocks = cols // layout.block
        for component in layout.components:
            setattr(self, component.name, nn.Parameter((rows, blocks * component.per_block), dtype=component.dtype))

    def components(self) -> list[Tensor]:
        """The component parameters, in the layout's order."""
        return [getattr(self, c.name) for c in self.layout.components]

    def dequantize(self) -> Tensor:
        """The whole weight, float32 (fused into its consumer)."""
        return dequantize_op(self.layout, self.components(), self.rows, self.cols)

    def dequantize_rows(self, ids: Tensor) -> Tensor:
        """The rows ``ids`` only (an embedding lookup)."""
        gathered = [op.take(c, ids, axis=0) for c in self.components()]
        return dequantize_op(self.layout, gathered, ids.shape[0], self.cols)


class GGUFLinear(nn.Module):
    """``nn.Linear`` over block weights ``(layout, rows)``, one per run of a fused projection's
    parts of one type; their outputs are concatenated."""

    def __init__(self, linear: nn.Linear, parts: list[tuple[BlockLayout, int]]):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.parts = nn.ModuleList([BlockWeight(layout, rows, self.in_features) for layout, rows in parts])

    def forward(self, x: Tensor) -> Tensor:
        # The same permute_dims + matmul as nn.Linear, so FuseTransposeMatmul applies.
        outputs = [op.matmul(x, op.permute_dims(part.dequantize())) for part in self.parts]
        y = outputs[0] if len(outputs) == 1 else op.concat(outputs, dim=-1)
        return y + self.bias if self.bias is not None else y


class GGUFEmbedding(nn.Module):
    """``nn.Embedding`` over one block weight; a lookup dequantizes only the rows it gathers."""

    def __init__(self, embedding: nn.Embedding, ggml_type: str):
        self.num, self.dim = embedding.num, embedding.dim
        self.parts = nn.ModuleList([BlockWeight(LAYOUTS[ggml_type], self.num, self.dim)])

    @property
    def weight(self) -> Tensor:
        """The dequantized table, for the tied logits (fused into their matmul)."""
        return self.parts[0].dequantize()

    def forward(self, x: Tensor) -> Tensor:
        rows = self.parts[0].dequantize_rows(op.reshape(x, (-1,)))
        return op.reshape(rows, (*x.shape, self.dim))


class _GGUFQuantizer(nn.Mutator):
    """Replaces every linear layer and embedding by its storage (see :meth:`GGUFNative.storage`)."""

    def __init__(self, scheme: GGUFNative):
        self.scheme = scheme

    def visit_module(self, name: str, node: nn.Module):
        weight = getattr(node, "weight", None)
        if not isinstance(node, (nn.Linear, nn.Embedding)):
            return self.visit(name, node)
        weight_name, shape = f"{name}.weight", tuple(int(d) for d in weight.shape)
        storage = self.scheme.storage(weight_name, shape)
        fallback = self.scheme.fallback
        if storage == FALLBACK_GROUPS and isinstance(node, nn.Linear):
            return GroupQuantizedLinear(node, fallback, fallback.group_size(weight_name))
        if storage == FALLBACK_GROUPS:
            return GroupQuantizedEmbedding(node, fallback, weight.dtype, fallback.group_size(weight_name))
        if storage == FLOAT:
            return node
        parts = _runs(self.scheme.parts_of(weight_name))
        if isinstance(node, nn.Embedding):
            return GGUFEmbedding(node, parts[0][0].name)
        return GGUFLinear(node, parts)


def _runs(parts: list[tuple[str, int]]) -> list[tuple[BlockLayout, int]]:
    """Consecutive parts ``(type, rows)`` of one type as one ``(layout, rows)``, as :func:`_merged`
    stores them."""
    return [(LAYOUTS[ggml_type], sum(rows for _, rows in group))
            for ggml_type, group in itertools.groupby(parts, key=lambda p: p[0])]


__all__ = ["FALLBACK_GROUPS", "FLOAT", "GGUFNative", "LAYOUT_ATTR", "NATIVE", "dequantize_op"]
