"""The command line as a user meets it: the prompt from an argument, an option or stdin, stop
strings, --version and -h, bad values refused in one line that names the option, and the chat
template applied by default to a model that has one."""

import pytest

from cli_support import assert_one_line_error, first_new_word, run_cli
from llama_specs import LLAMA_SPECS
from relaxlm.runtime import load

PROMPT = "w10 w11 w12 w13"


@pytest.fixture(scope="module")
def tiny(tiny_models):
    # Its greedy text varies from word to word (the tied model's repeats one word).
    return tiny_models(LLAMA_SPECS["mha_llama3_bias_bf16"])


@pytest.fixture(scope="module")
def expected(tiny):
    return load(tiny.artifact).generate(PROMPT, max_tokens=6)


def _generate(*args, **options):
    result = run_cli("generate", *args, **options)
    assert result.returncode == 0, result.stderr
    return result


def test_the_prompt_as_an_argument_an_option_or_on_stdin(tiny, expected):
    assert _generate(tiny.artifact, PROMPT, "--max-tokens", 6).stdout.strip() == expected
    assert _generate(tiny.artifact, "--prompt", PROMPT, "--max-tokens", 6).stdout.strip() == expected
    assert _generate(tiny.artifact, "--max-tokens", 6, input=PROMPT).stdout.strip() == expected


def test_stop_ends_the_text_and_an_empty_answer_says_why(tiny, expected):
    words, cut = expected.split(), first_new_word(expected)
    result = _generate(tiny.artifact, PROMPT, "--max-tokens", 6, "--stop", words[cut])
    assert result.stdout.split() == words[:cut]
    result = _generate(tiny.artifact, PROMPT, "--max-tokens", 6, "--stop", words[0], "--stop", "w999")
    assert result.stdout.strip() == ""
    assert result.stderr.strip() == "relaxlm: empty answer: the text reached a stop string before anything else"


@pytest.mark.parametrize("option, value, names", [
    ("--max-tokens", "0", "--max-tokens"),
    ("--temperature", "-1", "--temperature"),
    ("--top-p", "0", "--top-p"),
    ("--top-k", "-2", "--top-k"),
    ("--repetition-penalty", "0", "--repetition-penalty"),
])
def test_a_bad_value_is_one_line_naming_the_option(tiny, option, value, names):
    result = run_cli("generate", tiny.artifact, PROMPT, option, value)
    assert result.returncode == 2
    assert_one_line_error(result, f"'{names}'", "--help")


def test_no_prompt_and_two_prompts_are_refused_in_one_line(tiny):
    assert_one_line_error(run_cli("generate", tiny.artifact, input=""), "empty")
    assert_one_line_error(run_cli("generate", tiny.artifact, PROMPT, "--prompt", PROMPT), "once")


def test_a_model_without_a_chat_template_refuses_chat_and_continues_raw_text(tiny, expected):
    assert_one_line_error(run_cli("generate", tiny.artifact, PROMPT, "--chat"), "no chat template")
    assert _generate(tiny.artifact, PROMPT, "--max-tokens", 6, "--raw").stdout.strip() == expected


def test_version_and_short_help():
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("relaxlm ")
    for args in (("-h",), ("generate", "-h"), ("compile", "-h")):
        result = run_cli(*args)
        assert result.returncode == 0 and result.stdout.startswith("Usage: "), result.stderr


def test_help_shows_the_defaults(tiny):
    text = run_cli("chat", "-h").stdout
    assert "generation_config" in text and "temperature 0.8" in text
    assert "[default: 256;" in run_cli("generate", "-h").stdout


@pytest.mark.real
def test_generate_answers_an_instruct_models_question_without_chat(smollm2_artifacts):
    result = _generate(smollm2_artifacts("q4f32_1"), "What is the capital of France?", "--max-tokens", 24)
    assert "Paris" in result.stdout, (result.stdout, result.stderr)
    # Sent as it is, SmolLM2-Instruct ends its turn at once; stderr says why and what to do.
    raw = _generate(smollm2_artifacts("q4f32_1"), "What is the capital of France?", "--max-tokens", 24, "--raw")
    assert raw.stdout.strip() == ""
    assert "end-of-sequence" in raw.stderr and "drop --raw" in raw.stderr
