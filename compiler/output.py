"""Where a compile writes: a staging directory beside the output, renamed into place when complete.

relaxlm never deletes what it did not create. An existing output is replaced only when it is an
artifact relaxlm wrote (its manifest lists every file in it), or, with ``force``, when it is
empty or an artifact of an older format. Staging directories carry a marker with the compile's
process id: a compile killed by SIGTERM or SIGHUP removes its own, and one killed outright
(SIGKILL, a crash) leaves one that the next compile into the same folder removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from relaxlm.runtime.artifact import CONFIG_FILE, is_artifact

from .errors import CompileError

STAGING_MARKER = ".relaxlm-staging"
# Files an artifact of any format may hold: with ``force``, an older artifact made only of these
# is replaced too.
_ARTIFACT_FILE = re.compile(
    r"(relaxlm-config\.json|lib\.(so|tar)|params_shard_\d+\.safetensors|tokenizer.*|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.json|merges\.txt|chat_template\.(jinja|json)|generation_config\.json)"
)


class Terminated(BaseException):
    """The compile was stopped by a signal (SIGTERM, SIGHUP); like KeyboardInterrupt, it is not
    an error of the input, and unwinding it removes the staging directory."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse an ``out`` that is not ours to replace, in one line, before any work is done."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise CompileError(f"--output {out} exists and is not a directory; choose another --output")
    if is_artifact(out):
        return
    entries = sorted(p.name for p in out.iterdir())
    if force and (not entries or _older_artifact(out, entries)):
        return
    if not entries:
        raise CompileError(f"--output {out} is an existing empty directory; pass --force to write the artifact there")
    foreign = [name for name in entries if not _ARTIFACT_FILE.fullmatch(name)]
    if foreign or not (out / CONFIG_FILE).is_file():
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise CompileError(f"--output {out} exists and is not a relaxlm artifact (it holds {shown or 'other files'}); "
                           "relaxlm never removes files it did not write: choose another --output")
    raise CompileError(f"--output {out} holds an artifact of another relaxlm format; pass --force to replace it")


def _older_artifact(out: Path, entries: list[str]) -> bool:
    return (out / CONFIG_FILE).is_file() and all(_ARTIFACT_FILE.fullmatch(name) for name in entries)


@contextlib.contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A fresh staging directory beside ``out``, removed when the block fails or is stopped by a
    signal; stale ones of dead compiles into the same folder are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    (staging / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        with _signals_unwind():
            yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, out: Path) -> None:
    """Give the staged artifact the permissions of the user's umask and move it into place,
    replacing an older artifact only once the new one is complete."""
    (staging / STAGING_MARKER).unlink()
    _apply_umask(staging)
    if not out.exists():
        staging.rename(out)
        return
    # Renamed onto this empty directory of ours, the old artifact is out of the way in one step.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(folder: Path) -> None:
    """Remove staging directories in ``folder`` whose compile is no longer running on this host,
    and old artifacts left mid-replacement (``.<name>.old.*``, artifacts relaxlm wrote)."""
    for entry in folder.glob(".*.*"):
        if not entry.is_dir() or entry.is_symlink():
            continue
        if _is_dead_staging(entry) or (".old." in entry.name and is_artifact(entry)):
            shutil.rmtree(entry, ignore_errors=True)


def _is_dead_staging(entry: Path) -> bool:
    try:
        owner = json.loads((entry / STAGING_MARKER).read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _apply_umask(root: Path) -> None:
    """mkdtemp makes 0700 directories; an artifact should be readable as the user's umask says."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        executable = path.is_dir() or os.access(path, os.X_OK)
        path.chmod((0o777 if executable else 0o666) & ~umask)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while the block runs (main thread only:
    Python delivers signals there), so that cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
