"""A tiny Llama (GQA, tied embeddings) compiled at the group schemes, against transformers.

Two references:
- transformers with every quantized weight replaced by its dequantized value (numpy, the rule of
  ``passes.quantization`` that ``test_quantization`` checks element by element). The compiled
  model computes the same function, so only float32 summation order differs: the fp32 tolerance.
- transformers with the original float32 weights: the quantization error itself, a loose bound.

And the fusion: in ``decode`` every quantized matmul is one kernel that reads the packed uint32
weights; no stand-alone ``dequantize`` kernel is left."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, s_tir
from transformers import LlamaConfig, LlamaForCausalLM

from family_checks import CONTINUATION, PROMPT, TOLERANCE
from llama_specs import BASE
from relaxlm import frontends, passes
from relaxlm.compiler import compile_model
from relaxlm.frontends.weights import FUSED_PROJECTIONS
from relaxlm.passes.pipeline import fusion_passes
from relaxlm.runtime import load
from relaxlm.targets import resolve
from support import relative_error, save_word_tokenizer

# Relative logit error against the float32 model. Absmax groups of 32 Gaussian weights have
# max|w| ≈ 2.2σ, so the step is 2.2σ/7 (4 bits) or 2.2σ/127 (8 bits) and the rounding error's RMS
# is step/√12 ≈ 0.09σ or 0.005σ: each projection's output moves by about 9% or 0.5%. Through two
# layers and the tied logits the 4-bit error measured 0.13, the 8-bit one 0.007; the bounds leave
# about 2x room for other seeds.
FP32_BOUNDS = {"q4f32_1": 0.25, "q8f32_1": 0.02}
# Quantized weights per decoder layer (qkv, o, gate_up, down) and the tied logits.
QUANTIZED_MATMULS = 2 * 4 + 1


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BASE, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    directory = tmp_path_factory.mktemp("quantized") / "llama"
    model.save_pretrained(directory)
    save_word_tokenizer(directory)
    return model, directory


@pytest.fixture(scope="module", params=list(FP32_BOUNDS))
def compiled(request, hf_model):
    _, directory = hf_model
    # Uncalibrated: the reference quantizes each weight by the plain rule (tests/compiler/
    # test_calibration.py covers the calibrated compile).
    artifact = compile_model(directory, target="llvm", quantization=request.param, calibrate=False,
                             output=directory.parent / f"llama-{request.param}")
    return request.param, load(artifact)


def parameter_name(hf_name: str) -> str:
    """The compiled module's parameter an HF tensor is part of (``q_proj`` → ``qkv_proj``): its
    group size is the scheme's for that parameter."""
    for fused, parts in FUSED_PROJECTIONS.items():
        for part in parts:
            hf_name = hf_name.replace(f".{part}.", f".{fused}.")
    return hf_name


def dequantized_copy(model: torch.nn.Module, scheme) -> torch.nn.Module:
    """``model`` with each weight the scheme quantizes replaced by its dequantized value."""
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, param in copy.named_parameters():
            w, group_size = param.numpy(), scheme.group_size(parameter_name(name))
            if scheme.quantizes(name, w.shape):
                param.copy_(torch.from_numpy(scheme.dequantize(*scheme.quantize(w, group_size=group_size))))
    return copy


def logits_of(model) -> list[np.ndarray]:
    with model.new_sequence() as seq:
        return [seq.prefill(PROMPT)] + [seq.decode(t) for t in CONTINUATION]


def reference_logits(model: torch.nn.Module) -> np.ndarray:
    tokens = PROMPT + CONTINUATION
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].numpy()
    # Prefill's logits are those of the prompt's last token; each decode step's, of the next.
    return logits[len(PROMPT) - 1:]


def test_logits_match_the_dequantized_reference(hf_model, compiled):
    name, model = compiled
    expected = reference_logits(dequantized_copy(hf_model[0], passes.get_scheme(name)))
    errors = [relative_error(a, e) for a, e in zip(logits_of(model), expected)]
    assert max(errors) < TOLERANCE, errors


def test_logits_stay_close_to_float32(hf_model, compiled):
    name, model = compiled
    expected = reference_logits(hf_model[0])
    errors = [relative_error(a, e) for a, e in zip(logits_of(model), expected)]
    assert max(errors) < FP32_BOUNDS[name], errors


def fused_decode(directory, quantization: str) -> tvm.IRModule:
    """The exported model after the pipeline's fusion passes (unscheduled)."""
    source = frontends.open_source(directory)
    _, family = frontends.family_for(source.config)
    config = family.config_class.from_hf(source.config)
    scheme = passes.get_scheme(quantization)
    module = scheme.quantize_module(family.model_class(config, dtype=scheme.model_dtype))
    mod, _ = module.export()
    target = resolve("llvm").target
    mod = passes.dispatch_kv_cache(mod, module.kv_cache_spec(), target)
    with target:
        return tvm.transform.Sequential(
            [relax.transform.FuseTransposeMatmul(), relax.transform.LegalizeOps(), *fusion_passes()])(mod)


def decode_kernels(mod: tvm.IRModule) -> list[tuple[tvm.tirx.PrimFunc, list[str]]]:
    """Each kernel ``decode`` calls, with the dtypes of the tensors it is given."""
    calls = []
    relax.analysis.post_order_visit(mod["decode"], lambda e: calls.append(e) if (
        isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get("relax.call_tir"))) else None)
    return [(mod[call.args[0]], [arg.ty.dtype for arg in call.args[1].fields]) for call in calls]


def block_names(func: tvm.tirx.PrimFunc) -> list[str]:
    sch = s_tir.Schedule(func)
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def test_dequantize_fuses_into_the_matmul_that_reads_it(hf_model):
    kernels = decode_kernels(fused_decode(hf_model[1], "q4f32_1"))
    reads_packed = [kernel for kernel, dtypes in kernels if "uint32" in dtypes]
    assert len(reads_packed) == QUANTIZED_MATMULS
    for kernel in reads_packed:
        assert block_names(kernel)[:2] == ["dequantize", "NT_matmul"], block_names(kernel)
    # The residual adds after o_proj and down_proj stay fused as the matmul's epilogue.
    assert sum(block_names(kernel) == ["dequantize", "NT_matmul", "T_add"] for kernel in reads_packed) == 2 * 2
    # No kernel writes a dequantized weight for another to read.
    assert not any(block_names(kernel) == ["dequantize"] for kernel, _ in kernels)


@pytest.mark.parametrize("quantization", ["q0f32", "q4f32_1"])
def test_no_residual_add_runs_as_its_own_kernel(hf_model, quantization):
    """The residual add is fused into the kernel before it (the o_proj / down_proj matmul's
    epilogue), not into the norm after it: the matmul writes the sum that the next block needs as
    its residual anyway, so the hidden state makes one trip through memory either way, and the
    norm, a reduction, stays free to be scheduled on its own."""
    kernels = decode_kernels(fused_decode(hf_model[1], quantization))
    assert not any(block_names(kernel) == ["T_add"] for kernel, _ in kernels)
    with_add = [block_names(kernel) for kernel, _ in kernels if "T_add" in block_names(kernel)]
    assert len(with_add) == 2 * 2 and all(any("matmul" in n for n in names) for names in with_add), with_add
