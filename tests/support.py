"""What the tests share besides fixtures: the tiny test vocabulary and its tokenizer, the
relative error the comparisons use, and how a tiny model is described (:class:`TinySpec`) and
built (:func:`build_tiny_model`).

Importing this module first sets the environment every test runs in, before TVM or transformers
start: no model hub, TVM's pool on every core, and no thread pinning.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
# TVM pins the main thread to a core on first use, and threads torch starts later inherit the pin.
os.environ.setdefault("TVM_BIND_THREADS", "0")

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch

from relaxlm.compiler import compile_model
from relaxlm.runtime import load

VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """‖actual − expected‖ / ‖expected‖."""
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def save_word_tokenizer(directory: Path, chat_template: str | None = None) -> None:
    """A tiny whitespace word-level tokenizer over the test vocabulary (ids 0–2 special), with
    ``chat_template`` if given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = chat_template
    fast.save_pretrained(directory)


@dataclasses.dataclass
class TinyModel:
    """A random HF model, its saved directory and its compiled artifact."""

    name: str
    reference: torch.nn.Module
    hf_dir: Path
    artifact: Path

    @property
    def model(self):
        """The loaded artifact (loaded once per test model)."""
        if not hasattr(self, "_loaded"):
            self._loaded = load(self.artifact)
        return self._loaded

    def reference_logits(self, token_ids: list[int]) -> np.ndarray:
        """transformers' float32 logits at every position of ``token_ids``."""
        with torch.no_grad():
            return self.reference(torch.tensor([token_ids])).logits[0].float().numpy()


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """How to build one tiny test model."""

    name: str
    make: Callable[[], torch.nn.Module]
    save_dtype: torch.dtype = torch.float32
    shard_size: str | None = None
    compile_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Rewrites the saved config.json (e.g. into an older format) before the reference is loaded.
    edit_config: Callable[[dict], dict] | None = None
    # A Jinja chat template (of vocabulary words) for the saved tokenizer; None: a base model.
    chat_template: str | None = None


def build_tiny_model(spec: TinySpec, root: Path) -> TinyModel:
    """Build the model ``spec`` describes with seeded random weights, save it under ``root`` with
    the word tokenizer, and compile it for llvm at ``q0f32`` (plus ``spec.compile_options``)."""
    torch.manual_seed(0)
    hf_dir = root / spec.name
    model = spec.make().eval().to(spec.save_dtype)
    model.save_pretrained(hf_dir, **({"max_shard_size": spec.shard_size} if spec.shard_size else {}))
    if spec.edit_config:
        config_file = hf_dir / "config.json"
        config_file.write_text(json.dumps(spec.edit_config(json.loads(config_file.read_text()))))
    # The reference is what transformers loads from the directory, computing in float32 with the
    # weights exactly as stored. (Casting the in-memory model back to float32 would keep its RoPE
    # inv_freq buffers rounded to the save dtype: 6e-4 relative error in bf16.)
    reference = type(model).from_pretrained(hf_dir, dtype=torch.float32).eval()
    save_word_tokenizer(hf_dir, spec.chat_template)
    artifact = compile_model(hf_dir, target="llvm", quantization="q0f32", output=root / f"{spec.name}-artifact",
                             **spec.compile_options)
    return TinyModel(spec.name, reference, hf_dir, artifact)


def random_blocks(layout, rows: int, cols: int, seed: int = 0, std: float = 0.02) -> np.ndarray:
    """Raw rows of ``layout``: quantized by the ``gguf`` package where it can quantize the type,
    else random bytes with finite float16 scales of about ``std`` (every bit pattern of the codes
    is a valid block)."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((rows, cols)).astype(np.float32)
    try:
        return gguf.quants.quantize(weights, gguf.GGMLQuantizationType[layout.name])
    except NotImplementedError:
        raw = rng.integers(0, 256, (rows, cols // layout.block * layout.type_size), dtype=np.uint8)
        parts = layout.split(raw)
        for name, halves in float16_views(layout, parts).items():
            parts[name] = (rng.standard_normal(halves.shape) * std).astype(np.float16).view(parts[name].dtype)
        return layout.join(parts)


def float16_views(layout, parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float16 numbers of a layout's components (a ``dm`` word holds two), by component."""
    return {c.name: parts[c.name].view(np.float16) for c in layout.components
            if c.dtype == "float16" or c.name == "dm"}
