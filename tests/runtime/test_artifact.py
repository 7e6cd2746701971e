"""Loading checks the artifact's format version and weight checksums."""

import json
import shutil

import pytest

from llama_specs import LLAMA_SPECS
from relaxlm.runtime import ArtifactError, load
from relaxlm.runtime.artifact import CONFIG_FILE


@pytest.fixture
def artifact_copy(tiny_models, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_models(LLAMA_SPECS["gqa_tied_fp16"]).artifact, copy)
    return copy


def test_a_changed_weight_file_is_refused(artifact_copy):
    shard = next(artifact_copy.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load(artifact_copy)


def test_another_format_version_is_refused(artifact_copy):
    config_file = artifact_copy / CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["format_version"] += 1
    config_file.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="recompile"):
        load(artifact_copy)


def test_a_directory_that_is_no_artifact_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="relaxlm compile"):
        load(tmp_path)


def test_artifact_holds_what_the_design_lists(artifact_copy):
    config = json.loads((artifact_copy / CONFIG_FILE).read_text())
    assert (artifact_copy / config["library"]).is_file()
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["quantization"] == "q0f32" and config["target"] == "llvm"
    assert set(config["weights"]) == {p.name for p in artifact_copy.glob("*.safetensors")}
    assert (artifact_copy / "tokenizer.json").is_file()
