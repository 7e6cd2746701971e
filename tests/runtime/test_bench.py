"""``relaxlm bench``: the table's structure (never its speeds) on a tiny model against transformers,
its roofline (bytes per decoded token counted from the artifact's files and the config), depth, and
the one-line errors of comparisons that cannot run."""

import importlib.util
import json
import re
import shutil

import pytest
from click.testing import CliRunner

from gemma3_specs import GEMMA3_SPECS
from llama_specs import LLAMA_SPECS
from relaxlm.compiler.cli import main
from relaxlm.runtime import bench as bench_module
from relaxlm.runtime.artifact import CONFIG_FILE

NUMBER = r"\d+(?:\.\d+)?"
ROW = re.compile(rf"^(?P<label>.+?)\s+(?P<prefill>{NUMBER})\s+(?P<decode>{NUMBER})\s+(?P<rp>{NUMBER})\s+(?P<rd>{NUMBER})$")
ROOFLINE = re.compile(rf"^roofline: a decode step reads (?P<weights>{NUMBER}) MB of weights \+ (?P<kv>{NUMBER}(?:e-\d+)?) MB of "
                      rf"KV cache; this machine streams (?P<bandwidth>{NUMBER}) GB/s with (?P<threads>\d+) threads, "
                      rf"at most (?P<limit>{NUMBER}) tok/s; relaxlm decodes at (?P<fraction>\d+)% of it$")


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(LLAMA_SPECS["gqa_tied_fp16"])


def _bench(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_table_has_a_row_per_runner_with_positive_speeds_and_ratios(tiny):
    result = _bench(tiny.artifact, "--prompt-len", 6, "--gen-len", 3, "--runs", 2, "--compare", "transformers",
                    "--source", tiny.hf_dir)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert "prompt 6 tokens, 3 decode steps" in lines[0] and "median of 2 runs" in lines[0]
    assert lines[1].split()[:5] == ["engine", "prefill", "tok/s", "decode", "tok/s"]
    assert "relaxlm/x prefill" in lines[1] and "relaxlm/x decode" in lines[1]
    rows = [ROW.match(line) for line in lines[2:-1]]
    assert all(rows), lines[2:-1]
    assert [r["label"].split()[0] for r in rows] == ["relaxlm", "transformers"]
    for r in rows:
        assert all(float(r[key]) > 0 for key in ("prefill", "decode", "rp", "rd"))
    # The first row is relaxlm against itself.
    assert float(rows[0]["rp"]) == float(rows[0]["rd"]) == 1.0
    # The roofline: bandwidth / bytes per token, and relaxlm's decode as a fraction of it.
    roofline = ROOFLINE.match(lines[-1])
    assert roofline, lines[-1]
    assert roofline["threads"] == re.search(r"(\d+) threads", lines[0])[1]
    megabytes = float(roofline["weights"]) + float(roofline["kv"])
    assert float(roofline["limit"]) == pytest.approx(float(roofline["bandwidth"]) * 1e3 / megabytes, rel=0.02)
    assert int(roofline["fraction"]) == pytest.approx(100 * float(rows[0]["decode"]) / float(roofline["limit"]), abs=1)


def test_comparisons_load_the_source_the_manifest_records(tiny):
    result = _bench(tiny.artifact, "--prompt-len", 4, "--gen-len", 1, "--runs", 1, "--compare", "transformers")
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.strip().splitlines()[2:-1]] == ["relaxlm", "transformers"]


def _tensor_bytes(artifact, skip_prefix=None) -> int:
    """The bytes of the artifact's weight tensors, read from its safetensors files."""
    from safetensors.numpy import load_file

    manifest = json.loads((artifact / CONFIG_FILE).read_text())
    tensors = {name: array for file in manifest["weights"] for name, array in load_file(str(artifact / file)).items()}
    return sum(array.nbytes for name, array in tensors.items() if not (skip_prefix and name.startswith(skip_prefix)))


def test_a_decode_step_reads_every_weight_of_a_tied_model(tiny):
    """The tied embedding table is read whole by the logits."""
    assert bench_module.weight_bytes_per_token(tiny.model) == _tensor_bytes(tiny.artifact)


def test_a_decode_step_reads_one_row_of_an_untied_embedding(tiny_models):
    untied = tiny_models(LLAMA_SPECS["mha_llama3_bias_bf16"])
    assert any(name.startswith("lm_head.") for name in untied.model.manifest.params)
    expected = _tensor_bytes(untied.artifact, skip_prefix="model.embed_tokens.")
    assert bench_module.weight_bytes_per_token(untied.model) == expected < _tensor_bytes(untied.artifact)


def test_kv_cache_read_per_decode_step_counts_each_layer_up_to_its_window(tiny, tiny_models):
    """Keys and values of every layer, float32; Gemma 3's sliding layers read at most the window."""
    llama = tiny.reference.config
    per_position = 2 * llama.num_key_value_heads * (llama.hidden_size // llama.num_attention_heads) * 4
    assert bench_module.kv_bytes_per_position(tiny.model, 20) == 20 * llama.num_hidden_layers * per_position
    gemma = tiny_models(GEMMA3_SPECS["sliding_global_softcap"])
    config = gemma.reference.config
    read = {"sliding_attention": min(20, config.sliding_window), "full_attention": 20}
    assert config.sliding_window < 20 and "sliding_attention" in config.layer_types
    assert bench_module.kv_bytes_per_position(gemma.model, 20) == (
        2 * config.num_key_value_heads * config.head_dim * 4 * sum(read[kind] for kind in config.layer_types))


def test_depth_fills_the_cache_untimed_before_the_prompt():
    """``--depth``: every runner extends its fresh state by the context, then times the prompt."""
    calls = []

    class Recording(bench_module.Runner):
        name, detail = "recording", ""

        def reset(self):
            calls.append("reset")

        def extend(self, token_ids):
            calls.append(("extend", len(token_ids)))
            return 0

        def decode(self, token_id):
            calls.append("decode")
            return 0

    Recording().seconds(list(range(7)), [1, 2, 3], 2)
    assert calls == ["reset", ("extend", 7), ("extend", 3), "decode", "decode"]


def test_depth_beyond_the_context_window_is_one_line(tiny):
    window = tiny.model.context_window
    result = _bench(tiny.artifact, "--depth", window, "--prompt-len", 4, "--gen-len", 1)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"relaxlm: error: {window} + 4 + 1 tokens exceed the context window of {window}"]


