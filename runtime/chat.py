"""Chat with a loaded model: a :class:`Conversation` keeps one KV-cache sequence across turns and
prefills only what each turn adds; :func:`terminal_chat` is the interactive loop of ``relaxlm chat``."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Iterator

from .errors import GenerationError
from .generation import DEFAULT_MAX_TOKENS, TextStream, check_max_tokens, prompt_tokens
from .sampling import SamplingParams, chat_sampling

if TYPE_CHECKING:
    import numpy as np

    from .model import Model

PROMPT = ">>> "
HELP = """Available commands:
  /clear        Forget the conversation (the system message stays)
  /bye          Quit
  /?, /help     Show this help

Ctrl-C stops an answer; Ctrl-D or /bye quits."""


def check_can_chat(model: Model) -> None:
    """Refuse a model that cannot chat (no tokenizer, or no chat template), saying what to do."""
    name = model.path.name
    if not model.manifest.tokenizer.present:
        raise GenerationError(f"{name} was compiled without a tokenizer, so it cannot chat; "
                              "recompile it from a model that has one")
    if not model.manifest.tokenizer.has_chat_template:
        raise GenerationError(f"{name} has no chat template: it is a base model; "
                              "use 'relaxlm generate' for plain continuations")


@dataclasses.dataclass
class Turn:
    """What one turn cost: prompt tokens prefilled and reused from the cache, answer tokens."""

    prefilled: int
    reused: int
    prefill_seconds: float
    generated: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_rate(self) -> float:
        """Prompt tokens prefilled per second."""
        return self.prefilled / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_rate(self) -> float:
        """Answer tokens generated per second."""
        return self.generated / self.decode_seconds if self.decode_seconds else 0.0


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class Conversation:
    """A chat with ``model``: its messages (the system message first) and one KV-cache sequence
    kept across turns.

    Each turn renders the whole conversation in the chat template and prefills only the tokens
    after the longest prefix already in the cache, so an answer is the one a fresh prefill of the
    whole conversation gives. When the conversation and room for an answer no longer fit the
    context window, the oldest turns are dropped (the system message stays)."""

    def __init__(self, model: Model, sampling: SamplingParams | None = None, *, system: str | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS):
        check_can_chat(model)
        check_max_tokens(max_tokens)
        self.model = model
        self.sampling = chat_sampling(model.manifest.generation) if sampling is None else sampling
        self.max_tokens = max_tokens
        self._system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict] = list(self._system)
        self.turns: list[Turn] = []
        self._seq = model.new_sequence()
        # The token ids in the sequence: always as many as ``self._seq.length``.
        self._cached: list[int] = []
        self._reply: Reply | None = None

    @property
    def cached_ids(self) -> list[int]:
        """The token ids the KV cache holds now."""
        return list(self._cached)

    def say(self, text: str) -> Reply:
        """Send a user message; the answer is a :class:`Reply` to iterate. A message too long for
        the context window is a :class:`GenerationError` and leaves the conversation as it was."""
        if self._reply is not None:
            self._reply.close()
        messages, ids = self._fit(self.messages + [{"role": "user", "content": text}])
        logits, turn = self._prefill(ids)
        self.messages = messages
        self.turns.append(turn)
        # The whole prompt is the history, as in a fresh generation, so the repetition penalty agrees.
        stream = TextStream(self.model, self._seq, logits, list(ids), self.max_tokens, self.sampling, ())
        self._reply = Reply(self, stream, ids, turn)
        return self._reply

    def clear(self) -> None:
        """Forget the messages but the system message (its tokens stay cached for the next turn)."""
        if self._reply is not None:
            self._reply.close()
        self.messages = list(self._system)

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int]]:
        """``messages`` less their oldest turns until they and room for an answer fit the context
        window, with their token ids."""
        window = self.model.context_window
        room = min(self.max_tokens, window // 4)
        first = len(self._system)
        while True:
            ids = prompt_tokens(self.model, messages, chat=True)
            if len(ids) + room <= window:
                return messages, ids
            if len(messages) == first + 1:
                with_system = " with the system message" if self._system else ""
                raise GenerationError(f"this message takes {len(ids)} tokens in the chat template{with_system}; "
                                      f"with {room} for the answer that exceeds the context window of {window} "
                                      "tokens: shorten it")
            # Drop the oldest user message and the answer to it (the last message is the new one).
            next_user = next(i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user")
            messages = messages[:first] + messages[next_user:]

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, Turn]:
        """Bring the cache to ``ids``: keep the longest prefix it shares with them, roll back the
        rest, prefill the new tokens (at least one, for the logits of the last)."""
        keep = min(_common_prefix(self._cached, ids), len(ids) - 1)
        self._seq.rollback(self._seq.length - keep)
        start = time.perf_counter()
        try:
            logits = self._seq.prefill(ids[keep:])
        finally:
            # A failed prefill may still have appended its first chunks.
            self._cached = ids[: self._seq.length]
        return logits, Turn(prefilled=len(ids) - keep, reused=keep, prefill_seconds=time.perf_counter() - start)

    def _record(self, text: str, ids: list[int]) -> None:
        """An answer ended: ``text`` is the assistant's message, and the cache holds a prefix of
        ``ids`` (prompt and answer; the last answer token is not in it when the answer was stopped
        or reached the context end)."""
        self.messages.append({"role": "assistant", "content": text})
        self._cached = ids[: self._seq.length]
        self._reply = None

    def close(self) -> None:
        """Free the conversation's KV-cache sequence."""
        if self._reply is not None:
            self._reply.close()
        self._seq.close()

    def __enter__(self) -> "Conversation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Reply:
    """The answer to one message as it is generated: iterate for its text pieces; ``close()``
    stops it early. Either way the text so far becomes the assistant's message."""

    def __init__(self, conversation: Conversation, stream: TextStream, prompt_ids: list[int], turn: Turn):
        self.text = ""
        self.turn = turn
        self._conversation = conversation
        self._stream = stream
        self._prompt_ids = prompt_ids
        self._done = False

    @property
    def token_ids(self) -> list[int]:
        """The answer's tokens sampled so far."""
        return list(self._stream.token_ids)

    def __iter__(self) -> "Reply":
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        start = time.perf_counter()
        try:
            piece = next(self._stream)
        except BaseException:
            self._finish()
            raise
        finally:
            self.turn.decode_seconds += time.perf_counter() - start
        self.text += piece
        return piece

    def close(self) -> None:
        """Stop generating; the text so far is the answer."""
        if not self._done:
            self._stream.close()
            self._finish()

    def _finish(self) -> None:
        """Hand the answer so far to the conversation, once."""
        self._done = True
        self.turn.generated = len(self._stream.token_ids)
        self._conversation._record(self.text, self._prompt_ids + self._stream.token_ids)


