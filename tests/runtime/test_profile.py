"""``relaxlm bench --profile`` (runtime.profile): a decode step split into kernel kinds, attention
and the VM's overhead, on a tiny model. The structure and the call counts per step are checked
against the model's config (never the speeds); the parts sum to the step."""

import re

import pytest
from click.testing import CliRunner

from llama_specs import LLAMA_SPECS
from relaxlm.compiler.cli import main
from relaxlm.runtime import load
from relaxlm.runtime.bench import BenchError
from relaxlm.runtime.profile import OVERHEAD, check_can_profile, profile_decode

PART = re.compile(r"^(?P<kind>.+?)\s+(?P<ms>-?\d+\.\d{3})\s+(?:(?P<calls>\d+)\s+)?(?P<share>-?\d+\.\d%)$")


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(LLAMA_SPECS["gqa_tied_fp16"])


def test_a_decode_step_splits_into_its_kernels_attention_and_overhead(tiny):
    model = load(tiny.artifact)
    layers = model.manifest.model_config["num_hidden_layers"]
    profile = profile_decode(model, context=6, steps=2, repeats=1)
    calls = {row.kind: row.calls for row in profile.rows}
    # Per layer: attention once, two norms (and the final norm); the logits once per step.
    assert calls["attention"] == layers
    assert calls["norm"] == 2 * layers + 1
    assert calls["logits matmul"] == 1
    projections = sum(n for kind, n in calls.items() if kind.startswith("matmul "))
    assert projections % layers == 0 and projections >= 4 * layers
    assert [row.kind for row in profile.rows][-1] == OVERHEAD
    assert all(row.seconds >= 0 for row in profile.rows[:-1])
    assert sum(row.seconds for row in profile.rows) == pytest.approx(profile.step_seconds)


def test_bench_prints_the_profile_after_the_table(tiny):
    result = CliRunner().invoke(main, ["bench", str(tiny.artifact), "--prompt-len", "4", "--gen-len", "2",
                                       "--runs", "1", "--profile"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.startswith("decode step after 4 tokens: ")]
    assert lines[start + 1].split() == ["part", "ms/token", "calls", "share"]
    parts = [PART.match(line) for line in lines[start + 2:]]
    assert all(parts), lines[start + 2:]
    assert parts[-1]["kind"] == OVERHEAD and parts[-1]["calls"] is None
    step_ms = float(re.search(r": (\d+\.\d+) ms", lines[start])[1])
    assert sum(float(p["ms"]) for p in parts) == pytest.approx(step_ms, abs=0.002 * len(parts))


def test_a_profile_that_would_outrun_the_context_window_is_refused(tiny):
    model = load(tiny.artifact)
    with pytest.raises(BenchError, match="tokens of context"):
        check_can_profile(model, model.context_window - 10)
