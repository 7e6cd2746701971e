"""Running the ``relaxlm`` command line as a user does (a subprocess), checking its errors, and
choosing stop strings in generated text."""

import subprocess
import sys


def run_cli(*args, cwd=None, timeout=600, **options):
    """``relaxlm ARGS…`` in a subprocess; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run([sys.executable, "-m", "relaxlm.compiler.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout, **options)


def assert_one_line_error(result, *fragments, after_progress=False):
    """The error is one line, the last; only an error found mid-compile follows progress lines."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("relaxlm: error: ")] == lines[-1:], result.stderr
    assert after_progress or len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def first_new_word(text: str) -> int:
    """The index of the first word of ``text`` after the first that does not occur in the text
    before it (a stop string there cuts exactly at that word)."""
    words = text.split()
    return next(i for i in range(1, len(words)) if words[i] not in " ".join(words[:i]))
