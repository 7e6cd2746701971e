"""The artifact on disk (``dist/<name>/``): its files, its format version, and checking them.

The compiler writes this format and the runtime reads it; both use the names defined here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# 2: the llvm library carries relaxlm's sliding-window prefill kernel; the runtime relies on it to
# prefill models with sliding-window layers a window per call (format 1 had TVM's, inexact there).
FORMAT_VERSION = 2
CONFIG_FILE = "relaxlm-config.json"


class ArtifactError(Exception):
    """An artifact that cannot be loaded as it is; the message says why and what to do."""


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_config(path: Path) -> dict[str, Any]:
    """The artifact's ``relaxlm-config.json``, after checking its format version."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ArtifactError(f"{path} is not a relaxlm artifact (no {CONFIG_FILE}); run 'relaxlm compile' first")
    config = json.loads(config_file.read_text())
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format {version}, this relaxlm reads format {FORMAT_VERSION}; recompile it"
        )
    return config


def verify_weights(path: Path, config: dict[str, Any]) -> None:
    """Refuse weight files that are missing or differ from the checksums the compiler wrote."""
    for file, expected in config["weights"].items():
        weight_file = path / file
        if not weight_file.is_file():
            raise ArtifactError(f"{path}: weight file {file} is missing; recompile the model")
        if sha256_of(weight_file) != expected:
            raise ArtifactError(f"{path}: weight file {file} does not match its checksum; recompile the model")
