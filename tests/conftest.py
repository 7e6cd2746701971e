"""Shared fixtures. The reference is HF transformers on the CPU; every test model is built with
random weights, saved with ``save_pretrained`` and compiled once per session. What the tests
import (the tiny specs' types, the test vocabulary, ``relative_error``) is in ``support``, which
also sets the environment the tests run in."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from relaxlm.compiler import compile_model
from support import TinyModel, TinySpec, build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Callable[[TinySpec], TinyModel]:
    """Builds and compiles a tiny model per spec, once per session."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, TinyModel] = {}

    def get(spec: TinySpec) -> TinyModel:
        if spec.name not in cache:
            cache[spec.name] = build_tiny_model(spec, root)
        return cache[spec.name]

    return get


@pytest.fixture(scope="session")
def tiny_gguf_file(tmp_path_factory) -> Path:
    """The tiny random Llama GGUF of gguf_support (every supported block type), written once."""
    from gguf_support import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' tokenizer and float32 model of the bundled SmolLM2-135M-Instruct GGUF (both
    dequantize it the same way the compiler does), loaded once per session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relaxlm.frontends.sources import resolve_bundled

    gguf_path = resolve_bundled("smollm2-135m")
    directory, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="session")
def bundled_artifacts(tmp_path_factory) -> Callable[..., Path]:
    """A bundled model (``smollm2-135m``, ``gemma3-270m``) compiled for llvm at a quantization
    (and ``activations``: None for the default), once per session."""
    root = tmp_path_factory.mktemp("bundled")
    cache: dict[tuple[str, str, str | None], Path] = {}

    def get(alias: str, quantization: str, activations: str | None = None) -> Path:
        key = alias, quantization, activations
        if key not in cache:
            cache[key] = compile_model(alias, target="llvm", quantization=quantization, activations=activations,
                                       output=root / "-".join([alias, quantization, activations or "default", "llvm"]))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm2_artifacts(bundled_artifacts) -> Callable[[str], Path]:
    """The bundled SmolLM2-135M-Instruct compiled for llvm at a quantization, once per session."""
    return lambda quantization: bundled_artifacts("smollm2-135m", quantization)
