"""Prefill and decode speed of a compiled artifact, optionally against llama.cpp and transformers.

Every runner does the same work: with ``depth`` tokens already in its cache (untimed, like
llama-bench's ``-d``), prefill ``prompt_len`` token ids (drawn with a fixed seed), then ``gen_len``
greedy decode steps. One warm-up round, then ``runs`` rounds; within a round the runners take
turns, so that noise from the (shared) machine hits all of them alike. Each speed is the median
over the rounds. Every runner gets the same number of threads as TVM's pool.

Beside the table, the roofline of decode: the bytes one decode step must read (the weights, and
the KV cache at the positions decoded), this machine's read bandwidth at the same threads, and
decode's speed as a fraction of bandwidth / bytes-per-token.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .model import Model


class BenchError(Exception):
    """A benchmark that cannot run as asked (a missing package, no model file to compare with)."""


def configure_threads(threads: int | None) -> None:
    """Ask TVM's thread pool for ``threads`` threads, and stop it pinning the main thread to a
    core (threads that torch starts later would inherit the pin and share that core). Takes effect
    only before TVM's pool first runs in this process."""
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads must be at least 1, not {threads}")
        os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ["TVM_BIND_THREADS"] = "0"


def tvm_threads() -> int:
    """The number of threads TVM's pool runs with (starting the pool if it has not started)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


# ---- runners -----------------------------------------------------------------------------------
class Runner:
    """One way of running the model: ``reset`` to an empty state, ``extend`` it by a list of
    tokens (a prefill), ``decode`` one token at a time."""

    name: str
    detail: str

    def reset(self) -> None:
        """Start over with an empty state."""
        raise NotImplementedError

    def extend(self, token_ids: list[int]) -> int:
        """Append ``token_ids`` in one prefill; returns the greedy next token."""
        raise NotImplementedError

    def decode(self, token_id: int) -> int:
        """Append one token; returns the greedy next token."""
        raise NotImplementedError

    def finish(self) -> None:
        """Release the state of the last prompt."""

    def seconds(self, context: list[int], prompt: list[int], gen_len: int) -> tuple[float, float]:
        """Seconds for the prefill of ``prompt`` after ``context`` (untimed), and for ``gen_len``
        decode steps after it."""
        self.reset()
        if context:
            self.extend(context)
        start = time.perf_counter()
        token = self.extend(prompt)
        prefilled = time.perf_counter()
        for _ in range(gen_len):
            token = self.decode(token)
        decoded = time.perf_counter()
        self.finish()
        return prefilled - start, decoded - prefilled


class RelaxlmRunner(Runner):
    """The compiled artifact."""

    def __init__(self, model: Model):
        self.model = model
        self.name = "relaxlm"
        self.detail = f"{model.manifest.quantization}, {model.manifest.target}"
        self.seq = None

    def reset(self):
        self.finish()
        self.seq = self.model.new_sequence()

    def extend(self, token_ids):
        return int(self.seq.prefill(token_ids).argmax())

    def decode(self, token_id):
        return int(self.seq.decode(token_id).argmax())

    def finish(self):
        if self.seq is not None:
            self.seq.close()
            self.seq = None


class LlamaBenchRunner(Runner):
    """llama.cpp's own C++ ``llama-bench`` on the GGUF file, one repetition per round: the honest
    anchor (llama-cpp-python's Python layer costs llama.cpp about a fifth of its decode speed).
    It times a prompt of the same length and the same number of decode steps itself, after the
    same depth (``-d``; its decode steps then start at the depth, ours after the prompt)."""

    def __init__(self, binary: Path, gguf: Path, threads: int):
        self.binary, self.gguf, self.threads = binary, gguf, threads
        self.name = "llama.cpp"
        self.detail = f"llama-bench, {gguf.name}"

    def seconds(self, context: list[int], prompt: list[int], gen_len: int) -> tuple[float, float]:
        command = [str(self.binary), "-m", str(self.gguf), "-t", str(self.threads), "-p", str(len(prompt)),
                   "-n", str(gen_len), "-r", "1", "-o", "json"]
        if context:
            command += ["-d", str(len(context))]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=LLAMA_BENCH_TIMEOUT, check=False)
            tests = json.loads(done.stdout) if done.returncode == 0 else None
            speed = {("pp" if t["n_gen"] == 0 else "tg"): float(t["avg_ts"]) for t in tests or []}
        except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as err:
            raise BenchError(f"{self.binary} failed on {self.gguf.name} ({type(err).__name__}: {err})") from None
        if set(speed) != {"pp", "tg"}:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"{self.binary} failed on {self.gguf.name} (exit {done.returncode}: {last})")
        return len(prompt) / speed["pp"], gen_len / speed["tg"]


# Seconds one llama-bench repetition may take.
LLAMA_BENCH_TIMEOUT = 600


class LlamaCppRunner(Runner):
    """llama-cpp-python running the GGUF file, on the CPU: the fallback where no ``llama-bench``
    is at hand."""

    def __init__(self, gguf: Path, threads: int, context: int):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.name = "llama.cpp"
        self.detail = f"llama-cpp-python, {gguf.name}"
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                                   n_gpu_layers=0, verbose=False)

    def _next(self) -> int:
        logits = np.ctypeslib.as_array(self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1),
                                       shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def reset(self):
        self.llm.reset()

    def extend(self, token_ids):
        self.llm.eval(token_ids)
        return self._next()

    def decode(self, token_id):
        self.llm.eval([token_id])
        return self._next()


class TransformersRunner(Runner):
    """Hugging Face transformers in float32 on the CPU, from a HF directory or the GGUF file."""

    def __init__(self, source: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self._torch = torch
        self.name = "transformers"
        self.detail = f"float32, torch {torch.__version__.split('+')[0]}"
        if source.is_dir():
            self.model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                              dtype=torch.float32)
        self.model.eval()
        self.past = None

    def _step(self, ids: list[int]) -> int:
        with self._torch.inference_mode():
            out = self.model(self._torch.tensor([ids]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def reset(self):
        self.past = None

    def extend(self, token_ids):
        return self._step(list(token_ids))

    def decode(self, token_id):
        return self._step([token_id])

    def finish(self):
        self.past = None


# What each comparison needs installed, and how to get it.
REQUIREMENTS = {
    "llama.cpp": [("llama_cpp", "pip install 'relaxlm[bench]' (llama-cpp-python)")],
    "transformers": [("torch", "pip install torch"), ("transformers", "pip install transformers")],
}
LLAMA_BENCH_HINT = "llama.cpp's llama-bench (on PATH, or --llama-bench PATH; .ci/build_llama_cpp.sh builds it)"


def find_llama_bench(explicit: str | os.PathLike | None = None) -> Path | None:
    """The ``llama-bench`` to compare with: ``explicit``, else the one on PATH, else None."""
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BenchError(f"--llama-bench {explicit}: not an executable file")
        return path
    found = shutil.which("llama-bench")
    return Path(found) if found else None


def check_comparisons(names: list[str], llama_bench: Path | None = None) -> None:
    """Fail at once, in one line, on an unknown comparison or one whose package is missing
    (``llama.cpp`` needs no package when ``llama_bench`` is there)."""
    for name in names:
        if name not in REQUIREMENTS:
            raise BenchError(f"unknown comparison '{name}' (known: {', '.join(REQUIREMENTS)})")
        if name == "llama.cpp" and llama_bench is not None:
            continue
        for module, install in REQUIREMENTS[name]:
            if importlib.util.find_spec(module) is None:
                also = f" or {LLAMA_BENCH_HINT}" if name == "llama.cpp" else ""
                raise BenchError(f"--compare {name} needs the '{module}' package: {install}{also}")


def source_of(model: Model, source: str | os.PathLike | None = None) -> Path:
    """The model file the artifact was compiled from (for the comparisons): ``source`` if given,
    else the file or HF directory its manifest records, where it still is."""
    if source is not None:
        path = Path(source)
        if not path.exists():
            raise BenchError(f"--source {source}: no such file or directory")
        return path
    recorded = Path(model.manifest.source)
    if recorded.exists():
        return recorded
    raise BenchError(
        f"{model.path} was compiled from {recorded}, which is no longer there; "
        "pass --source (the HF directory, .gguf file or bundled alias it was compiled from)"
    )


def _comparison(name: str, source: Path, llama_bench: Path | None) -> Callable[[int, int], Runner]:
    """How to build runner ``name`` from ``source`` (given threads and context); checks up front
    that the source suits it, so that a mismatch fails before anything slow has started."""
    if name == "llama.cpp":
        if source.suffix.lower() != ".gguf":
            raise BenchError(f"--compare llama.cpp needs a .gguf file, and {source} is not one; pass --source FILE.gguf")
        if llama_bench is not None:
            return lambda threads, context: LlamaBenchRunner(llama_bench, source, threads)
        return lambda threads, context: LlamaCppRunner(source, threads, context)
    if source.is_dir() or source.suffix.lower() == ".gguf":
        return lambda threads, context: TransformersRunner(source, threads)
    raise BenchError(f"--compare transformers needs a HF directory or a .gguf file, not {source}")


# ---- the roofline -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Roofline:
    """What bounds decode from above: the bytes one decode step reads, and how fast this machine
    reads them (a streaming read on TVM's pool, same threads)."""

    weight_bytes: int
    # The KV cache one decode step reads, averaged over the steps timed.
    kv_bytes: float
    bandwidth: float

    @property
    def bytes_per_token(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def decode_tps(self) -> float:
        """The decode speed at which reading would take all the time."""
        return self.bandwidth / self.bytes_per_token


def weight_bytes_per_token(model: Model) -> int:
    """The weight bytes one decode step reads: every parameter, except an untied embedding table
    (a decode step gathers one of its rows; a tied one is read whole by the logits)."""
    sizes = {name: int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize
             for name, p in zip(model.manifest.params, model.params)}
    untied = any(name.startswith("lm_head.") for name in sizes)
    return sum(size for name, size in sizes.items() if not (untied and name.startswith(EMBEDDING_PREFIX)))


EMBEDDING_PREFIX = "model.embed_tokens."


def kv_bytes_per_position(model: Model, position: int) -> int:
    """The KV cache bytes one decode step reads at ``position`` (keys and values of every layer;
    a sliding-window layer reads at most its window)."""
    from relaxlm.frontends import family_for

    _, family = family_for(model.manifest.model_config)
    config = family.config_class.from_hf(model.manifest.model_config)
    window = config.sliding_window
    positions = sum(min(position, window) if kind == "mha_sliding" else position for kind in config.attention_kinds)
    itemsize = np.dtype(model.manifest.model_dtype).itemsize
    return 2 * config.num_key_value_heads * config.head_dim * itemsize * positions


# A read of this many bytes streams from memory on any CPU's caches.
PROBE_BYTES = 512 << 20


def read_bandwidth(repeats: int = 5) -> float:
    """This machine's streaming read bandwidth in bytes/s on TVM's thread pool: the best of
    ``repeats`` sums of a buffer larger than any cache, by a kernel compiled for this CPU."""
    import tvm
    from tvm.script import tirx as T
    from tvm.target import codegen

    lanes, tasks = 16, 64
    per_task = PROBE_BYTES // 4 // tasks // lanes

    @T.prim_func
    def read_all(data: T.Buffer((tasks, per_task, lanes), "float32"), sums: T.Buffer((tasks, lanes), "float32")):
        T.func_attr({"global_symbol": "read_all", "tir.noalias": True})
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((lanes,), "float32", scope="local")
            for lane in T.vectorized(lanes):
                acc[lane] = T.float32(0)
            for i in range(per_task):
                for lane in T.vectorized(lanes):
                    acc[lane] = acc[lane] + data[task, i, lane]
            for lane in T.vectorized(lanes):
                sums[task, lane] = acc[lane]

    kernel = tvm.compile(read_all, target=tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}))
    data = tvm.runtime.tensor(np.ones((tasks, per_task, lanes), "float32"))
    sums = tvm.runtime.tensor(np.zeros((tasks, lanes), "float32"))
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        kernel(data, sums)
        best = min(best, time.perf_counter() - start)
    return PROBE_BYTES / best


def roofline(model: Model, depth: int, prompt_len: int, gen_len: int) -> Roofline | None:
    """The roofline of decode after ``depth + prompt_len`` tokens; None off the CPU."""
    if model.manifest.device != "cpu":  # the probe reads host memory
        return None
    first = depth + prompt_len
    kv = statistics.mean(kv_bytes_per_position(model, first + step) for step in range(gen_len))
    return Roofline(weight_bytes_per_token(model), kv, read_bandwidth())


# ---- measuring ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One runner's median speeds."""

    runner: str
    detail: str
    prefill_tps: float
    decode_tps: float


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """The setup and one row per runner; the first row is relaxlm."""

    setup: dict[str, Any]
    rows: list[BenchRow]
    roofline: Roofline | None = None


def measure(runners: list[Runner], context: list[int], prompt: list[int], gen_len: int, runs: int,
            progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """A warm-up round, then ``runs`` rounds with the runners interleaved; median speeds."""
    times: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(runners))}
    for round_ in range(runs + 1):
        if progress:
            progress("warm-up" if round_ == 0 else f"run {round_}/{runs}")
        for i, runner in enumerate(runners):
            seconds = runner.seconds(context, prompt, gen_len)
            if round_ > 0:
                times[i].append(seconds)
    rows = []
    for i, runner in enumerate(runners):
        prefill = statistics.median(len(prompt) / p for p, _ in times[i])
        decode = statistics.median(gen_len / d for _, d in times[i])
        rows.append(BenchRow(runner.name, runner.detail, prefill, decode))
    return rows


