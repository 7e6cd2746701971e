"""The blocks that model families share, each parameterised by the family's config.

Parameter names follow Hugging Face's, so the weight map is the identity except where two HF
tensors are fused into one (see ``weights.FUSED_PROJECTIONS``).
"""

from __future__ import annotations

from typing import Callable

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .rope import RopeParameters

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": op.silu,
    "gelu_pytorch_tanh": lambda x: op.gelu(x, approximate="tanh"),
}


def rms_norm(hidden_size: int, eps: float, dtype: str) -> nn.Module:
    """RMSNorm with a weight and no bias (TVM's default has a bias)."""
    return nn.RMSNorm(hidden_size, -1, eps, bias=False, dtype=dtype)


class Rotations:
    """RoPE for one forward call: the cos and sin of every token's angles are computed once per
    distinct RoPE (Gemma 3 has two) and shared by every layer, which then only multiplies and adds;
    computing them in each layer's kernel would cost a cos and a sin per element of q and k."""

    def __init__(self, positions: Tensor, head_dim: int):
        self.positions = positions
        self.head_dim = head_dim
        self._tables: list[tuple[RopeParameters, Tensor]] = []

    def apply(self, x: Tensor, rope: RopeParameters) -> Tensor:
        """``x`` (tokens, heads, head_dim) rotated by each token's position."""
        return apply_rope(x, self.table(rope))

    def table(self, rope: RopeParameters) -> Tensor:
        """(2, tokens, head_dim // 2) float32: cos and sin of the angles, times the attention factor."""
        for known, table in self._tables:
            if known == rope:
                return table
        table = rope_table(self.positions, rope, self.head_dim)
        self._tables.append((rope, table))
        return table


