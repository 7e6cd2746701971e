"""Perplexity against transformers: the same windows scored by the reference model's logits
(one forward pass per window, cross-entropy in float64)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gemma3_specs import GEMMA3_SPECS
from llama_specs import LLAMA_SPECS, llama
from relaxlm.compiler.cli import main
from relaxlm.runtime.perplexity import perplexity, perplexity_of_ids
from support import VOCAB, TinySpec

TOLERANCE = 1e-4
TOKENS = np.random.default_rng(7).integers(3, VOCAB, size=90).tolist()


def reference_perplexity(logits_of, token_ids, window):
    """exp(mean NLL) over consecutive windows; each window's first token is context only."""
    nll, scored = 0.0, 0
    for start in range(0, len(token_ids), window):
        ids = token_ids[start : start + window]
        if len(ids) < 2:
            continue
        logits = torch.from_numpy(np.asarray(logits_of(ids))).double()
        nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        scored += len(ids) - 1
    return math.exp(nll / scored)


@pytest.mark.parametrize("spec, window", [
    # Windows of 40 over prefill chunks of 8: scored in chunks, three windows (the last short).
    (LLAMA_SPECS["mha_llama3_bias_bf16"], 40),
    # Sliding-window layers (window 8) inside windows of 30 tokens: scored a window per call.
    (GEMMA3_SPECS["sliding_global_softcap"], 30),
])
@pytest.mark.parametrize("decode", [False, True], ids=["chunks", "decode"])
def test_perplexity_matches_transformers(tiny_models, spec, window, decode):
    tiny = tiny_models(spec)
    result = perplexity_of_ids(tiny.model, TOKENS, window=window, decode=decode)
    expected = reference_perplexity(tiny.reference_logits, TOKENS, window)
    assert result.windows == math.ceil(len(TOKENS) / window)
    assert result.scored_tokens == len(TOKENS) - result.windows
    assert abs(result.perplexity - expected) / expected < TOLERANCE, (result.perplexity, expected)


def test_window_defaults_to_and_is_capped_by_the_context_window(tiny_models):
    model = tiny_models(LLAMA_SPECS["mha_llama3_bias_bf16"]).model
    assert perplexity_of_ids(model, TOKENS[:20]).window == model.context_window
    assert perplexity_of_ids(model, TOKENS[:20], window=10 * model.context_window).window == model.context_window


@pytest.mark.parametrize("decode", [False, True], ids=["chunks", "decode"])
def test_cli_scores_a_text_file_with_the_artifacts_tokenizer(tiny_models, tmp_path, decode):
    tiny = tiny_models(LLAMA_SPECS["mha_llama3_bias_bf16"])
    text = " ".join(f"w{t - 3}" for t in TOKENS)
    (tmp_path / "text.txt").write_text(text)
    expected = perplexity(tiny.model, text, window=40, decode=decode)
    assert expected.scored_tokens == len(TOKENS) - 3
    result = CliRunner().invoke(main, ["perplexity", str(tiny.artifact), "--text", str(tmp_path / "text.txt"),
                                       "--window", "40"] + (["--decode"] if decode else []))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"perplexity {expected.perplexity:.4f} over {expected.scored_tokens} tokens")


def test_cli_rejects_a_window_too_small_in_one_line(tiny_models, tmp_path):
    tiny = tiny_models(LLAMA_SPECS["mha_llama3_bias_bf16"])
    (tmp_path / "text.txt").write_text("w1 w2 w3")
    result = CliRunner().invoke(main, ["perplexity", str(tiny.artifact), "--text", str(tmp_path / "text.txt"),
                                       "--window", "1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["relaxlm: error: a perplexity window needs at least 2 tokens, not 1"]


# SmolLM2's vocabulary on a model too small to take time: the logits are what costs memory.
BIG_VOCAB = TinySpec("llama_big_vocab", llama(vocab_size=49152, hidden_size=32, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=4096))
# Peak memory while scoring, above the loaded model: one call's logits as TVM returns them and as
# numpy copies them (2 x 64 MiB), three float64 blocks of the reduction (3 x 16 MiB), the VM's
# buffers for one call, and slack (measured: +233 MiB at 1,000 and at 16,000 tokens). Holding a
# 4,096-token window's logits instead, as float64, takes 1.5 GiB per copy (measured: +6.2 GiB).
SCORING_MEMORY_BOUND_MB = 320
_MEASURE = """
import json, resource, sys
import numpy as np
from relaxlm.runtime import load
from relaxlm.runtime.perplexity import perplexity_of_ids
model = load(sys.argv[1])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
loaded = peak()
ids = np.random.default_rng(0).integers(0, model.vocab_size, size=int(sys.argv[2])).tolist()
result = perplexity_of_ids(model, ids, window=4096)
print(json.dumps({"loaded": loaded, "peak": peak(), "scored": result.scored_tokens}))
"""


def test_scoring_memory_stays_bounded_whatever_the_text(tiny_models):
    artifact = tiny_models(BIG_VOCAB).artifact
    for tokens in (1_000, 16_000):
        run = subprocess.run([sys.executable, "-c", _MEASURE, str(artifact), str(tokens)], capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        measured = json.loads(run.stdout)
        assert measured["scored"] == tokens - math.ceil(tokens / 4096)
        assert measured["peak"] - measured["loaded"] < SCORING_MEMORY_BOUND_MB, (tokens, measured)
