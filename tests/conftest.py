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
def smollm2_artifacts(tmp_path_factory) -> Callable[[str], Path]:
    """The bundled SmolLM2-135M-Instruct compiled for llvm at a quantization, once per session."""
    root = tmp_path_factory.mktemp("smollm2")
    cache: dict[str, Path] = {}

    def get(quantization: str) -> Path:
        if quantization not in cache:
            cache[quantization] = compile_model("smollm2-135m", target="llvm", quantization=quantization,
                                                output=root / f"smollm2-135m-{quantization}-llvm")
        return cache[quantization]

    return get
