"""From a source's HF-named tensors to the module's parameters.

Parameter names equal HF tensor names except for the fused projections below, whose
parameter is the concatenation (along the output rows) of several HF tensors.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .errors import FrontendError
from .sources import ModelSource

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
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(param_name, array)`` for every ``(name, shape, dtype)`` the module declares.

    ``fixup(hf_name, tensor)`` applies a family's tensor conventions (layout, offsets) first.
    """
    for name, shape, dtype in params:
        parts = [fixup(hf, source.tensor(hf)) for hf in hf_names(name)]
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if tuple(array.shape) != tuple(shape):
            raise FrontendError(
                f"weight '{name}' has shape {tuple(array.shape)} but the config implies {tuple(shape)}; "
                "config.json and the weights do not belong together"
            )
        yield name, array.astype(dtype)
