"""The config and tokenizer that relaxlm rebuilds from a GGUF's metadata without PyTorch, against
transformers reading the same file (``AutoConfig``/``AutoTokenizer.from_pretrained(dir,
gguf_file=name)``, which needs torch), for both bundled GGUFs; and a truncated GGUF's error."""

import os
import subprocess
import sys
import textwrap

import pytest

from relaxlm.frontends import FrontendError, open_source
from relaxlm.frontends.sources import resolve_bundled

pytestmark = pytest.mark.real

# Scripts, accents, CJK, Cyrillic, Arabic, digits, punctuation, runs of spaces, tabs and newlines,
# and each model's special tokens written as text.
TEXT = (
    "The quick brown fox (2024) jumped 3.14159 times; didn't it?\n"
    "Ça coûte 12,50 € — «très cher»!  Größe: 7½ m².\n\n"
    "東京は晴れ、気温は25度です。 Привет, мир! مرحبا بالعالم\t...\n"
    "    def f(x): return x**2  # 100%\r\n<|im_end|> <start_of_turn>user<eos>"
)
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def case(request, tmp_path_factory):
    """For one bundled GGUF: relaxlm's source, and transformers' config dict and tokenizer; each
    loaded once per module (opening the Gemma file takes ~10 s, transformers' Gemma tokenizer ~10 s)."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_bundled(request.param)
    directory, file = str(path.parent), path.name
    source = open_source(request.param)
    saved = tmp_path_factory.mktemp(request.param)
    assert source.save_tokenizer(saved)
    yield {
        "source": source,
        "saved": saved,
        "ours": AutoTokenizer.from_pretrained(saved),
        "config": AutoConfig.from_pretrained(directory, gguf_file=file).to_dict(),
        "tokenizer": AutoTokenizer.from_pretrained(directory, gguf_file=file),
    }
    source.close()


def test_config_equals_transformers(case):
    ours = dict(case["source"].config)
    # The one key relaxlm adds: transformers leaves a GGUF's `architectures` unset, relaxlm names the
    # family that compiles it. Every other key, `_name_or_path` and `transformers_version` included,
    # is transformers' own.
    assert ours.pop("architectures") in (["LlamaForCausalLM"], ["Gemma3ForCausalLM"])
    assert case["config"].pop("architectures") is None
    assert ours == case["config"]


def test_tokenizer_files_load_with_auto_tokenizer(case):
    assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in case["saved"].iterdir()}
    assert type(case["ours"]) is type(case["tokenizer"])


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_token_ids_equal_transformers(case, add_special_tokens):
    ours, reference = case["ours"], case["tokenizer"]
    expected = reference(TEXT, add_special_tokens=add_special_tokens)["input_ids"]
    assert ours(TEXT, add_special_tokens=add_special_tokens)["input_ids"] == expected
    assert ours.decode(expected) == reference.decode(expected)


def test_special_tokens_equal_transformers(case):
    ours, reference = case["ours"], case["tokenizer"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.all_special_tokens == reference.all_special_tokens
    # add_bos behaviour: Gemma's file asks for BOS, SmolLM2's says not to.
    starts_with_bos = ours("Hi")["input_ids"][0] == ours.bos_token_id
    assert starts_with_bos == (case["source"].config["model_type"] == "gemma3_text")


def test_chat_template_equals_transformers(case):
    ours, reference = case["ours"], case["tokenizer"]
    if reference.chat_template is None:  # Gemma 3 270M is a base model
        assert ours.chat_template is None
        return
    kwargs = {"add_generation_prompt": True, "tokenize": False}
    assert ours.apply_chat_template(CHAT, **kwargs) == reference.apply_chat_template(CHAT, **kwargs)
    assert "<|im_start|>assistant\n" in ours.apply_chat_template(CHAT, **kwargs)


def test_reading_a_gguf_needs_no_torch(tmp_path):
    """Config and tokenizer come out of a process in which torch cannot be imported."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        from pathlib import Path
        from relaxlm.frontends import open_source
        source = open_source("smollm2-135m")
        assert source.config["num_hidden_layers"] == 30
        assert source.save_tokenizer(Path({str(tmp_path)!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def smollm2_bytes():
    return resolve_bundled("smollm2-135m").read_bytes()


@pytest.mark.parametrize("cut", ["tensors", "header"])
def test_truncated_gguf_is_one_line_error(tmp_path, smollm2_bytes, cut):
    # Half the file cuts into the tensor data; 1000 bytes cuts into the metadata.
    size = len(smollm2_bytes) // 2 if cut == "tensors" else 1000
    broken = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    broken.write_bytes(smollm2_bytes[:size])
    with pytest.raises(FrontendError) as err:
        open_source(broken)
    message = str(err.value)
    assert "\n" not in message and str(broken) in message and "truncated" in message
    if cut == "tensors":
        assert f"{size:,} bytes, its tensors need {len(smollm2_bytes):,}" in message


def test_truncated_gguf_cli_error(tmp_path, smollm2_bytes):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_bytes[: len(smollm2_bytes) // 2])
    done = subprocess.run(
        [sys.executable, "-m", "relaxlm.compiler.cli", "compile", str(broken), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("relaxlm: error:")]
    assert len(errors) == 1 and "truncated" in errors[0] and str(broken) in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
