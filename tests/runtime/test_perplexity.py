"""Perplexity against transformers: the same windows scored by the reference model's logits
(one forward pass per window, cross-entropy in float64)."""

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import VOCAB
from gemma3_specs import GEMMA3_SPECS
from llama_specs import LLAMA_SPECS
from relaxlm.compiler.cli import main
from relaxlm.runtime.perplexity import perplexity, perplexity_of_ids

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
    # Windows of 40 over prefill chunks of 8: verify runs in chunks, three windows (the last short).
    (LLAMA_SPECS["mha_llama3_bias_bf16"], 40),
    # Sliding-window layers (window 8) inside windows of 30 tokens: scored through decode.
    (GEMMA3_SPECS["sliding_global_softcap"], 30),
])
def test_perplexity_matches_transformers(tiny_models, spec, window):
    tiny = tiny_models(spec)
    result = perplexity_of_ids(tiny.model, TOKENS, window=window)
    expected = reference_perplexity(tiny.reference_logits, TOKENS, window)
    assert result.windows == math.ceil(len(TOKENS) / window)
    assert result.scored_tokens == len(TOKENS) - result.windows
    assert abs(result.perplexity - expected) / expected < TOLERANCE, (result.perplexity, expected)


def test_window_defaults_to_and_is_capped_by_the_context_window(tiny_models):
    model = tiny_models(LLAMA_SPECS["mha_llama3_bias_bf16"]).model
    assert perplexity_of_ids(model, TOKENS[:20]).window == model.context_window
    assert perplexity_of_ids(model, TOKENS[:20], window=10 * model.context_window).window == model.context_window


def test_cli_scores_a_text_file_with_the_artifacts_tokenizer(tiny_models, tmp_path):
    tiny = tiny_models(LLAMA_SPECS["mha_llama3_bias_bf16"])
    text = " ".join(f"w{t - 3}" for t in TOKENS)
    (tmp_path / "text.txt").write_text(text)
    expected = perplexity(tiny.model, text, window=40)
    assert expected.scored_tokens == len(TOKENS) - 3
    result = CliRunner().invoke(main, ["perplexity", str(tiny.artifact), "--text", str(tmp_path / "text.txt"),
                                       "--window", "40"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"perplexity {expected.perplexity:.4f} over {expected.scored_tokens} tokens")


def test_cli_rejects_a_window_too_small_in_one_line(tiny_models, tmp_path):
    tiny = tiny_models(LLAMA_SPECS["mha_llama3_bias_bf16"])
    (tmp_path / "text.txt").write_text("w1 w2 w3")
    result = CliRunner().invoke(main, ["perplexity", str(tiny.artifact), "--text", str(tmp_path / "text.txt"),
                                       "--window", "1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["relaxlm: error: a perplexity window needs at least 2 tokens, not 1"]