def bench(model: Model, prompt_len: int = 128, gen_len: int = 64, runs: int = 5, compare: tuple[str, ...] = (),
          source: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None,
          llama_bench: Path | None = None, depth: int = 0) -> BenchResult:
    """Benchmark ``model`` (and each runner named in ``compare``: ``llama.cpp``, ``transformers``)
    with ``depth`` tokens already in the cache.

    Call :func:`configure_threads` before the model is loaded; every runner then gets TVM's thread
    count. ``source`` is the model file the comparisons load (see :func:`source_of`); llama.cpp runs
    as ``llama_bench`` (see :func:`find_llama_bench`) where given, else through llama-cpp-python."""
    for name, value, least in (("prompt length", prompt_len, 1), ("generation length", gen_len, 1), ("runs", runs, 1),
                               ("depth", depth, 0)):
        if value < least:
            raise BenchError(f"the {name} must be at least {least}, not {value}")
    if depth + prompt_len + gen_len > model.context_window:
        terms = " + ".join(str(n) for n in (depth, prompt_len, gen_len) if n)
        raise BenchError(f"{terms} tokens exceed the context window of {model.context_window}")
    check_comparisons(list(compare), llama_bench)
    path = source_of(model, source) if compare else None
    builders = {name: _comparison(name, path, llama_bench) for name in compare}
    threads = tvm_threads()
    runners: list[Runner] = [RelaxlmRunner(model)]
    for name, build in builders.items():
        if progress:
            progress(f"loading {name} from {path}")
        runners.append(build(threads, depth + prompt_len + gen_len))
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, size=depth + prompt_len).tolist()
    if progress:
        progress("measuring this machine's read bandwidth")
    limits = roofline(model, depth, prompt_len, gen_len)
    rows = measure(runners, tokens[:depth], tokens[depth:], gen_len, runs, progress)
    setup = {"artifact": str(model.path), "threads": threads, "depth": depth, "prompt_len": prompt_len,
             "gen_len": gen_len, "runs": runs, "cpus": os.cpu_count()}
    return BenchResult(setup, rows, limits)


