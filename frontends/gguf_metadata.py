"""A GGUF file's Hugging Face config and tokenizer, rebuilt from its metadata without PyTorch.

transformers turns GGUF metadata into a config in ``load_gguf_checkpoint``, which refuses to run
without torch and opens the file a second time (slow: it reads the token arrays again). Its key
tables and its tokenizer builders need neither, so this module hands them the fields of the
``gguf.GGUFReader`` the source already holds, with the fix-ups transformers applies on top. The
results are what ``AutoConfig.from_pretrained(dir, gguf_file=name).to_dict()`` and
``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` give (tests/frontends/test_gguf_metadata.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import FrontendError

# The metadata groups that hold config keys, besides the one named after the architecture.
_CONFIG_PREFIXES = ("general", "tokenizer")
# transformers loads the text model of a GGUF under a model type of its own.
_MODEL_TYPE_OF_GGUF_ARCH = {"gemma3": "gemma3_text"}
# The special tokens a tokenizer takes by name, and the ids the GGUF gives for them.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unk_token_id",
    "pad_token": "pad_token_id",
}


class _TableKeepingReader(gguf.GGUFReader):
    """A ``GGUFReader`` that keeps the tensor table it read, so that a file too short for its
    tensors can be told apart from other damage (the reader itself only fails a reshape). It hooks
    a private method: should gguf rename it, the error message only loses the byte counts."""

    def _build_tensors(self, start_offs, fields):
        self.tensor_table = (start_offs, fields)
        super()._build_tensors(start_offs, fields)


def open_reader(path: Path):
    """A ``gguf.GGUFReader`` of ``path``; a truncated or corrupt file is a one-line :class:`FrontendError`."""
    # Made before __init__ runs, so that what it had read is still there when it fails. A file cut
    # short or damaged reads as short or absurd arrays, which the reader trips over in many ways: a
    # failed reshape or view, an index past an empty array, a duplicate key, a huge count.
    reader = object.__new__(_TableKeepingReader)
    try:
        reader.__init__(str(path))
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError) as err:
        raise FrontendError(_unreadable(path, reader, err)) from None
    except OSError as err:
        raise FrontendError(f"cannot read GGUF file {path}: {err.strerror or err}") from None
    return reader


def _unreadable(path: Path, reader, err: Exception) -> str:
    """Why ``reader`` failed on ``path``, in words a user can act on."""
    size = path.stat().st_size
    head = f"cannot read GGUF file {path}:"
    if getattr(reader, "data", None) is not None and bytes(reader.data[:4]) != b"GGUF":
        return f"{head} it is not a GGUF file (it does not start with the GGUF magic bytes)"
    needed = _tensor_data_end(reader)
    if needed is not None and needed > size:
        return f"{head} it is truncated ({size:,} bytes, its tensors need {needed:,}); download it again"
    return f"{head} it is truncated or corrupt ({size:,} bytes; the gguf reader says: {err}); download it again"


def _tensor_data_end(reader) -> int | None:
    """Where the last tensor's data ends by the file's own tensor table; None when the reader did
    not get as far as the table."""
    table = getattr(reader, "tensor_table", None)
    if table is None:
        return None
    start, fields = table
    end = 0
    for field in fields:
        _, _, _, dims, raw_type, offset = field.parts
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
        n_bytes = int(np.prod(dims.astype(np.int64))) * type_size // block_size
        end = max(end, int(start) + int(offset[0]) + n_bytes)
    return end


def _value(reader, key: str) -> Any:
    """The metadata value ``key`` as Python data (a list for an array); None when absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def hf_config(reader, name_or_path: str) -> dict[str, Any]:
    """The HF config dict of the GGUF file ``reader`` reads, as transformers builds it;
    ``name_or_path`` is recorded as ``_name_or_path`` (transformers writes the file's directory)."""
    from transformers import AutoConfig

    # The config class fills in what the file does not state. For Gemma 3 that is the sliding
    # window pattern (every sixth layer global) and the local RoPE base (10000): the model is wrong
    # without them.
    return AutoConfig.for_model(**_stated_config(reader), name_or_path=name_or_path).to_dict()


def _stated_config(reader) -> dict[str, Any]:
    """The config keys the file states, under transformers' names (its ``GGUF_CONFIG_MAPPING``)."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = _value(reader, "general.architecture")
    if arch not in GGUF_CONFIG_MAPPING:
        raise FrontendError(
            f"transformers cannot rebuild a config from a GGUF file of architecture '{arch}'; "
            "convert the Hugging Face checkpoint directory instead"
        )
    # Defaults first: llama.cpp relies on values its metadata does not carry.
    config = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}))
    for prefix in (*_CONFIG_PREFIXES, arch):
        for gguf_key, hf_key in GGUF_CONFIG_MAPPING[prefix].items():
            stated = _value(reader, f"{prefix}.{gguf_key}")
            # None and -1 in the table mean "known to transformers, not a config key".
            if hf_key not in (None, -1) and stated is not None:
                config[hf_key] = stated
    config["model_type"] = _MODEL_TYPE_OF_GGUF_ARCH.get(arch, arch)
    # llama.cpp writes the output projection only when it is not the embedding matrix.
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    if "vocab_size" not in config:
        config["vocab_size"] = len(reader.get_field("tokenizer.ggml.tokens").data)
    return config


def build_tokenizer(reader):
    """The tokenizer transformers builds for the GGUF file ``reader`` reads: the backend from
    transformers' own GGUF converter, wrapped in the class ``AutoTokenizer`` picks for the model."""
    from transformers import TokenizersBackend
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    arch = _value(reader, "general.architecture")
    tokenizer_dict, tokenizer_config = _tokenizer_metadata(reader)
    backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    # Gemma's class, for one, adds a mask token; a model type without a class of its own gets the
    # generic backend, as AutoTokenizer gives it.
    config_class = CONFIG_MAPPING[_MODEL_TYPE_OF_GGUF_ARCH.get(arch, arch)]
    tokenizer_class = TOKENIZER_MAPPING.get(config_class, TokenizersBackend)
    return tokenizer_class(tokenizer_object=backend, **tokenizer_config, **extra)


def _tokenizer_metadata(reader) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tokenizer_dict, tokenizer_config)`` as transformers' ``get_gguf_tokenizer`` reads them
    (it cannot be called here: it opens the file again, through a reader that imports torch)."""
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING

    tokenizer_dict, tokenizer_config = (
        {name: _value(reader, f"tokenizer.{key}") for key, name in GGUF_TOKENIZER_MAPPING[group].items()
         if reader.get_field(f"tokenizer.{key}") is not None}
        for group in ("tokenizer", "tokenizer_config")
    )
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # Older sentencepiece files have no flag, and llama.cpp adds BOS to them unless told not to.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, id_key in _SPECIAL_TOKEN_IDS.items():
        token_id = tokenizer_dict.get(id_key)
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    return tokenizer_dict, tokenizer_config
