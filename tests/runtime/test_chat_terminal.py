"""``relaxlm chat`` in a pseudo-terminal, typed at as a user does (pexpect): the prompt and its
commands, Ctrl-C and Ctrl-D, a long paste, and the KV cache reused across turns (as its --verbose
counts show). The reference for token counts is the artifact's own tokenizer and chat template."""

import os
import re
import signal
import subprocess
import sys
import time

import pexpect
import pytest

from chat_specs import CHAT_SPEC
from cli_support import assert_one_line_error, run_cli
from llama_specs import LLAMA_SPECS
from support import WORDS

PROMPT = ">>> "
STATS = re.compile(r"prompt (\d+) tokens \((\d+) reused\) at [\d.]+ tokens/s, answer (\d+) tokens")


@pytest.fixture(scope="module")
def artifact(tiny_models):
    return tiny_models(CHAT_SPEC).artifact


def _chat(artifact, *options, timeout=60):
    """``relaxlm chat ARTIFACT OPTIONS…`` in a pseudo-terminal, waiting at its first prompt."""
    # A dumb terminal: readline writes no escape sequences into what the test reads.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "relaxlm.compiler.cli", "chat", str(artifact), *map(str, options)],
                          env=env, encoding="utf-8", timeout=timeout, dimensions=(24, 200),
                          preexec_fn=_default_ctrl_c)
    child.expect_exact(PROMPT)
    # The prompt is written before readline waits for input; a person types after that.
    time.sleep(0.2)
    return child


def _default_ctrl_c() -> None:
    """In the child before exec: Ctrl-C as a shell starts a program with it (default action, not
    blocked), whatever the test process's own signal state."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def _exit_status(child) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def _turn(child, message):
    """Send ``message``; returns its --verbose counts (prefilled, reused, generated)."""
    child.sendline(message)
    child.expect(STATS)
    counts = tuple(int(n) for n in child.match.groups())
    child.expect_exact(PROMPT)
    return counts


def test_the_banner_help_and_empty_lines_do_not_reach_the_model(artifact):
    child = _chat(artifact, "--verbose")
    assert "relaxlm chat: llama_chat-artifact. Type /? for help, /bye or Ctrl-D to quit." in child.before
    for line, shown in (("/?", "/bye          Quit"), ("/foo", "Unknown command '/foo'. Type /? for help.")):
        child.sendline(line)
        child.expect_exact(PROMPT)
        assert shown in child.before and not STATS.search(child.before), child.before
    child.sendline("")
    child.expect_exact(PROMPT)
    assert child.before.strip() == ""
    child.sendline("/bye")
    assert _exit_status(child) == 0


def test_later_turns_prefill_only_the_new_tokens(artifact):
    child = _chat(artifact, "--verbose", "--temperature", "0", "--max-tokens", 8)
    cached = 0
    for i, message in enumerate(("w10 w11", "w20 w21 w22", "w30 w31")):
        prefilled, reused, generated = _turn(child, message)
        # Everything cached is reused (these answers are plain words, which re-render to the
        # tokens generated); new are the end of the last answer (w3), then w1 MESSAGE w3 w2.
        assert reused == cached
        assert prefilled == len(message.split()) + (4 if i else 3)
        cached = prefilled + reused + generated
    child.sendline("/bye")
    assert _exit_status(child) == 0


def test_ctrl_d_quits(artifact):
    child = _chat(artifact)
    child.sendeof()
    assert _exit_status(child) == 0


def test_ctrl_c_at_the_prompt_hints_then_quits(artifact):
    child = _chat(artifact)
    child.send("\x03")
    child.expect_exact("Use Ctrl-D or /bye to quit")
    child.expect_exact(PROMPT)
    child.send("\x03")
    assert _exit_status(child) == 0


def test_a_long_pasted_line_reaches_the_model_whole(artifact):
    """Past the 4,095 characters a terminal keeps of one line when the program does not read it
    with readline."""
    from transformers import AutoTokenizer

    message = " ".join(WORDS[6 + i % (len(WORDS) - 6)] for i in range(1300))
    assert len(message) > 5000
    tokenizer = AutoTokenizer.from_pretrained(str(artifact))
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    child = _chat(artifact, "--verbose", "--max-tokens", 4)
    assert _turn(child, message)[:2] == (expected, 0)
    child.sendeof()
    assert _exit_status(child) == 0


def test_a_model_without_a_chat_template_fails_at_start_up(tiny_models):
    base = tiny_models(LLAMA_SPECS["gqa_tied_fp16"]).artifact
    result = run_cli("chat", base, stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 1
    assert_one_line_error(result, "has no chat template: it is a base model; use 'relaxlm generate'")


@pytest.mark.real
def test_ctrl_c_mid_answer_returns_to_the_prompt_and_the_chat_goes_on(smollm2_artifacts):
    child = _chat(smollm2_artifacts("q4f32_1"), "--verbose", "--max-tokens", 2000, "--temperature", 0.8,
                  "--seed", 1, timeout=120)
    question = "Write a long story about a dragon who learns to bake bread."
    child.sendline(question)
    child.expect_exact(question)
    child.expect(r"\w")  # the first text of the answer
    child.send("\x03")
    child.expect(STATS)
    prefilled, reused, generated = (int(n) for n in child.match.groups())
    assert generated < 2000
    child.expect_exact(PROMPT)
    after = _turn(child, "Thank you! Now say just: the end.")
    # The first question is still cached, and at most the part of the answer that was shown.
    assert prefilled <= after[1] <= prefilled + generated
    child.sendline("/bye")
    assert _exit_status(child) == 0
