"""Model families: a HF config becomes an ``nn.Module`` with the shared entry points.

:data:`FAMILIES` is the one registry, from the HF ``architectures[0]`` name to its family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from . import gemma3, llama, olmo
from .causal_lm import ENTRY_POINTS, CausalLM, KVCacheSpec, export_spec
from .config import ModelConfig
from .errors import FrontendError
from .sources import BUNDLED, BlockTensor, GGUFSource, ModelSource, TextModelSource, locate, open_source as _open_source, source_name
from .weights import convert_weights


def _no_fixup(name: str, tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
    return tensor


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its module class and the conventions of its weight files."""

    name: str
    model_class: type[CausalLM]
    gguf_arch: str | None
    hf_fixup: Callable[[str, np.ndarray, ModelConfig], np.ndarray] = _no_fixup
    gguf_fixup: Callable[[str, np.ndarray, ModelConfig], np.ndarray] = _no_fixup
    # The checkpoint is multimodal; relaxlm compiles its language model (see TextModelSource).
    text_model_of_multimodal: bool = False

    @property
    def config_class(self) -> type[ModelConfig]:
        """The family's config dataclass."""
        return self.model_class.config_class


# gguf_arch None: llama.cpp has no architecture name of its own for it (it writes the text model
# of a multimodal Gemma 3 as "gemma3", and OLMo 3 as "olmo2").
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("Llama", llama.LlamaForCausalLM, "llama", gguf_fixup=llama.unpermute_gguf_qk),
    "Gemma3ForCausalLM": Family(
        "Gemma 3", gemma3.Gemma3ForCausalLM, "gemma3",
        hf_fixup=gemma3.fold_norm_offset, gguf_fixup=gemma3.unfold_gguf_norm_offset,
    ),
    "Gemma3ForConditionalGeneration": Family(
        "Gemma 3", gemma3.Gemma3ForCausalLM, None, hf_fixup=gemma3.fold_norm_offset, text_model_of_multimodal=True
    ),
    "OlmoForCausalLM": Family("OLMo", olmo.OlmoForCausalLM, "olmo"),
    "Olmo2ForCausalLM": Family("OLMo 2", olmo.Olmo2ForCausalLM, "olmo2"),
    "Olmo3ForCausalLM": Family("OLMo 3", olmo.Olmo3ForCausalLM, None),
}


def supported_architectures() -> str:
    """The supported HF architecture names, for error messages."""
    return ", ".join(FAMILIES)


def family_for(hf_config: dict[str, Any]) -> tuple[str, Family]:
    """The architecture name and family of a HF config; unknown ones are a clear error."""
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise FrontendError(f"config.json names no 'architectures' (supported: {supported_architectures()})")
    name = architectures[0]
    if name not in FAMILIES:
        raise FrontendError(f"architecture '{name}' is not supported (supported: {supported_architectures()})")
    return name, FAMILIES[name]


def open_source(model) -> ModelSource:
    """Open a HF model directory, a ``.gguf`` file or a bundled alias (see ``sources.BUNDLED``)."""
    by_gguf_arch = {family.gguf_arch: arch for arch, family in FAMILIES.items() if family.gguf_arch}
    source = _open_source(model, by_gguf_arch)
    architecture = (source.config.get("architectures") or [None])[0]
    if architecture in FAMILIES and FAMILIES[architecture].text_model_of_multimodal:
        return TextModelSource(source)
    return source


def tensor_fixup(family: Family, source: ModelSource, config: ModelConfig):
    """The per-tensor conventions to undo for this family and source format."""
    def fixup(name: str, tensor: np.ndarray) -> np.ndarray:
        if isinstance(source, GGUFSource):
            tensor = family.gguf_fixup(name, tensor, config)
        return family.hf_fixup(name, tensor, config)

    return fixup


__all__ = [
    "BUNDLED",
    "BlockTensor",
    "ENTRY_POINTS",
    "FAMILIES",
    "CausalLM",
    "Family",
    "FrontendError",
    "GGUFSource",
    "KVCacheSpec",
    "ModelConfig",
    "ModelSource",
    "convert_weights",
    "export_spec",
    "family_for",
    "locate",
    "open_source",
    "source_name",
    "supported_architectures",
    "tensor_fixup",
]
