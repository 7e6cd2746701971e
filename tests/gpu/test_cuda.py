"""On a CUDA GPU: models built for this GPU against CPU (llvm) artifacts of the same weights (the
references, themselves checked against transformers): the same greedy tokens.

Tiny models at q0f32 (the same arithmetic, only summation order differs); SmolLM2-135M at q4f16_1
against the llvm q4f16_1 artifact (same stored weights, fp16 compute) and at q0f16 against llvm
q0f32. Skipped, with the reason, where TVM sees no CUDA device or there is no nvcc to build with.

Run on an H100 (sm_90) through ``device_check.py`` (artifacts built elsewhere, the same specs,
prompt and token count): the tiny models' tokens equal the CPU's, and SmolLM2 q4f16_1 answers the
question below with the CPU's tokens. SmolLM2 q0f16 (270 MB of weights) has not run on a GPU yet.
"""

from __future__ import annotations

import shutil

import pytest
import tvm

from family_checks import PROMPT, greedy_tokens
from gemma3_specs import GEMMA3_SPECS
from llama_specs import LLAMA_SPECS
from olmo_specs import OLMO_SPECS
from relaxlm.compiler import compile_model
from relaxlm.runtime import load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA device here (tvm.cuda(0).exist is False)"),
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH to build CUDA kernels with"),
]
NEW_TOKENS = 16
SPECS = {
    "llama": LLAMA_SPECS["gqa_tied_fp16"],
    "gemma3": GEMMA3_SPECS["sliding_global_softcap"],
    "olmo3": OLMO_SPECS["olmo3_sliding_yarn"],
}


@pytest.mark.parametrize("family", SPECS)
def test_tiny_model_on_cuda_gives_the_cpu_greedy_tokens(tiny_models, tmp_path, family):
    tiny = tiny_models(SPECS[family])
    # "cuda" with no architecture: this machine's GPU.
    artifact = compile_model(tiny.hf_dir, target="cuda", quantization="q0f32", output=tmp_path / "cuda")
    on_gpu = load(artifact)
    assert on_gpu.device.device_type == tvm.cuda(0).device_type
    assert greedy_tokens(on_gpu, PROMPT, NEW_TOKENS) == greedy_tokens(tiny.model, PROMPT, NEW_TOKENS)


@pytest.mark.real
@pytest.mark.parametrize(("quantization", "cpu_quantization"), [("q4f16_1", "q4f16_1"), ("q0f16", "q0f32")])
def test_smollm2_on_cuda_answers_as_the_cpu(tmp_path_factory, quantization, cpu_quantization):
    root = tmp_path_factory.mktemp("smollm2-gpu")
    cpu = load(compile_model("smollm2-135m", target="llvm", quantization=cpu_quantization, output=root / "cpu"))
    gpu = load(compile_model("smollm2-135m", target="cuda", quantization=quantization, output=root / "cuda"))
    question = "What is the capital of France?"
    assert gpu.generate(question, chat=True, max_tokens=NEW_TOKENS) == cpu.generate(question, chat=True,
                                                                                   max_tokens=NEW_TOKENS)
