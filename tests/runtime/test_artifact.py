"""Loading checks the artifact: its manifest, the checksums of its library and weights, its
files, and that this CPU can run its code; each refusal is one line that says what to do."""

import dataclasses
import json
import shutil

import pytest

from cli_support import assert_one_line_error, run_cli
from llama_specs import LLAMA_SPECS
from relaxlm.compiler import compile_model
from relaxlm.runtime import ArtifactError, load
from relaxlm.runtime.artifact import CONFIG_FILE, Manifest
from relaxlm.runtime.host import cpu_flags
from relaxlm.targets import resolve
from support import relative_error

# CPUs with features few machines have; the first whose features this machine lacks stands for
# "the build machine was another one".
FOREIGN_CPUS = ("graniterapids", "diamondrapids", "sapphirerapids")


@pytest.fixture
def artifact_copy(tiny_models, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_models(LLAMA_SPECS["gqa_tied_fp16"]).artifact, copy)
    return copy


def _corrupt_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def _generate_refused(artifact, *fragments):
    assert_one_line_error(run_cli("generate", artifact, "w1 w2", "--max-tokens", "2"), *fragments)


def test_a_changed_weight_file_is_refused(artifact_copy):
    _corrupt_last_byte(next(artifact_copy.glob("*.safetensors")))
    with pytest.raises(ArtifactError, match="checksum"):
        load(artifact_copy)


def test_a_damaged_library_is_refused_in_one_line_before_it_is_loaded(artifact_copy):
    _corrupt_last_byte(artifact_copy / "lib.so")
    _generate_refused(artifact_copy, "lib.so", "checksum", "recompile")


def test_another_format_version_is_refused(artifact_copy):
    config_file = artifact_copy / CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["format_version"] -= 1
    config_file.write_text(json.dumps(config))
    _generate_refused(artifact_copy, f"format {config['format_version']}", "recompile")


def test_a_foreign_manifest_is_refused(artifact_copy):
    (artifact_copy / CONFIG_FILE).write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    _generate_refused(artifact_copy, "not a relaxlm manifest")
    (artifact_copy / CONFIG_FILE).write_text(json.dumps({"format_version": 3, "architecture": "LlamaForCausalLM"}))
    _generate_refused(artifact_copy, "does not describe a format-3 artifact", "recompile")


def test_a_broken_manifest_is_refused_in_one_line(artifact_copy):
    config_file = artifact_copy / CONFIG_FILE
    config_file.write_text(config_file.read_text() + "}\n")
    _generate_refused(artifact_copy, CONFIG_FILE, "not valid JSON", "recompile")


def test_a_missing_tokenizer_file_is_refused_in_one_line(artifact_copy):
    (artifact_copy / "tokenizer.json").unlink()
    _generate_refused(artifact_copy, "tokenizer.json is missing", "recompile")


def test_a_path_that_does_not_exist_says_so(tmp_path):
    _generate_refused(tmp_path / "nowhere", "no such directory")


def test_a_directory_that_is_no_artifact_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="relaxlm compile"):
        load(tmp_path)


def test_the_manifest_round_trips(artifact_copy):
    manifest = Manifest.read(artifact_copy)
    manifest.write(artifact_copy)
    assert Manifest.read(artifact_copy) == manifest
    changed = dataclasses.replace(manifest, context_window_size=64, generation={"temperature": 0.6})
    changed.write(artifact_copy)
    assert Manifest.read(artifact_copy) == changed


def test_artifact_holds_what_the_design_lists(artifact_copy):
    config = json.loads((artifact_copy / CONFIG_FILE).read_text())
    assert (artifact_copy / config["library"]).is_file()
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["quantization"] == "q0f32" and config["target"] == "llvm"
    assert set(config["weights"]) == {p.name for p in artifact_copy.glob("*.safetensors")}
    assert (artifact_copy / "tokenizer.json").is_file()
    assert sorted(config["files"]) == sorted(p.name for p in artifact_copy.iterdir())
    assert config["cpu_features"], "an llvm artifact records the CPU features its code uses"


def _foreign_artifact(hf_dir, tmp_path):
    """An llvm artifact whose code needs a feature this CPU lacks: built for the first of
    :data:`FOREIGN_CPUS` that has one. On a machine with every feature they have, the last one's
    artifact, recording besides an Arm feature no x86 CPU lists (and the reverse on Arm): what an
    artifact built on the other architecture records."""
    flags = cpu_flags()
    cpu = next((c for c in FOREIGN_CPUS if not set(resolve(f"llvm:{c}").cpu_requirements()[1]) <= flags),
               FOREIGN_CPUS[-1])
    artifact = compile_model(hf_dir, target=f"llvm:{cpu}", quantization="q0f32", output=tmp_path / cpu)
    manifest = Manifest.read(artifact)
    assert (manifest.cpu, manifest.cpu_features) == resolve(f"llvm:{cpu}").cpu_requirements()
    if set(manifest.cpu_features) <= flags:
        other = "sse4_2" if "asimd" in flags else "asimd"
        dataclasses.replace(manifest, cpu_features=(*manifest.cpu_features, other)).write(artifact)
    return artifact, cpu


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(LLAMA_SPECS["gqa_tied_fp16"])


def test_an_artifact_for_a_cpu_this_one_is_not_is_refused_in_one_line(tiny, tmp_path):
    artifact, cpu = _foreign_artifact(tiny.hf_dir, tmp_path)
    _generate_refused(artifact, "compiled for another CPU", cpu, "recompile it here", "llvm:portable")


def test_a_portable_artifact_runs_here_and_matches_transformers(tiny, tmp_path):
    artifact = compile_model(tiny.hf_dir, target="llvm:portable", quantization="q0f32", output=tmp_path / "portable")
    manifest = Manifest.read(artifact)
    assert manifest.target == "llvm:portable" and "avx512f" not in manifest.cpu_features
    ids = [1, 5, 9, 14, 3, 27, 8, 61]
    with load(artifact).new_sequence() as seq:
        logits = seq.logits_after_each(ids)
    assert relative_error(logits, tiny.reference_logits(ids)) < 1e-4


def test_the_manifest_records_the_models_sampling_settings(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny.hf_dir, model)
    settings = json.loads((model / "generation_config.json").read_text())
    settings.update(do_sample=True, temperature=0.6, top_p=0.9, max_length=99)
    (model / "generation_config.json").write_text(json.dumps(settings))
    artifact = compile_model(model, target="llvm", quantization="q0f32", output=tmp_path / "out")
    assert Manifest.read(artifact).generation == {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
