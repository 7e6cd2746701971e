"""Passes between the exported module and the target build: quantization, the KV cache for the
target, fusion and scheduling."""

from .errors import PassError
from .kv_cache import dispatch_kv_cache
from .pipeline import relax_pipeline
from .gguf_quantization import GGUFNative
from .quantization import QuantizationScheme
from .schemes import SCHEMES, get_scheme

__all__ = ["SCHEMES", "GGUFNative", "PassError", "QuantizationScheme", "dispatch_kv_cache", "get_scheme", "relax_pipeline"]
