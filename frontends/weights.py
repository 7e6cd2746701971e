"""From a source's HF-named tensors to the module's parameters.

Parameter names equal HF tensor names except for the fused projections below, whose
parameter is the concatenation (along the output rows) of several HF tensors.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .errors import FrontendError
from .sources import BlockTensor, ModelSource

FUSED_PROJECTIONS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}

TensorFixup = Callable[[str, np.ndarray], np.ndarray]


def hf_names(param_name: str) -> list[str]:
    """The HF tensor names a parameter is made of."""
    for fused, parts in FUSED_PROJECTIONS.items():
        if f".{fused}." in param_name:
            return [param_name.replace(f".{fused}.", f".{part}.") for part in parts]
    return [param_name]


def convert_weights(
    source: ModelSource,
    params: list[tuple[str, tuple[int, ...], str]],
    fixup: TensorFixup,
    keeps_blocks: Callable[[str, tuple[int, ...]], bool] | None = None,
) -> Iterator[tuple[str, np.ndarray | list[BlockTensor]]]:
    """Yield ``(param_name, array)`` for every ``(name, shape, dtype)`` the module declares.

    ``fixup(hf_name, tensor)`` applies a family's tensor conventions (layout, offsets) first.
    A parameter for which ``keeps_blocks(name, shape)`` holds is yielded as the GGUF blocks of its
    HF parts instead (a list of :class:`BlockTensor`, see :func:`_block_parts`).
    """
    for name, shape, dtype in params:
        if keeps_blocks is not None and keeps_blocks(name, shape):
            yield name, _block_parts(source, name, shape, fixup)
            continue
        parts = [fixup(hf, source.tensor(hf)) for hf in hf_names(name)]
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if tuple(array.shape) != tuple(shape):
            raise FrontendError(
                f"weight '{name}' has shape {tuple(array.shape)} but the config implies {tuple(shape)}; "
                "config.json and the weights do not belong together"
            )
        yield name, array.astype(dtype)


def _block_parts(source, name: str, shape: tuple[int, ...], fixup: TensorFixup) -> list[BlockTensor]:
    """The raw blocks of each HF part of ``name``. A fixup may only reorder whole rows there
    (llama.cpp's q/k permutation): rows of blocks can be moved, not computed on."""
    parts = []
    for hf in hf_names(name):
        block = source.block_tensor(hf)
        rows = fixup(hf, block.data)
        if rows.dtype != np.uint8 or rows.shape != block.data.shape:
            raise FrontendError(f"{hf}: the family's conversion of this weight needs its values; "
                                "compile with a quantization other than gguf")
        parts.append(BlockTensor(block.ggml_type, rows, block.columns))
    found = (sum(len(p.data) for p in parts), *{p.columns for p in parts})
    if found != tuple(shape):
        raise FrontendError(f"weight '{name}' has shape {found} but the config implies {tuple(shape)}; "
                            "the config and the weights do not belong together")
    return parts