def format_table(result: BenchResult) -> str:
    """The result as a text table: speeds, and relaxlm's speed divided by each runner's; then
    the roofline of relaxlm's decode."""
    s = result.setup
    after = f" after {s['depth']} cached" if s["depth"] else ""
    lines = [
        f"{s['artifact']}: prompt {s['prompt_len']} tokens{after}, {s['gen_len']} decode steps, batch 1, "
        f"{s['threads']} threads ({s['cpus']} CPUs), median of {s['runs']} runs after a warm-up",
    ]
    labels = [f"{row.runner} ({row.detail})" for row in result.rows]
    width = max(46, *(len(label) for label in labels))
    lines.append(f"{'engine':<{width}} {'prefill tok/s':>13} {'decode tok/s':>12} {'relaxlm/x prefill':>17} "
                 f"{'relaxlm/x decode':>16}")
    ours = result.rows[0]
    for label, row in zip(labels, result.rows):
        lines.append(f"{label:<{width}} {row.prefill_tps:>13.1f} {row.decode_tps:>12.1f} "
                     f"{ours.prefill_tps / row.prefill_tps:>17.2f} {ours.decode_tps / row.decode_tps:>16.2f}")
    if result.roofline is not None:
        lines.append(format_roofline(result.roofline, ours.decode_tps, s["threads"]))
    return "\n".join(lines)


def format_roofline(limits: Roofline, decode_tps: float, threads: int) -> str:
    """One line: bytes per decoded token, bandwidth, and decode as a fraction of the roofline."""
    return (f"roofline: a decode step reads {_megabytes(limits.weight_bytes)} MB of weights + "
            f"{_megabytes(limits.kv_bytes)} MB of KV cache; this machine streams {limits.bandwidth / 1e9:.1f} GB/s "
            f"with {threads} threads, at most {limits.decode_tps:.1f} tok/s; relaxlm decodes at "
            f"{decode_tps / limits.decode_tps:.0%} of it")


def _megabytes(size: float) -> str:
    """``size`` bytes in MB, to three significant digits or more (a tiny model's too)."""
    value = size / 1e6
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