def test_comparison_asks_for_source_when_the_recorded_one_is_gone(tiny, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny.artifact, copy)
    manifest = json.loads((copy / CONFIG_FILE).read_text())
    manifest["source"] = str(tmp_path / "moved-away")
    (copy / CONFIG_FILE).write_text(json.dumps(manifest))
    result = _bench(copy, "--prompt-len", 4, "--gen-len", 1, "--runs", 1, "--compare", "transformers")
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "pass --source" in result.output


def _pretend_installed(monkeypatch, module, installed):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: (object() if installed else None) if name == module else real(name, *args))


def test_a_comparison_whose_package_is_missing_says_what_to_install(tiny, monkeypatch):
    _pretend_installed(monkeypatch, "llama_cpp", installed=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = _bench(tiny.artifact, "--compare", "llama.cpp")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "relaxlm: error: --compare llama.cpp needs the 'llama_cpp' package: pip install 'relaxlm[bench]' "
        "(llama-cpp-python) or llama.cpp's llama-bench (on PATH, or --llama-bench PATH; .ci/build_llama_cpp.sh "
        "builds it)"
    ]


# A stand-in for llama.cpp's llama-bench: it records its arguments and prints llama-bench's JSON
# (the fields relaxlm reads) with fixed speeds; exit 3 when asked to fail.
FAKE_LLAMA_BENCH = """#!{python}
import json, pathlib, sys
args = sys.argv[1:]
pathlib.Path({log!r}).open("a").write(json.dumps(args) + "\\n")
if "{fail}" == "yes":
    sys.exit("error: failed to load model")
value = lambda flag: int(args[args.index(flag) + 1])
print(json.dumps([{{"n_prompt": value("-p"), "n_gen": 0, "avg_ts": 400.0}},
                  {{"n_prompt": 0, "n_gen": value("-n"), "avg_ts": 50.0}}]))
"""


def _fake_llama_bench(tmp_path, fail=False):
    import sys

    log = tmp_path / "calls.jsonl"
    script = tmp_path / "llama-bench"
    script.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(log), fail="yes" if fail else "no"))
    script.chmod(0o755)
    return script, log


def test_llama_cpp_runs_as_llama_bench_with_the_same_work_and_threads(tiny, tiny_gguf_file, tmp_path):
    """Each round (warm-up included) runs llama-bench once on the GGUF with relaxlm's prompt length,
    decode steps and threads; its speeds are the row's."""
    script, log = _fake_llama_bench(tmp_path)
    result = _bench(tiny.artifact, "--prompt-len", 6, "--gen-len", 3, "--runs", 2,
                    "--compare", "llama.cpp", "--llama-bench", script, "--source", tiny_gguf_file)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    threads = re.search(r"(\d+) threads", lines[0])[1]
    rows = [ROW.match(line) for line in lines[2:-1]]
    assert rows[1]["label"].startswith("llama.cpp (llama-bench, tiny.gguf)")
    assert (float(rows[1]["prefill"]), float(rows[1]["decode"])) == (400.0, 50.0)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [["-m", str(tiny_gguf_file), "-t", threads, "-p", "6", "-n", "3", "-r", "1", "-o", "json"]] * 3


def test_llama_bench_gets_the_same_depth(tiny, tiny_gguf_file, tmp_path):
    script, log = _fake_llama_bench(tmp_path)
    result = _bench(tiny.artifact, "--prompt-len", 6, "--gen-len", 3, "--runs", 1, "--depth", 20,
                    "--compare", "llama.cpp", "--llama-bench", script, "--source", tiny_gguf_file)
    assert result.exit_code == 0, result.output
    assert "prompt 6 tokens after 20 cached, 3 decode steps" in result.stdout.splitlines()[0]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [call[-2:] for call in calls] == [["-d", "20"]] * 2


def test_a_failing_llama_bench_is_one_line(tiny, tiny_gguf_file, tmp_path):
    script, _ = _fake_llama_bench(tmp_path, fail=True)
    result = _bench(tiny.artifact, "--prompt-len", 4, "--gen-len", 1, "--runs", 1, "--compare", "llama.cpp",
                    "--llama-bench", script, "--source", tiny_gguf_file)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"relaxlm: error: {script} failed on tiny.gguf (exit 1: error: failed to load model)")


def test_llama_bench_must_be_an_executable(tiny, tmp_path):
    result = _bench(tiny.artifact, "--compare", "llama.cpp", "--llama-bench", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"relaxlm: error: --llama-bench {tmp_path / 'nowhere'}: not an executable file"]


def test_llama_cpp_needs_a_gguf_file(tiny, monkeypatch):
    _pretend_installed(monkeypatch, "llama_cpp", installed=True)
    result = _bench(tiny.artifact, "--prompt-len", 4, "--gen-len", 1, "--compare", "llama.cpp", "--source", tiny.hf_dir)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "--compare llama.cpp needs a .gguf file" in result.output
