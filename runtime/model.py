"""A compiled model bound to one device: the VM, its weights, the paged KV cache, sequences.

``Model`` owns the KV cache; each :class:`Sequence` is one sequence in it. The cache is driven
through TVM's ``vm.builtin.kv_state_*`` functions around every call of a compiled entry point.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Sequence as Seq

import numpy as np
import tvm
import tvm_ffi
from tvm.runtime import ShapeTuple
# Not ``tvm.relax``: importing it needs the TVM compiler library, which a runtime-only TVM
# (TVM_USE_RUNTIME_LIB=1, as deployed to a GPU machine) does not have.
from tvm.runtime.vm import VirtualMachine

from . import generation
from .artifact import ArtifactError, Manifest, verify_files
from .errors import GenerationError
from .host import check_cpu_features


# TVM 0.27's paged KV cache attends a token tree of at most 256 nodes; a longer draft chain
# stops inside TVM with an internal error.
MAX_DRAFT_TOKENS = 256


def _builtin(name: str):
    return tvm.get_global_func(f"vm.builtin.{name}")


_ADD_SEQUENCE = _builtin("kv_state_add_sequence")
_REMOVE_SEQUENCE = _builtin("kv_state_remove_sequence")
_FORK_SEQUENCE = _builtin("kv_state_fork_sequence")
_POPN = _builtin("kv_state_popn")
_BEGIN_FORWARD = _builtin("kv_state_begin_forward")
_END_FORWARD = _builtin("kv_state_end_forward")
_COMMIT_TREE = _builtin("attention_kv_cache_commit_accepted_token_tree_nodes")

def _device(requested: str, manifest: Manifest) -> tvm.runtime.Device:
    """The device to run on: ``auto`` (or ``kind[:index]``, which must be the artifact's kind)."""
    if manifest.runs_in:
        raise ArtifactError(f"this artifact was compiled for {manifest.target}, which runs in {manifest.runs_in}, "
                            "not in relaxlm's Python runtime")
    kind, _, index = (manifest.device if requested == "auto" else requested).partition(":")
    if kind != manifest.device:
        raise ArtifactError(f"this artifact was compiled for {manifest.device}, not {kind}; recompile with --target")
    _load_device_runtime(kind)
    device = tvm.runtime.device(kind, int(index or 0))
    if not device.exist:
        raise ArtifactError(f"no {kind} device is available on this machine")
    return device


def _load_device_runtime(kind: str) -> None:
    """Make sure TVM's runtime for ``kind`` (``libtvm_runtime_<kind>.so``) is loaded.

    ``import tvm`` loads it with the compiler, but a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``,
    as deployed next to an artifact) loads no device backend: without this, every GPU device
    reads as absent ("Device API cuda is not enabled")."""
    if kind == "cpu" or tvm.get_global_func(f"device_api.{kind}", allow_missing=True) is not None:
        return
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    name = f"tvm_runtime_{kind}"
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    if not (runtime_dir / f"lib{name}.so").is_file():
        return  # built into libtvm_runtime (or not at all): device.exist says which
    try:
        _LOADED_LIBS[name] = load_lib_ctypes(package="tvm", target_name=name, extra_lib_paths=[runtime_dir],
                                             mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as err:
        raise ArtifactError(f"no {kind} device is available on this machine: TVM's {kind} runtime "
                            f"(lib{name}.so) cannot be loaded ({err})") from None


def _load_params(path: Path, manifest: Manifest, device) -> list:
    from safetensors.numpy import load_file

    arrays: dict[str, np.ndarray] = {}
    for file in manifest.weights:
        arrays.update(load_file(str(path / file)))
    return [tvm.runtime.tensor(arrays[name], device) for name in manifest.params]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_library(path: Path, manifest: Manifest):
    try:
        return tvm.runtime.load_module(str(path / manifest.library))
    except Exception as err:  # noqa: BLE001  (TVM raises its own error types for a library it cannot load)
        raise ArtifactError(f"{path}: cannot load {manifest.library} ({_first_line(err)}); recompile the model "
                            "for this machine") from None


def _load_tokenizer(path: Path, manifest: Manifest):
    if not manifest.tokenizer.present:
        raise ArtifactError(f"{path} was compiled without a tokenizer; pass token ids instead")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001  (transformers raises many types for a broken tokenizer)
        raise ArtifactError(f"{path}: cannot load its tokenizer ({_first_line(err)}); recompile the model") from None


class Model:
    """A loaded artifact. ``generate`` for text; ``new_sequence`` and the ``batch_*`` methods
    for direct control of the KV cache."""

    def __init__(self, path: str | Path, device: str = "auto", max_batch_size: int = 8,
                 max_total_tokens: int | None = None):
        path = Path(path)
        manifest = Manifest.read(path)
        check_cpu_features(path, manifest)
        verify_files(path, manifest)
        bound = _device(device, manifest)
        library = _load_library(path, manifest)
        self._bind(path, manifest, library, _load_params(path, manifest, bound), bound, max_batch_size,
                   max_total_tokens)

    @classmethod
    def from_parts(cls, path: Path, manifest: Manifest, library, params: list, *, max_batch_size: int = 8,
                   max_total_tokens: int | None = None) -> "Model":
        """A model from a library and weights already in memory (the compiler's calibration build),
        on the device its manifest names; ``path`` holds the tokenizer."""
        model = cls.__new__(cls)
        bound = _device("auto", manifest)
        model._bind(Path(path), manifest, library, [tvm.runtime.tensor(p, bound) for p in params], bound,
                    max_batch_size, max_total_tokens)
        return model

    def _bind(self, path: Path, manifest: Manifest, library, params: list, device, max_batch_size: int,
              max_total_tokens: int | None) -> None:
        self.path = path
        self.manifest = manifest
        self.device = device
        # Host memory is the device's: inputs and logits need no copy.
        self._on_host = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        self.vm = VirtualMachine(library, device)
        self.params = params
        # Converted once: the VM takes the weights as one array, and converting the list costs
        # microseconds on every call.
        self._param_array = tvm_ffi.Array(params)
        self.context_window = manifest.context_window_size
        self.prefill_chunk = manifest.prefill_chunk_size
        self.vocab_size = manifest.vocab_size
        self.max_batch_size = max_batch_size
        # The most tokens one call may append to one sequence and stay exact (the target decides).
        self.max_append = manifest.max_append
        total = max_total_tokens or self.context_window
        sliding = 1 if manifest.sliding_window else 0
        self.kv_cache = self.vm["create_paged_kv_cache"](
            *(ShapeTuple([n]) for n in (max_batch_size, total, self.prefill_chunk, manifest.page_size, sliding))
        )
        self._ids = itertools.count()
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer saved with the artifact."""
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.path, self.manifest)
        return self._tokenizer

    # ---- sequences -------------------------------------------------------------------------
    def new_sequence(self) -> "Sequence":
        """An empty sequence in the KV cache; close it (or use ``with``) to free its pages."""
        seq = Sequence(self, next(self._ids))
        _ADD_SEQUENCE(self.kv_cache, seq.id)
        return seq

    def _embed(self, token_ids: np.ndarray):
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.vocab_size):
            raise GenerationError(f"token ids must lie in [0, {self.vocab_size})")
        return self.vm["embed"](self._tensor(token_ids.astype("int32")), self._param_array)

    def _forward(self, entry: str, seqs: Seq["Sequence"], lengths: Seq[int], embeds, *extra, tree=None) -> np.ndarray:
        """Run one compiled entry point over ``seqs``; returns float32 logits (rows, vocab)."""
        for seq, n in zip(seqs, lengths):
            if seq.length + n > self.context_window:
                raise GenerationError(
                    f"{seq.length + n} tokens exceed the context window of {self.context_window}; "
                    "shorten the prompt or max_tokens"
                )
        with self.forward(seqs, lengths, tree):
            logits, _ = self.vm[entry](embeds, *extra, self.kv_cache, self._param_array)
        return self._host_array(logits).reshape(-1, logits.shape[-1])

    def _tensor(self, array: np.ndarray):
        """``array`` as a tensor on the model's device. On the CPU an aligned host copy is wrapped
        as it is (``tvm.runtime.tensor`` takes tens of microseconds, a decode step's token too)."""
        if not self._on_host:
            return tvm.runtime.tensor(array, self.device)
        return tvm.runtime.from_dlpack(_aligned_copy(array))

    def _host_array(self, tensor) -> np.ndarray:
        """``tensor`` as a NumPy array: the VM's own buffer on the CPU (the array keeps it alive;
        the VM allocates a new one per call), a copy from other devices."""
        return np.from_dlpack(tensor) if self._on_host else tensor.numpy()

    @contextlib.contextmanager
    def forward(self, seqs: Seq["Sequence"], lengths: Seq[int], tree: Seq[int] | None = None):
        """The KV cache's view of one call that appends ``lengths[i]`` tokens to ``seqs[i]`` (a
        token tree's parents in ``tree``): opened before the call, closed after it, also on error.
        The sequences count the tokens as appended."""
        args = [self.kv_cache, ShapeTuple([s.id for s in seqs]), ShapeTuple(list(lengths))]
        if tree is not None:
            args.append(ShapeTuple(tree))
        _BEGIN_FORWARD(*args)
        try:
            yield
        finally:
            _END_FORWARD(self.kv_cache)
        for seq, n in zip(seqs, lengths):
            seq.length += n

    def batch_prefill(self, seqs: Seq["Sequence"], token_lists: Seq[Seq[int]]) -> np.ndarray:
        """Prefill several sequences in one call; returns each one's last-position logits (b, vocab)."""
        lengths = [len(t) for t in token_lists]
        if sum(lengths) > self.prefill_chunk:
            raise GenerationError(f"a batch prefill takes at most {self.prefill_chunk} tokens in all")
        last_logits: list[np.ndarray | None] = [None] * len(seqs)
        for start in range(0, max(lengths), self.max_append):
            active = [i for i, n in enumerate(lengths) if n > start]
            chunks = [np.asarray(token_lists[i][start : start + self.max_append], dtype=np.int32) for i in active]
            flat = np.concatenate(chunks)[None, :]
            positions = self._tensor(np.cumsum([c.size for c in chunks]).astype("int32") - 1)
            rows = self._forward("batch_prefill", [seqs[i] for i in active], [c.size for c in chunks],
                                 self._embed(flat), positions)
            for i, row in zip(active, rows):
                last_logits[i] = row
        return np.stack(last_logits)

    def batch_decode(self, seqs: Seq["Sequence"], tokens: Seq[int]) -> np.ndarray:
        """One token for each sequence in one call; returns logits (b, vocab)."""
        ids = np.asarray(tokens, dtype=np.int32)[:, None]
        return self._forward("batch_decode", seqs, [1] * len(seqs), self._embed(ids))

    def generate(self, prompt: str | list[dict], max_tokens: int = generation.DEFAULT_MAX_TOKENS, **options) -> str:
        """Generate a completion of ``prompt``; see :func:`relaxlm.runtime.generation.stream`."""
        return generation.generate(self, prompt, max_tokens=max_tokens, **options)

    def stream(self, prompt: str | list[dict], max_tokens: int = generation.DEFAULT_MAX_TOKENS,
               **options) -> generation.TextStream:
        """Like :meth:`generate`, yielding text pieces as they are decoded."""
        return generation.stream(self, prompt, max_tokens=max_tokens, **options)


class Sequence:
    """One sequence in the model's paged KV cache."""

    def __init__(self, model: Model, seq_id: int):
        self.model = model
        self.id = seq_id
        self.length = 0
        self.closed = False

    def prefill(self, token_ids: Seq[int]) -> np.ndarray:
        """Append ``token_ids`` (in prefill-sized chunks); returns the last position's logits [vocab]."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim != 1 or ids.size == 0:
            raise GenerationError("prefill needs a non-empty list of token ids")
        if self.length + ids.size > self.model.context_window:
            raise GenerationError(
                f"{self.length + ids.size} tokens exceed the context window of {self.model.context_window}; "
                "shorten the prompt"
            )
        logits = None
        for start in range(0, ids.size, self.model.max_append):
            chunk = ids[start : start + self.model.max_append]
            logits = self.model._forward("prefill", [self], [chunk.size], self.model._embed(chunk[None, :]))
        return logits[0]

    def logits_after_each(self, token_ids: Seq[int]) -> np.ndarray:
        """Append ``token_ids`` in one call (at most ``model.max_append``, the most that stays exact);
        returns the logits after each of them (n, vocab)."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim != 1 or not 0 < ids.size <= self.model.max_append:
            raise GenerationError(f"one call appends 1 to {self.model.max_append} tokens, not {ids.size}")
        positions = self.model._tensor(np.arange(ids.size, dtype=np.int32))
        return self.model._forward("batch_prefill", [self], [ids.size], self.model._embed(ids[None, :]), positions)

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token; returns its logits [vocab]."""
        ids = np.asarray([[token_id]], dtype=np.int32)
        return self.model._forward("decode", [self], [1], self.model._embed(ids))[0]

    def verify(self, token_ids: Seq[int]) -> np.ndarray:
        """Append a chain of draft tokens in one call (speculative decoding); returns the logits
        after each of them (n, vocab). Use :meth:`rollback` to drop the rejected tail."""
        ids = np.asarray(token_ids, dtype=np.int32)
        limit = min(self.model.max_append, MAX_DRAFT_TOKENS)
        if ids.size > limit:
            raise GenerationError(f"this model takes at most {limit} draft tokens per verify call")
        chain = [-1] + list(range(ids.size - 1))
        logits = self.model._forward("batch_verify", [self], [ids.size], self.model._embed(ids[None, :]), tree=chain)
        _COMMIT_TREE(self.model.kv_cache, ShapeTuple([self.id]), ShapeTuple([ids.size - 1]))
        return logits

    def rollback(self, n: int) -> None:
        """Drop the last ``n`` tokens from the cache."""
        if not 0 <= n <= self.length:
            raise GenerationError(f"cannot roll back {n} of {self.length} tokens")
        _POPN(self.model.kv_cache, self.id, n)
        self.length -= n

    def fork(self) -> "Sequence":
        """A new sequence sharing this one's tokens so far; both continue independently."""
        child = Sequence(self.model, next(self.model._ids))
        _FORK_SEQUENCE(self.model.kv_cache, self.id, child.id, -1)
        child.length = self.length
        return child

    def close(self) -> None:
        """Free this sequence's pages."""
        if not self.closed:
            _REMOVE_SEQUENCE(self.model.kv_cache, self.id)
            self.closed = True

    def __enter__(self) -> "Sequence":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# TVM wraps host memory only where it starts on this many bytes.
_TENSOR_ALIGNMENT = 64


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``array`` that starts on :data:`_TENSOR_ALIGNMENT` bytes."""
    raw = np.empty(array.nbytes + _TENSOR_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _TENSOR_ALIGNMENT
    copy = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy
