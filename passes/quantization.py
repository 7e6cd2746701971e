"""Quantization schemes, named as users know them from MLC LLM (``q0f32``, ``q4f16_1`` …).

A scheme says which dtype the model computes in and how each weight is stored. The registry
:data:`SCHEMES` is the one place a new scheme is added.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import PassError


@dataclasses.dataclass(frozen=True)
class QuantizationScheme:
    """A way to store weights; ``q0`` schemes keep every weight unquantized in ``model_dtype``."""

    name: str
    model_dtype: str
    description: str

    def quantize_module(self, module):
        """Rewrite the module's layers for this scheme (unquantized schemes keep it as it is)."""
        return module

    def convert(self, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
        """One converted parameter → the arrays stored for it, by parameter name."""
        return {name: array.astype(self.model_dtype)}


SCHEMES: dict[str, QuantizationScheme] = {
    scheme.name: scheme
    for scheme in (
        QuantizationScheme("q0f32", "float32", "no quantization, float32"),
        QuantizationScheme("q0f16", "float16", "no quantization, float16"),
    )
}


def get_scheme(name: str) -> QuantizationScheme:
    """The scheme called ``name``; an unknown name is a :class:`PassError` listing the known ones."""
    if name not in SCHEMES:
        raise PassError(f"unknown quantization '{name}' (known: {', '.join(SCHEMES)})")
    return SCHEMES[name]
