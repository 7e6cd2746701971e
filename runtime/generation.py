"""Text generation on a loaded :class:`~relaxlm.runtime.engine.Model`: prompt → tokens → text."""

from __future__ import annotations

from typing import Iterator, Sequence

from .engine import GenerationError, Model
from .sampling import Sampler, SamplingParams


def prompt_tokens(model: Model, prompt: str | list[dict], chat: bool) -> list[int]:
    """Token ids of a plain prompt, or of a chat (a message or a list of messages) through the
    tokenizer's chat template."""
    tokenizer = model.tokenizer
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not tokenizer.chat_template:
        raise GenerationError("this model has no chat template; generate from a plain prompt instead")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(model: Model) -> set[int]:
    """End-of-sequence ids from the artifact's config and the tokenizer."""
    ids = set(model.config["tokenizer"].get("eos_token_ids", []))
    if model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


def generate_tokens(model: Model, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams,
                    stop_ids: set[int]) -> Iterator[int]:
    """Yield sampled token ids until ``max_tokens``, a stop id, or the context window."""
    if len(prompt_ids) >= model.context_window:
        raise GenerationError(
            f"the prompt has {len(prompt_ids)} tokens, which fills the context window of {model.context_window}; "
            "shorten it"
        )
    sampler = Sampler(sampling)
    history = list(prompt_ids)
    with model.new_sequence() as seq:
        logits = seq.prefill(prompt_ids)
        for _ in range(min(max_tokens, model.context_window - len(prompt_ids))):
            token = sampler(logits, history)
            if token in stop_ids:
                return
            yield token
            history.append(token)
            if seq.length >= model.context_window:
                return
            logits = seq.decode(token)


def stream(model: Model, prompt: str | list[dict], max_tokens: int = 128, *, chat: bool = False,
           stop: Sequence[str] = (), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           repetition_penalty: float = 1.0, seed: int | None = None) -> Iterator[str]:
    """Yield the completion as text pieces; ends at EOS, a stop string, or ``max_tokens``."""
    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
    tokenizer = model.tokenizer
    ids = prompt_tokens(model, prompt, chat)
    generated: list[int] = []
    emitted = ""
    for token in generate_tokens(model, ids, max_tokens, sampling, stop_token_ids(model)):
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
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


def generate(model: Model, prompt: str | list[dict], max_tokens: int = 128, **options) -> str:
    """The whole completion of ``prompt`` as one string (options as for :func:`stream`)."""
    return "".join(stream(model, prompt, max_tokens, **options))
