"""Text generation on a loaded :class:`~relaxlm.runtime.model.Model`: prompt → tokens → text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .errors import GenerationError
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from .model import Model, Sequence as CacheSequence

DEFAULT_MAX_TOKENS = 256

# Why a completion ended.
EOS, STOP, LENGTH, CONTEXT = "eos", "stop", "length", "context"


def uses_chat_template(model: Model, chat: bool | None) -> bool:
    """Whether a prompt goes through the chat template: as asked, or (None) when the model has one."""
    has_template = model.manifest.tokenizer.present and bool(model.tokenizer.chat_template)
    if chat and not has_template:
        raise GenerationError("this model has no chat template; generate from a plain prompt instead (--raw)")
    return has_template if chat is None else chat


def prompt_tokens(model: Model, prompt: str | list[dict], chat: bool | None = None) -> list[int]:
    """Token ids of a plain prompt, or of a chat (a message or a list of messages) through the
    tokenizer's chat template; ``chat=None`` uses the template when the model has one."""
    tokenizer = model.tokenizer
    if not uses_chat_template(model, chat if isinstance(prompt, str) else True):
        return list(tokenizer(prompt)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(model: Model) -> set[int]:
    """End-of-sequence ids from the artifact's manifest and the tokenizer."""
    ids = set(model.manifest.tokenizer.eos_token_ids)
    if model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


class TextStream:
    """A completion as it is decoded: iterate for its text pieces. Once it has ended,
    ``finish_reason`` says why (:data:`EOS`, :data:`STOP`, :data:`LENGTH` or :data:`CONTEXT`) and
    ``token_ids`` holds the tokens sampled; ``close()`` stops it early. With ``owns_sequence``,
    ``seq`` is closed when the stream ends."""

    def __init__(self, model: Model, seq: CacheSequence, logits: np.ndarray, history: list[int], max_tokens: int,
                 sampling: SamplingParams, stop: Sequence[str], owns_sequence: bool = False):
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        tokens = self._tokens(model, seq, logits, history, max_tokens, sampling)
        self._pieces = self._freeing(seq, self._text(model, tokens, stop)) if owns_sequence else self._text(
            model, tokens, stop)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (the tokens so far stay in the sequence)."""
        self._pieces.close()

    @staticmethod
    def _freeing(seq: CacheSequence, pieces: Iterator[str]) -> Iterator[str]:
        try:
            yield from pieces
        finally:
            seq.close()

    def _tokens(self, model: Model, seq: CacheSequence, logits, history: list[int], max_tokens: int,
                sampling: SamplingParams) -> Iterator[int]:
        """Sampled token ids, each appended to ``seq`` after it is yielded, until ``max_tokens``,
        an end-of-sequence id, or the context window."""
        sampler, stop_ids = Sampler(sampling), stop_token_ids(model)
        self.finish_reason = LENGTH
        for _ in range(max_tokens):
            token = sampler(logits, history)
            if token in stop_ids:
                self.finish_reason = EOS
                return
            self.token_ids.append(token)
            yield token
            history.append(token)
            if seq.length >= model.context_window:
                self.finish_reason = CONTEXT
                return
            logits = seq.decode(token)

    def _text(self, model: Model, tokens: Iterator[int], stop: Sequence[str]) -> Iterator[str]:
        """The decoded text of ``tokens`` in pieces, cut before the first stop string."""
        tokenizer = model.tokenizer
        generated: list[int] = []
        emitted = ""
        for token in tokens:
            generated.append(token)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                self.finish_reason = STOP
                if cut > len(emitted):
                    yield text[len(emitted) : cut]
                return
            # Hold back text that may still grow into a stop string or an unfinished character.
            safe = len(text) - max((len(s) - 1 for s in stop), default=0)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > len(emitted):
                yield text[len(emitted) : safe]
                emitted = text[:safe]
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted) :]


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (a plain string is one stop string)."""
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in strings):
        raise GenerationError("stop strings must be non-empty strings")
    return strings


def check_max_tokens(max_tokens: int) -> None:
    """A completion asks for at least one token."""
    if max_tokens <= 0:
        raise GenerationError(f"max_tokens must be at least 1, not {max_tokens}")


def stream(model: Model, prompt: str | list[dict], max_tokens: int = DEFAULT_MAX_TOKENS, *,
           chat: bool | None = None, stop: str | Sequence[str] | None = None, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
           repetition_window: int = 0) -> TextStream:
    """The completion of ``prompt`` as a :class:`TextStream` of text pieces; it ends at EOS, a stop
    string, ``max_tokens`` or the context window. ``chat=None`` applies the model's chat template
    when it has one (``False`` sends the prompt as it is). Greedy unless ``temperature`` > 0."""
    check_max_tokens(max_tokens)
    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed, repetition_window)
    ids = prompt_tokens(model, prompt, chat)
    if len(ids) >= model.context_window:
        raise GenerationError(
            f"the prompt has {len(ids)} tokens, which fills the context window of {model.context_window}; shorten it"
        )
    seq = model.new_sequence()
    try:
        logits = seq.prefill(ids)
    except BaseException:
        seq.close()
        raise
    return TextStream(model, seq, logits, list(ids), max_tokens, sampling, stop_strings(stop), owns_sequence=True)


def generate(model: Model, prompt: str | list[dict], max_tokens: int = DEFAULT_MAX_TOKENS, **options) -> str:
    """The whole completion of ``prompt`` as one string (options as for :func:`stream`)."""
    return "".join(stream(model, prompt, max_tokens, **options))
