"""Bad input gives one line on stderr, a non-zero exit, and no artifact left behind."""

import json
import shutil

import pytest

from cli_support import assert_one_line_error, run_cli
from llama_specs import LLAMA_SPECS


@pytest.fixture(scope="module")
def hf_dir(tiny_models):
    return tiny_models(LLAMA_SPECS["gqa_tied_fp16"]).hf_dir


def _compile_fails(model, tmp_path, *options, expect=(), after_progress=False):
    out = tmp_path / "out"
    result = run_cli("compile", model, "--output", out, *options)
    assert_one_line_error(result, *expect, after_progress=after_progress)
    # Neither the artifact nor its staging directory (".out.*") may remain.
    assert not [p.name for p in tmp_path.iterdir() if "out" in p.name]


def test_missing_path(tmp_path):
    _compile_fails(tmp_path / "nowhere", tmp_path, expect=("no such file or directory",))


def test_directory_without_config(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    _compile_fails(model, tmp_path, expect=("no config.json",))


def test_unsupported_architecture(tmp_path, hf_dir):
    model = tmp_path / "model"
    shutil.copytree(hf_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    _compile_fails(model, tmp_path, expect=("GPT2LMHeadModel", "LlamaForCausalLM"))


def test_truncated_safetensors(tmp_path, hf_dir):
    model = tmp_path / "model"
    shutil.copytree(hf_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _compile_fails(model, tmp_path, expect=("model.safetensors", "truncated"))


def test_weights_that_do_not_fit_the_config_fail_late_and_leave_nothing(tmp_path, hf_dir):
    # The mismatch is found while converting weights, after the library was built in staging.
    model = tmp_path / "model"
    shutil.copytree(hf_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 8
    (model / "config.json").write_text(json.dumps(config))
    _compile_fails(model, tmp_path, expect=("gate_up_proj", "do not belong together"), after_progress=True)


def test_unknown_target(tmp_path, hf_dir):
    _compile_fails(hf_dir, tmp_path, "--target", "tpu", expect=("unknown target 'tpu'", "llvm"))


def test_unknown_quantization(tmp_path, hf_dir):
    _compile_fails(hf_dir, tmp_path, "--quantization", "q3f7", expect=("unknown quantization 'q3f7'", "q0f32"))


def test_prompt_longer_than_context_window(tiny_models):
    tiny = tiny_models(LLAMA_SPECS["gqa_tied_fp16"])
    prompt = " ".join(["w1"] * 200)
    result = run_cli("generate", tiny.artifact, "--prompt", prompt, "--max-tokens", "4")
    assert_one_line_error(result, "context window of 128")


def test_generate_works_on_good_input(tiny_models):
    tiny = tiny_models(LLAMA_SPECS["gqa_tied_fp16"])
    result = run_cli("generate", tiny.artifact, "--prompt", "w1 w2 w3", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert all(word.startswith("w") for word in result.stdout.split())


def test_non_positive_prefill_chunk(tmp_path, hf_dir):
    _compile_fails(hf_dir, tmp_path, "--prefill-chunk", "0", expect=("prefill_chunk must be a positive",))


def test_gguf_quantization_of_a_hugging_face_directory(tmp_path, hf_dir):
    """``gguf`` keeps a GGUF file's blocks; a safetensors directory has none."""
    _compile_fails(hf_dir, tmp_path, "--quantization", "gguf", expect=("is not a GGUF file", "q4f32_1"))


def test_integer_activations_without_gguf_blocks(tmp_path, hf_dir):
    """Integer activations run only in the kernels of llama.cpp's block layouts."""
    _compile_fails(hf_dir, tmp_path, "--activations", "int8", expect=("int8 activations need the gguf quantization",
                                                                      "q4f32_1", "--activations"))
