"""Load a compiled artifact and run it: sequences over the paged KV cache, sampling, generation."""

from __future__ import annotations

from pathlib import Path

from .artifact import ArtifactError
from .chat import Conversation
from .errors import GenerationError
from .model import Model, Sequence
from .sampling import SamplingParams


def load(path: str | Path, device: str = "auto", **options) -> Model:
    """Load the artifact at ``path`` onto ``device`` (``auto``: the kind it was compiled for)."""
    return Model(path, device=device, **options)


__all__ = ["ArtifactError", "Conversation", "GenerationError", "Model", "SamplingParams", "Sequence", "load"]
