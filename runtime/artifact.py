"""The artifact on disk (``dist/<name>/``): its manifest, its files, and checking them.

The compiler writes this format and the runtime reads it; both use :class:`Manifest`, the one
description of ``relaxlm-config.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

# 3: the manifest lists every file and checksums the library too, records the CPU features an
# llvm library needs and how many tokens one call may append.
FORMAT_VERSION = 3
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


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer saved with the artifact."""

    present: bool = False
    eos_token_ids: tuple[int, ...] = ()
    has_chat_template: bool = False


@dataclasses.dataclass(frozen=True)
class Manifest:
    """``relaxlm-config.json``: what was compiled, for what, and what the runtime must know.

    ``model_config`` is the model's own (Hugging Face) config; everything else is relaxlm's."""

    architecture: str
    family: str
    model_config: dict[str, Any]
    # What the compile read: a HF directory, a .gguf file, or a bundled alias.
    source: str
    quantization: str
    model_dtype: str
    target: str
    # The runtime device kind the library runs on (``cpu``, ``cuda``, ``metal`` …), and where it
    # runs when that is not relaxlm's Python runtime (a WebGPU library runs in a browser).
    device: str
    runs_in: str | None
    library: str
    library_sha256: str
    # llvm libraries: the CPU the code was generated for and the instruction-set features it may
    # use (``/proc/cpuinfo`` names); loading on a CPU without one of them is refused.
    cpu: str | None
    cpu_features: tuple[str, ...]
    vocab_size: int
    context_window_size: int
    prefill_chunk_size: int
    page_size: int
    sliding_window: int | None
    # The most tokens one call may append to one sequence and stay exact (the target decides).
    max_append: int
    # The order of the library's parameters, and the weight files with their SHA-256.
    params: tuple[str, ...]
    weights: dict[str, str]
    # Every file of the artifact, this manifest included.
    files: tuple[str, ...]
    tokenizer: TokenizerInfo
    # The sampling settings the model's authors recommend (its generation_config), as given.
    generation: dict[str, Any]
    calibration: dict[str, Any] | None = None
    # What the decode projections round their activations to: float32, int16 or int8.
    activations: str = "float32"
    format_version: int = FORMAT_VERSION

    def write(self, directory: Path) -> None:
        """Write the manifest into ``directory``."""
        text = json.dumps(dataclasses.asdict(self), indent=2, default=str)
        (Path(directory) / CONFIG_FILE).write_text(text + "\n")

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        """The manifest of the artifact in ``directory``; anything else is an :class:`ArtifactError`."""
        data = _read_json(Path(directory))
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{directory} has artifact format {version}, this relaxlm reads format {FORMAT_VERSION}; recompile it"
            )
        return cls.from_dict(data, directory)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | os.PathLike = "the artifact") -> "Manifest":
        """A manifest from its JSON form; missing or unknown keys mean it is not this format."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not required <= set(data) or not set(data) <= names:
            odd = sorted((required - set(data)) | (set(data) - names))
            raise ArtifactError(f"{where}/{CONFIG_FILE} does not describe a format-{FORMAT_VERSION} artifact "
                                f"(keys {', '.join(odd)}); recompile it")
        tokenizer = data["tokenizer"]
        return cls(**{**data,
                      "cpu_features": tuple(data["cpu_features"]),
                      "params": tuple(data["params"]),
                      "files": tuple(data["files"]),
                      "tokenizer": TokenizerInfo(bool(tokenizer["present"]), tuple(tokenizer["eos_token_ids"]),
                                                 bool(tokenizer["has_chat_template"]))})


def _read_json(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        raise ArtifactError(f"{directory}: no such directory; pass the directory 'relaxlm compile' wrote")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise ArtifactError(f"{directory} is not a relaxlm artifact (no {CONFIG_FILE}); run 'relaxlm compile' first")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{config_file} is damaged (not valid JSON: {err}); recompile the model") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise ArtifactError(f"{config_file} is not a relaxlm manifest (no format_version); recompile the model")
    return data


def verify_files(path: Path, manifest: Manifest) -> None:
    """Refuse a missing file, and a library or weight file that differs from the checksum the
    compiler wrote."""
    for file in manifest.files:
        if not (path / file).is_file():
            raise ArtifactError(f"{path}: {file} is missing; recompile the model")
    checksums = {manifest.library: manifest.library_sha256, **manifest.weights}
    for file, expected in checksums.items():
        kind = "library" if file == manifest.library else "weight file"
        if sha256_of(path / file) != expected:
            raise ArtifactError(f"{path}: {kind} {file} does not match its checksum (damaged?); recompile the model")


def is_artifact(directory: Path) -> bool:
    """Whether ``directory`` is an artifact relaxlm wrote: a readable manifest of this format, and
    no file that the manifest does not list (so replacing it loses nothing of the user's)."""
    try:
        manifest = Manifest.read(directory)
    except ArtifactError:
        return False
    return {p.name for p in directory.iterdir()} <= set(manifest.files)
