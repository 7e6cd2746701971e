"""Where a compile writes: it never removes what relaxlm did not create, leaves nothing behind
when stopped by a signal, cleans up after compiles that died, and writes files the user's umask
lets others read."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from cli_support import assert_one_line_error, run_cli
from llama_specs import LLAMA_SPECS
from relaxlm.compiler import compile_model
from relaxlm.compiler.output import STAGING_MARKER, remove_stale_staging

# Fast compiles of the tiny model: no quantization.
OPTIONS = ("--target", "llvm", "--quantization", "q0f32")


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(LLAMA_SPECS["gqa_tied_fp16"])


def test_a_folder_of_the_users_is_refused_and_kept(tiny, tmp_path):
    folder = tmp_path / "myfolder"
    folder.mkdir()
    (folder / "notes.txt").write_text("notes")
    for force in ((), ("--force",)):
        result = run_cli("compile", tiny.hf_dir, *OPTIONS, "--output", folder, *force)
        assert_one_line_error(result, "not a relaxlm artifact", "notes.txt", "choose another --output")
        assert (folder / "notes.txt").read_text() == "notes"
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_an_artifact_is_replaced_but_not_one_holding_a_users_file(tiny, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):  # the second compile replaces the first artifact
        result = run_cli("compile", tiny.hf_dir, *OPTIONS, "--output", out)
        assert result.returncode == 0, result.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging or old copy is left"
    (out / "mine.txt").write_text("mine")
    result = run_cli("compile", tiny.hf_dir, *OPTIONS, "--output", out, "--force")
    assert_one_line_error(result, "mine.txt")
    assert (out / "mine.txt").is_file()


def test_an_empty_directory_needs_force(tiny, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert_one_line_error(run_cli("compile", tiny.hf_dir, *OPTIONS, "--output", out), "empty", "--force")
    result = run_cli("compile", tiny.hf_dir, *OPTIONS, "--output", out, "--force")
    assert result.returncode == 0, result.stderr
    assert (out / "relaxlm-config.json").is_file()


def test_a_file_is_never_an_output(tiny, tmp_path):
    file = tmp_path / "file"
    file.write_text("data")
    assert_one_line_error(run_cli("compile", tiny.hf_dir, *OPTIONS, "--output", file, "--force"), "not a directory")
    assert file.read_text() == "data"


def _wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_compile_stopped_by_a_signal_leaves_nothing(tiny, tmp_path, signum):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "relaxlm.compiler.cli", "compile", str(tiny.hf_dir), *OPTIONS,
                                "--output", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: any(p.name.startswith(".out.") for p in tmp_path.iterdir()), 120), \
            "the compile never started staging"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_staging_of_dead_compiles_is_removed_and_nothing_else(tmp_path):
    host = os.uname().nodename
    dead = tmp_path / ".out.dead1234"
    dead.mkdir()
    (dead / STAGING_MARKER).write_text(json.dumps({"pid": _dead_pid(), "host": host}))
    alive_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / ".out.alive123"
        alive.mkdir()
        (alive / STAGING_MARKER).write_text(json.dumps({"pid": alive_process.pid, "host": host}))
        users = tmp_path / ".cache.dir"  # hidden, but no marker: not ours
        users.mkdir()
        remove_stale_staging(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.dir", ".out.alive123"]
    finally:
        alive_process.kill()
        alive_process.wait()


def test_the_artifact_follows_the_users_umask(tiny, tmp_path):
    previous = os.umask(0o027)
    try:
        out = compile_model(tiny.hf_dir, target="llvm", quantization="q0f32", output=tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    for file in out.iterdir():
        mode = stat.S_IMODE(file.stat().st_mode)
        assert mode & 0o640 == 0o640 and not mode & 0o027, (file.name, oct(mode))


def test_a_compile_with_stderr_to_a_file_writes_a_few_plain_lines(tiny, tmp_path):
    log = tmp_path / "compile.log"
    with open(log, "w") as stderr:
        result = subprocess.run([sys.executable, "-m", "relaxlm.compiler.cli", "compile", str(tiny.hf_dir),
                                 "--target", "llvm", "--quantization", "q4f32_1", "--calibrate",
                                 "--output", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=stderr,
                                timeout=600)
    text = log.read_text()
    assert result.returncode == 0, text
    assert len(text.splitlines()) <= 20, text
    assert "\r" not in text and "Fast mode" not in text and "Warning" not in text, text
    assert text.splitlines()[0].startswith("relaxlm: compiling ")
