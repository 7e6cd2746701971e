"""Config dataclasses built from a Hugging Face ``config.json``.

Every family's config derives from :class:`ModelConfig`. Keys that a family reads are consumed
through :class:`HFConfigReader`; every other key is kept in ``extra`` so that nothing is silently
dropped, and a key that would change the math but is not supported is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .errors import FrontendError
from .hf_config import HFConfigReader
from .rope import RopeParameters, rope_from_dict, rope_parameters_from_hf

# Keys that never change the math of inference (bookkeeping, training, generation defaults).
_INERT_KEYS = frozenset(
    """architectures model_type transformers_version torch_dtype dtype use_cache initializer_range
    bos_token_id eos_token_id pad_token_id unk_token_id attention_dropout output_hidden_states
    output_attentions return_dict chunk_size_feed_forward is_encoder_decoder id2label label2id
    problem_type _name_or_path _model_name_or_path tokenizer_class vocab_file pretraining_tp
    tie_encoder_decoder torchscript pruned_heads max_length""".split()
)


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
            hidden_act=r.require(cls.activation_key(), cls.supported_activations, cls.supported_activations[0]),
            tie_word_embeddings=r.get("tie_word_embeddings", False),
            context_window_size=r.get("max_position_embeddings"),
            rope=cls.read_rope(r),
            attention_bias=r.get("attention_bias", False),
            mlp_bias=r.get("mlp_bias", False),
        )

    @classmethod
    def norm_eps_key(cls) -> str:
        """The config key of the norm epsilon (``rms_norm_eps`` for most families)."""
        return "rms_norm_eps"

    @classmethod
    def activation_key(cls) -> str:
        """The config key of the MLP activation (``hidden_act`` for most families)."""
        return "hidden_act"

    @classmethod
    def read_rope(cls, r: HFConfigReader) -> RopeParameters:
        """The RoPE of the full-attention layers."""
        return rope_parameters_from_hf(r)

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

    def layer_rope(self, layer_id: int) -> RopeParameters:
        """The RoPE of one layer (the same for every layer unless a family says otherwise)."""
        return self.rope


# HF ``layer_types`` values → the KV cache's attention kinds.
ATTENTION_KINDS = {"full_attention": "mha", "sliding_attention": "mha_sliding"}


@dataclasses.dataclass
class LayerTypesConfig(ModelConfig):
    """A config whose layers each use full or sliding-window attention (HF ``layer_types``), each
    kind with its own RoPE (Gemma 3, OLMo 3). ``rope`` is the full-attention layers' RoPE, the only
    one that rope scaling applies to; ``sliding_rope`` is the sliding layers'."""

    layer_types: list[str] = dataclasses.field(default_factory=list)
    window: int | None = None
    sliding_rope: RopeParameters | None = None

    default_theta: ClassVar[float] = 10000.0

    @classmethod
    def default_layer_types(cls, r: HFConfigReader, num_layers: int) -> list[str]:
        """The layer types of a config that does not list them (older configs)."""
        raise NotImplementedError

    @classmethod
    def legacy_sliding_theta(cls, r: HFConfigReader) -> float:
        """The sliding layers' RoPE base in a config without per-layer-type ``rope_parameters``."""
        raise NotImplementedError

    @classmethod
    def _layer_type_rope(cls, r: HFConfigReader, layer_type: str) -> RopeParameters:
        params = r.get("rope_parameters", None) or {}
        if layer_type in params:
            return rope_from_dict(dict(params[layer_type]), r.family, cls.default_theta)
        if params:
            # transformers 5 silently replaces a flat rope_parameters by its per-type defaults here.
            raise FrontendError(
                f"{r.family}: rope_parameters must be keyed by layer type ({', '.join(ATTENTION_KINDS)})"
            )
        if layer_type == "sliding_attention":
            return RopeParameters("default", float(cls.legacy_sliding_theta(r)))
        legacy = {**(r.get("rope_scaling", None) or {}), "rope_theta": r.get("rope_theta", cls.default_theta)}
        return rope_from_dict(legacy, r.family, cls.default_theta)

    @classmethod
    def read_rope(cls, r: HFConfigReader) -> RopeParameters:
        return cls._layer_type_rope(r, "full_attention")

    @classmethod
    def read_family(cls, r: HFConfigReader) -> dict[str, Any]:
        num_layers = r.get("num_hidden_layers")
        layer_types = list(r.get("layer_types", None) or cls.default_layer_types(r, num_layers))
        unknown = sorted(set(layer_types) - set(ATTENTION_KINDS))
        if unknown or len(layer_types) != num_layers:
            raise FrontendError(
                f"{r.family}: layer_types must name {num_layers} layers, each one of "
                f"{', '.join(ATTENTION_KINDS)} (got {layer_types})"
            )
        window = r.get("sliding_window") if "sliding_attention" in layer_types else None
        return dict(layer_types=layer_types, window=window, sliding_rope=cls._layer_type_rope(r, "sliding_attention"))

    @property
    def sliding_window(self) -> int | None:
        return self.window

    @property
    def attention_kinds(self) -> list[str]:
        return [ATTENTION_KINDS[t] for t in self.layer_types]

    def layer_rope(self, layer_id: int) -> RopeParameters:
        return self.sliding_rope if self.layer_types[layer_id] == "sliding_attention" else self.rope
