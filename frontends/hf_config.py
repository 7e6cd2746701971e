"""Reading a Hugging Face config dict while remembering which keys were read (the rest are kept,
never silently dropped: see :mod:`.config`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import FrontendError


class HFConfigReader:
    """Reads keys from a HF config dict and remembers which ones were used."""

    def __init__(self, hf: dict[str, Any], family: str):
        self.hf = dict(hf)
        self.family = family
        self.used: set[str] = set()

    def get(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        """The value of ``key``; a missing key without a default is a clear error."""
        self.used.add(key)
        value = self.hf.get(key)
        if value is None:
            if default is dataclasses.MISSING:
                raise FrontendError(f"{self.family} config.json has no '{key}'; is this a {self.family} model?")
            return default
        return value

    def require(self, key: str, allowed: tuple, default: Any = None) -> Any:
        """Like :meth:`get`, but a value outside ``allowed`` is an unsupported-feature error."""
        value = self.get(key, default)
        if value not in allowed:
            raise FrontendError(
                f"{self.family}: {key}={value!r} is not supported (supported: {', '.join(map(repr, allowed))})"
            )
        return value

    def extra(self) -> dict[str, Any]:
        """The keys nobody read: kept with the config, never interpreted."""
        return {k: v for k, v in self.hf.items() if k not in self.used}
