"""AWQ's channel scaling leaves the float model exactly as it was (transformers, before and after
the folds), scales what each family allows and nothing else, and lowers the expected output
error it searches on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import relative_error
from gemma3_specs import GEMMA3_SPECS
from llama_specs import LLAMA_SPECS
from olmo_specs import OLMO_SPECS
from relaxlm import frontends, passes
from relaxlm.frontends.weights import hf_names
from relaxlm.passes import awq

SPECS = {
    "llama": LLAMA_SPECS["mha_llama3_bias_bf16"],  # biases: the v and up biases are divided too
    "llama_gqa": LLAMA_SPECS["gqa_tied_fp16"],
    "gemma3": GEMMA3_SPECS["sliding_global_softcap"],  # four norms per block, GQA
    "olmo2": OLMO_SPECS["olmo2_post_norm_tied_bf16"],  # no pre-norms: only v→o and up→down
    "olmo1": OLMO_SPECS["olmo1_clip_qkv_bias"],  # weightless LayerNorm and clamped v: only up→down
}
# The parameters (per layer) each family's folds change.
CHANGED = {
    "llama": {"input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj", "post_attention_layernorm",
              "mlp.gate_up_proj", "mlp.down_proj"},
    "gemma3": {"input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj", "pre_feedforward_layernorm",
               "mlp.gate_up_proj", "mlp.down_proj"},
    "olmo2": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "olmo1": {"mlp.gate_up_proj", "mlp.down_proj"},
}
CHANGED["llama_gqa"] = CHANGED["llama"]
# The weights whose columns are scaled (the rest of CHANGED absorbs 1 / t).
SCALED = {name: {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
          for name in ("llama", "llama_gqa", "gemma3")}
SCALED.update(olmo2={"self_attn.o_proj", "mlp.down_proj"}, olmo1={"mlp.down_proj"})


def module_arrays(tiny) -> tuple[frontends.Family, frontends.ModelConfig, list[tuple[str, np.ndarray]]]:
    """The tiny model's weights as the compiler converts them (module names, fused projections)."""
    source = frontends.open_source(tiny.hf_dir)
    try:
        _, family = frontends.family_for(source.config)
        config = family.config_class.from_hf(source.config)
        module = family.model_class(config)
        params = [(n, tuple(int(d) for d in p.shape), p.dtype) for n, p in module.named_parameters()]
        return family, config, list(frontends.convert_weights(source, params, frontends.tensor_fixup(family, source, config)))
    finally:
        source.close()


def hf_state(arrays: dict[str, np.ndarray], family: frontends.Family, config, prefix: str) -> dict[str, torch.Tensor]:
    """Module-named arrays back to transformers' names (fused projections split by rows; Gemma's
    norms back to ``w`` from the ``1 + w`` the compiler folds in)."""
    state = {}
    for name, array in arrays.items():
        parts = hf_names(name)
        if len(parts) == 3:
            q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
            pieces = np.split(array, [q, q + kv])
        else:
            pieces = np.split(array, len(parts))
        for part, piece in zip(parts, pieces):
            if family.name == "Gemma 3" and part.endswith("norm.weight"):
                piece = piece - 1
            state[prefix + part] = torch.from_numpy(np.ascontiguousarray(piece, dtype=np.float32))
    return state


@pytest.mark.parametrize("name", list(SPECS))
def test_scaling_is_exact_on_the_float_model(tiny_models, monkeypatch, name):
    tiny = tiny_models(SPECS[name])
    family, config, arrays = module_arrays(tiny)
    rng = np.random.default_rng(0)
    # Skewed energies, and one α (0.5) so that every fold scales by a t far from 1.
    importance = {n: rng.lognormal(0, 2, a.shape[1]) for n, a in arrays if a.ndim == 2 and "embed" not in n}
    monkeypatch.setattr(awq, "ALPHAS", np.array([0.5]))
    plan = awq.folds(family.model_class.layer_norms, family.model_class.attention_class.value_is_linear)
    shape = awq.Shape(config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    scaled_importance = dict(importance)
    scaled = list(awq.scale_channels(iter(arrays), plan, shape, scaled_importance, passes.get_scheme("q4f32_1")))
    assert [n for n, _ in scaled] == [n for n, _ in arrays], "same parameters, same order"
    before, after = dict(arrays), dict(scaled)
    changed = {n.split("layers.0.", 1)[1].rsplit(".", 1)[0] for n in before
               if "layers.0." in n and n.endswith("weight") and not np.array_equal(before[n], after[n])}
    assert changed == CHANGED[name]
    # The scaled weights' inputs are x / t: their energies move with them, and only theirs.
    moved = {n.split("layers.0.", 1)[1].rsplit(".", 1)[0] for n in importance
             if "layers.0." in n and not np.array_equal(scaled_importance[n], importance[n])}
    assert moved == SCALED[name]

    model = tiny.reference
    prefix = "model.language_model." if "language_model" in next(iter(model.state_dict())) else ""
    ids = torch.tensor([[1, 5, 9, 14, 3, 27, 8, 61, 40, 12]])
    with torch.no_grad():
        expected = model(ids).logits.numpy()
        original = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            model.load_state_dict(hf_state(after, family, config, prefix), strict=False)
            actual = model(ids).logits.numpy()
        finally:
            model.load_state_dict(original)
    assert relative_error(actual, expected) < 1e-5


def test_search_never_does_worse_than_no_scaling():
    """α = 0 (t = 1) is on the grid, so the chosen t's sampled error is at most the unscaled one."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    energy = rng.lognormal(0, 2, 128)
    scheme = passes.get_scheme("q4f32_1")

    def error(t):
        restored = scheme.dequantize(*scheme.quantize(w * t, energy / t**2))
        return float((np.square(restored - w * t) * energy / t**2).sum())

    t = awq._best_scale(w, np.sqrt(energy), energy, scheme)
    assert error(t) <= error(np.ones(128, np.float32))
    assert error(t) < 0.9 * error(np.ones(128, np.float32)), "skewed energies gain from scaling"