# ---- the terminal ------------------------------------------------------------------------------
def terminal_chat(model: Model, sampling: SamplingParams, system: str | None = None,
                  max_tokens: int = DEFAULT_MAX_TOKENS, verbose: bool = False) -> None:
    """``relaxlm chat``: read messages at a ``>>> `` prompt and stream the answers until /bye,
    Ctrl-D or two Ctrl-C in a row; /? lists the commands. With ``verbose``, each answer is
    followed by its token counts and speeds on stderr."""
    if sys.stdin.isatty():
        # input() then edits lines and keeps a history; readline also reads the line itself, past
        # the 4,095 characters a terminal in canonical mode keeps of one line (a long paste).
        import readline  # noqa: F401
    print(f"relaxlm chat: {model.path.name}. Type /? for help, /bye or Ctrl-D to quit.")
    with Conversation(model, sampling, system=system, max_tokens=max_tokens) as conversation:
        for line in _typed_lines():
            text = line.strip()
            if text.startswith("/"):
                if not _run_command(conversation, text):
                    return
            elif text:
                _answer(conversation, text, verbose)


def _typed_lines() -> Iterator[str]:
    """Lines typed at the prompt, until Ctrl-D or a second Ctrl-C in a row."""
    interrupted = False
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            if interrupted:
                return
            print("Use Ctrl-D or /bye to quit (or Ctrl-C again).")
            interrupted = True
            continue
        interrupted = False
        yield line


def _run_command(conversation: Conversation, text: str) -> bool:
    """Run a /command; False when it quits."""
    name = text.split()[0]
    if name == "/bye":
        return False
    if name in ("/?", "/help"):
        print(HELP)
    elif name == "/clear":
        conversation.clear()
        print("Cleared the conversation.")
    else:
        print(f"Unknown command '{name}'. Type /? for help.")
    return True


def _answer(conversation: Conversation, text: str, verbose: bool) -> None:
    """Stream the answer to ``text``; Ctrl-C stops it (between tokens) and returns to the prompt.
    A message too long for the context window is one error line; the chat goes on."""
    with _ctrl_c_sets_flag() as stop:
        try:
            reply = conversation.say(text)
        except GenerationError as err:
            print(f"relaxlm: error: {err}", file=sys.stderr)
            return
        while not stop.is_set():
            piece = next(reply, None)
            if piece is None:
                break
            sys.stdout.write(piece)
            sys.stdout.flush()
        reply.close()
    print(flush=True)  # before stderr, where stdout is a pipe
    if verbose:
        turn = reply.turn
        print(f"prompt {turn.prefilled} tokens ({turn.reused} reused) at {turn.prefill_rate:.1f} tokens/s, "
              f"answer {turn.generated} tokens at {turn.decode_rate:.1f} tokens/s", file=sys.stderr)
    print()


@contextlib.contextmanager
def _ctrl_c_sets_flag() -> Iterator[threading.Event]:
    """Inside, Ctrl-C (SIGINT) sets the flag instead of raising KeyboardInterrupt, which could land
    between a KV-cache update and the sequence's count of its tokens."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