def rope_table(positions: Tensor, rope: RopeParameters, head_dim: int) -> Tensor:
    """cos and sin (times the attention factor) of each position's angles, in float32 as
    transformers computes them."""
    half = head_dim // 2
    inv_freq = Tensor.from_const(rope.inv_freq(head_dim))
    scale = rope.attention_factor

    def compute(pos: te.Tensor, freq: te.Tensor) -> te.Tensor:
        def entry(part, i, d):
            angle = pos[i].astype("float32") * freq[d]
            return tirx.if_then_else(part == 0, tirx.cos(angle) * scale, tirx.sin(angle) * scale)

        return te.compute((2, pos.shape[0], half), entry, name="rope_table")

    return op.tensor_expr_op(compute, "rope_table", [positions, inv_freq])


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate ``x`` of shape (tokens, heads, head_dim) by the angles of :func:`rope_table`, the way
    transformers does: halves rotated (``rotate_half``)."""
    half = x.shape[-1] // 2

    def compute(x: te.Tensor, table: te.Tensor) -> te.Tensor:
        def rotated(i, h, d):
            value = x[i, h, d].astype("float32")
            partner = tirx.if_then_else(
                d < half, -x[i, h, d + half].astype("float32"), x[i, h, d - half].astype("float32")
            )
            at = tirx.floormod(d, half)
            return (value * table[0, i, at] + partner * table[1, i, at]).astype(x.dtype)

        return te.compute(x.shape, rotated, name="rope")

    return op.tensor_expr_op(compute, "rope", [x, table])


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool, dtype: str):
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(self.act(gate) * up)


class PagedAttention(nn.Module):
    """Self-attention over TVM's paged KV cache, with q/k/v fused into one projection.

    RoPE is applied here (the cache is created with RoPE switched off), so each layer can
    have its own RoPE. ``qk_norm`` normalises q and k before RoPE: ``"per_head"`` (a norm of
    ``head_dim``, Gemma 3) or ``"all_heads"`` (one norm over all heads together, OLMo 2).
    Families change the projected q/k/v further by overriding :meth:`transform_qkv`.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        config,
        layer_id: int,
        dtype: str,
        rope: RopeParameters | None = None,
        qk_norm: str | None = None,
        make_norm: Callable[[int], nn.Module] | None = None,
    ):
        self.layer_id = layer_id
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sm_scale = config.sm_scale
        self.rope = rope or config.rope
        qkv_heads = self.num_q_heads + 2 * self.num_kv_heads
        self.qkv_proj = nn.Linear(
            config.hidden_size, qkv_heads * self.head_dim, bias=config.attention_bias, dtype=dtype
        )
        self.o_proj = nn.Linear(
            self.num_q_heads * self.head_dim, config.hidden_size, bias=config.attention_bias, dtype=dtype
        )
        self.qk_norm = qk_norm
        if qk_norm == "per_head":
            self.q_norm, self.k_norm = make_norm(self.head_dim), make_norm(self.head_dim)
        elif qk_norm == "all_heads":
            self.q_norm = make_norm(self.num_q_heads * self.head_dim)
            self.k_norm = make_norm(self.num_kv_heads * self.head_dim)
        elif qk_norm is not None:
            raise ValueError(f"qk_norm must be None, 'per_head' or 'all_heads', not {qk_norm!r}")

    def transform_qkv(self, qkv: Tensor) -> Tensor:
        """Hook right after the projection; ``qkv`` is (tokens, q_heads + 2 * kv_heads, head_dim)."""
        return qkv

    def transform_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Between projection and RoPE: the q/k norms, if any; q, k are (tokens, heads, head_dim)."""
        if self.qk_norm == "per_head":
            return self.q_norm(q), self.k_norm(k)
        if self.qk_norm == "all_heads":
            return _norm_over_heads(self.q_norm, q), _norm_over_heads(self.k_norm, k)
        return q, k

    def forward(self, x: Tensor, cache: PagedKVCache, rotations: Rotations) -> Tensor:
        batch, seq_len, _ = x.shape
        tokens = batch * seq_len
        qkv = op.reshape(self.qkv_proj(x), (tokens, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))
        qkv = self.transform_qkv(qkv)
        q, k, v = op.split(qkv, [self.num_q_heads, self.num_q_heads + self.num_kv_heads], axis=1)
        q, k = self.transform_qk(q, k)
        q, k = rotations.apply(q, self.rope), rotations.apply(k, self.rope)
        qkv = op.reshape(op.concat([q, k, v], dim=1), (batch, seq_len, -1, self.head_dim))
        out = cache.attention_with_fused_qkv(self.layer_id, qkv, self.num_q_heads, sm_scale=self.sm_scale)
        return self.o_proj(op.reshape(out, (batch, seq_len, self.num_q_heads * self.head_dim)))


def _norm_over_heads(norm: nn.Module, x: Tensor) -> Tensor:
    """Apply ``norm`` to (tokens, heads, head_dim) as if it were (tokens, heads * head_dim)."""
    tokens, heads, head_dim = x.shape
    return op.reshape(norm(op.reshape(x, (tokens, heads * head_dim))), (tokens, heads, head_dim))


class DecoderLayer(nn.Module):
    """One transformer block: attention then MLP, each a residual branch.

    ``norms`` maps a position in the block to the HF attribute name of the norm there:
    ``pre_attention``, ``post_attention``, ``pre_mlp``, ``post_mlp``. Llama has the two pre
    norms, Gemma 3 all four, OLMo 2 only the two post norms.
    """

    def __init__(self, attention: nn.Module, mlp: nn.Module, norms: dict[str, str], make_norm: Callable):
        self.self_attn = attention
        self.mlp = mlp
        self.norm_names = dict(norms)
        for name in norms.values():
            setattr(self, name, make_norm())

    def _norm(self, position: str, x: Tensor) -> Tensor:
        name = self.norm_names.get(position)
        return getattr(self, name)(x) if name else x

    def forward(self, x: Tensor, cache: PagedKVCache, rotations: Rotations) -> Tensor:
        attn = self.self_attn(self._norm("pre_attention", x), cache, rotations)
        x = x + self._norm("post_attention", attn)
        mlp = self.mlp(self._norm("pre_mlp", x))
        return x + self._norm("post_mlp", mlp)


def last_position(hidden: Tensor) -> Tensor:
    """(b, s, d) → (b, 1, d): the hidden state of the last position of each row."""

    def compute(x: te.Tensor) -> te.Tensor:
        b, s, d = x.shape
        return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_position")

    return op.tensor_expr_op(compute, "last_position", [hidden])


__all__ = [
    "ACTIVATIONS",
    "DecoderLayer",
    "GatedMLP",
    "PagedAttention",
    "Rotations",
    "apply_rope",
    "last_position",
    "rms_norm",
    "rope_table",
]
