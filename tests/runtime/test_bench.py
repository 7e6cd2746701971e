"""``relaxlm bench``: the table's structure (never its speeds) on a tiny model against transformers,
and the one-line errors of comparisons that cannot run."""

import importlib.util
import json
import re
import shutil

import pytest
from click.testing import CliRunner

from llama_specs import LLAMA_SPECS
from relaxlm.compiler.cli import main
from relaxlm.runtime.artifact import CONFIG_FILE

NUMBER = r"\d+(?:\.\d+)?"
ROW = re.compile(rf"^(?P<label>.+?)\s+(?P<prefill>{NUMBER})\s+(?P<decode>{NUMBER})\s+(?P<rp>{NUMBER})\s+(?P<rd>{NUMBER})$")


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
    rows = [ROW.match(line) for line in lines[2:]]
    assert all(rows), lines[2:]
    assert [r["label"].split()[0] for r in rows] == ["relaxlm", "transformers"]
    for r in rows:
        assert all(float(r[key]) > 0 for key in ("prefill", "decode", "rp", "rd"))
    # The first row is relaxlm against itself.
    assert float(rows[0]["rp"]) == float(rows[0]["rd"]) == 1.0


def test_comparisons_load_the_source_the_manifest_records(tiny):
    result = _bench(tiny.artifact, "--prompt-len", 4, "--gen-len", 1, "--runs", 1, "--compare", "transformers")
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.strip().splitlines()[2:]] == ["relaxlm", "transformers"]


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
    rows = [ROW.match(line) for line in lines[2:]]
    assert rows[1]["label"].startswith("llama.cpp (llama-bench, tiny.gguf)")
    assert (float(rows[1]["prefill"]), float(rows[1]["decode"])) == (400.0, 50.0)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [["-m", str(tiny_gguf_file), "-t", threads, "-p", "6", "-n", "3", "-r", "1", "-o", "json"]] * 3


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
