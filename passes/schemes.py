"""The quantization schemes by name: the one table a new scheme is added to."""

from __future__ import annotations

from .errors import PassError
from .gguf_quantization import GGUFNative
from .quantization import QuantizationScheme, group_scheme

SCHEMES: dict[str, QuantizationScheme] = {
    scheme.name: scheme
    for scheme in (
        QuantizationScheme("q0f32", "float32", "no quantization, float32"),
        QuantizationScheme("q0f16", "float16", "no quantization, float16"),
        group_scheme(4, "float32"),
        group_scheme(4, "float16"),
        group_scheme(8, "float32"),
        group_scheme(8, "float16"),
        GGUFNative("gguf", "float32", "a GGUF file's own quantized blocks, bit for bit; computing in float32",
                   fallback=group_scheme(8, "float32")),
    )
}


def get_scheme(name: str) -> QuantizationScheme:
    """The scheme called ``name``; an unknown name is a :class:`PassError` listing the known ones."""
    if name not in SCHEMES:
        raise PassError(f"unknown quantization '{name}' (known: {', '.join(SCHEMES)})")
    return SCHEMES[name]
