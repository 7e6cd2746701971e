"""Config dataclasses built from a Hugging Face ``config.json``.

Every family's config derives from :class:`ModelConfig`. Keys that a family reads are consumed
through :class:`HFConfigReader`; every other key is kept in ``extra`` so that nothing is silently
dropped, and a key that would change the math but is not supported is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .errors import FrontendError
from .rope import RopeParameters, rope_parameters_from_hf

# Keys that never change the math of inference (bookkeeping, training, generation defaults).
_INERT_KEYS = frozenset(
    """architectures model_type transformers_version torch_dtype dtype use_cache initializer_range
    bos_token_id eos_token_id pad_token_id unk_token_id attention_dropout output_hidden_states
    output_attentions return_dict chunk_size_feed_forward is_encoder_decoder id2label label2id
    problem_type _name_or_path _model_name_or_path tokenizer_class vocab_file pretraining_tp
    tie_encoder_decoder torchscript pruned_heads max_length""".split()
)


class HFConfigReader:
    """Reads keys from a HF config dict and remembers which ones were used."""

    def __init__(self, hf: dict[str, Any], family: str):
        self.hf = dict(hf)
        self.family = family
        self.used: set[str] = set()

    def get(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        """The value of ``key``; a missing key without a default is a clear error."""
        self.used.add(key)
        value = self.hf.get(key)
        if value is None:
            if default is dataclasses.MISSING:
                raise FrontendError(f"{self.family} config.json has no '{key}'; is this a {self.family} model?")
            return default
        return value

    def require(self, key: str, allowed: tuple, default: Any = None) -> Any:
        """Like :meth:`get`, but a value outside ``allowed`` is an unsupported-feature error."""
        value = self.get(key, default)
        if value not in allowed:
            raise FrontendError(
                f"{self.family}: {key}={value!r} is not supported (supported: {', '.join(map(repr, allowed))})"
            )
        return value

    def extra(self) -> dict[str, Any]:
        """The keys nobody read: kept with the config, never interpreted."""
        return {k: v for k, v in self.hf.items() if k not in self.used}


@dataclasses.dataclass
class ModelConfig:
    """What every decoder-only family shares. Families add their own fields."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    context_window_size: int
    rope: RopeParameters
    attention_bias: bool = False
    mlp_bias: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    family: ClassVar[str] = "decoder"
    supported_activations: ClassVar[tuple[str, ...]] = ("silu",)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build the config from a HF ``config.json`` dict."""
        reader = HFConfigReader(hf, cls.family)
        fields = cls.read_common(reader)
        fields.update(cls.read_family(reader))
        fields["extra"] = {k: v for k, v in reader.extra().items() if k not in _INERT_KEYS}
        return cls(**fields)

    @classmethod
    def read_common(cls, r: HFConfigReader) -> dict[str, Any]:
        """The fields of :class:`ModelConfig`, read with HF's key names and defaults."""
        hidden = r.get("hidden_size")
        heads = r.get("num_attention_heads")
        return dict(
            vocab_size=r.get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=r.get("intermediate_size"),
            num_hidden_layers=r.get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=r.get("num_key_value_heads", heads),
            head_dim=r.get("head_dim", hidden // heads),
            norm_eps=r.get(cls.norm_eps_key(), 1e-6),
            hidden_act=r.require("hidden_act", cls.supported_activations, cls.supported_activations[0]),
            tie_word_embeddings=r.get("tie_word_embeddings", False),
            context_window_size=r.get("max_position_embeddings"),
            rope=rope_parameters_from_hf(r),
            attention_bias=r.get("attention_bias", False),
            mlp_bias=r.get("mlp_bias", False),
        )

    @classmethod
    def norm_eps_key(cls) -> str:
        """The config key of the norm epsilon (``rms_norm_eps`` for most families)."""
        return "rms_norm_eps"

    @classmethod
    def read_family(cls, r: HFConfigReader) -> dict[str, Any]:
        """Family-specific fields; the default family has none."""
        return {}

    @property
    def sliding_window(self) -> int | None:
        """The sliding-window size when any layer uses one."""
        return None

    @property
    def attention_kinds(self) -> list[str]:
        """Per layer, the KV-cache attention kind: ``mha`` or ``mha_sliding``."""
        return ["mha"] * self.num_hidden_layers

    @property
    def sm_scale(self) -> float:
        """The softmax scale of attention."""
        return self.head_dim**-0.5
