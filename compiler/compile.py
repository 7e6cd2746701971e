"""``compile_model``: a compile in its steps — read, export, build, calibrate, convert weights,
write — each a function below. Everything is written into a staging directory that becomes the
artifact only when complete (:mod:`.output`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import tvm
from safetensors.numpy import save_file
from tqdm import tqdm

from relaxlm import frontends, passes, targets
from relaxlm.runtime.artifact import CONFIG_FILE, Manifest, TokenizerInfo, sha256_of
from relaxlm.runtime.model import Model

from . import calibration
from .errors import CompileError
from .output import check_replaceable, publish, staging_directory

PAGE_SIZE = 16
MAX_PREFILL_CHUNK = 1024
SHARD_BYTES = 1 << 29
# Calibration runs a float32 build on the CPU (sampling 512 tokens); past this size it would take
# long, and the memory of the machine, so it is on by default only below it.
CALIBRATION_DEFAULT_MAX_BYTES = 4 << 30
# What TVM prints on stderr while it builds that says nothing to a relaxlm user: the embedding
# lookup's "fast" gather is given only ids the runtime has checked to be in range.
TVM_NOISE = ("Fast mode segfaults when there are out-of-bounds indices",)
# The sampling settings of a generation_config.json that the runtime uses.
GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
# What ``activations`` may be: rounded per 32 values to integers for integer dot products (int16:
# ~3e-5 of a projection's largest output off; int8: llama.cpp's arithmetic, ~0.7% off, perplexity
# +0.72% on SmolLM2), or float32 (exact).
ACTIVATIONS = ("int16", "int8", "float32")


class _Report:
    """Says on stderr what the compile does and how long each phase took (when ``verbose``);
    progress bars only when stderr is a terminal."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.bars = verbose and sys.stderr.isatty()
        self.seconds: dict[str, float] = {}

    def say(self, line: str) -> None:
        """One line of what is happening."""
        if self.verbose:
            print(f"relaxlm: {line}", file=sys.stderr, flush=True)

    def record(self, name: str, seconds: float) -> None:
        """Note that phase ``name`` took ``seconds``."""
        self.seconds[name] = seconds
        if self.verbose:
            print(f"  {name:<9} {seconds:6.1f} s", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        start = time.perf_counter()
        yield
        self.record(name, time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class _Request:
    """What one compile works from."""

    source: frontends.ModelSource
    origin: Path
    architecture: str
    family: frontends.Family
    config: frontends.ModelConfig
    resolved: targets.ResolvedTarget
    scheme: passes.QuantizationScheme
    context_window: int
    prefill_chunk: int
    debug_dump: Path | None = None
    # None: decide by the scheme and the model's size (see _should_calibrate).
    calibrate: bool | None = False
    # What the block-layout projections round their activations to: float32, int16 or int8 (_activations).
    activations: str = "float32"


@dataclasses.dataclass(frozen=True)
class _Exported:
    """The exported module, its parameters, and the unquantized parameters the weights are
    converted for (named as HF's tensors; the scheme turns each into what the module stores)."""

    mod: tvm.IRModule
    named_params: list[tuple[str, Any]]
    source_params: list[tuple[str, tuple[int, ...], str]]


def default_output(source_name: str, quantization: str, target_name: str) -> Path:
    """``dist/<name>-<quantization>-<target>`` under the working directory."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{source_name}-{quantization}-{target_name.replace(':', '-')}")
    return Path("dist") / safe


def compile_model(model: str | os.PathLike, target: str = "auto", quantization: str | None = None,
                  output: str | os.PathLike | None = None, *, context_window: int | None = None,
                  prefill_chunk: int | None = None, debug_dump: str | os.PathLike | None = None,
                  calibrate: bool | None = None, activations: str | None = None, force: bool = False,
                  verbose: bool = False) -> Path:
    """Compile ``model`` (a HF directory, a ``.gguf`` file or a bundled alias) for ``target``
    with ``quantization`` (default: the target's) and return the artifact directory.

    An existing ``output`` is replaced only when it is an artifact relaxlm wrote; ``force`` also
    lets it be an empty directory or an older artifact (:func:`.output.check_replaceable`).
    ``calibrate`` measures activation statistics on a float32 build first and weighs the
    quantization by them (``compiler.calibration``). By default it is on for 4-bit schemes and
    models whose float32 weights take at most :data:`CALIBRATION_DEFAULT_MAX_BYTES`.
    ``activations`` is one of :data:`ACTIVATIONS` (default: :func:`_activations`)."""
    if activations is not None and activations not in ACTIVATIONS:
        raise CompileError(f"activations must be one of {', '.join(ACTIVATIONS)}, not '{activations}'")
    for option, value in (("context_window", context_window), ("prefill_chunk", prefill_chunk)):
        if value is not None and value <= 0:
            raise CompileError(f"{option} must be a positive number of tokens, not {value}")
    resolved = targets.resolve(target)
    chosen = passes.get_scheme(quantization) if quantization else None
    origin = frontends.locate(model).resolve()
    name = str(model) if str(model) in frontends.BUNDLED else frontends.source_name(origin)
    out = Path(output) if output else None
    # A GGUF's default scheme depends on its tensor types, known once it is read; the output is
    # checked first whenever it is known, so that a refusal comes before seconds of reading.
    if out is None and chosen is not None:
        out = default_output(name, chosen.name, resolved.name)
    if out is not None:
        check_replaceable(out, force)
    report = _Report(verbose)
    # A GGUF file takes seconds to read (its token arrays): say what is happening first. A HF
    # directory's config reads at once, so its errors come before any line of progress.
    reads_slowly = origin.is_file()
    if reads_slowly:
        report.say(f"compiling {model} for {resolved.name}" + (f" at {chosen.name}" if chosen else ""))
    with contextlib.ExitStack() as closing:
        start = time.perf_counter()
        source = frontends.open_source(model)
        closing.callback(source.close)
        scheme = _bound_scheme(chosen or _default_scheme(source, resolved), source)
        if out is None:
            out = default_output(name, scheme.name, resolved.name)
            check_replaceable(out, force)
        request = dataclasses.replace(
            _request(source, origin, resolved, scheme, context_window, prefill_chunk, calibrate,
                     Path(debug_dump) if debug_dump else None),
            activations=_activations(activations, scheme, resolved))
        if not reads_slowly:
            report.say(f"compiling {model} for {resolved.name} at {scheme.name}")
        elif chosen is None:
            report.say(f"quantization: {scheme.name}")
        if request.activations != "float32":
            report.say(f"activations: {request.activations} for the projections' integer dot products"
                       + (", as llama.cpp rounds them" if request.activations == "int8" else "")
                       + " (--activations float32 for float)")
        report.record("read", time.perf_counter() - start)
        report.say(f"{request.architecture}, {request.config.num_hidden_layers} layers, "
                   f"context {request.context_window}")
        with staging_directory(out) as staging:
            _compile_into(request, staging, report)
            publish(staging, out)
    report.say(f"wrote {out} in {sum(report.seconds.values()):.1f} s")
    return out


def _default_scheme(source: frontends.ModelSource, resolved: targets.ResolvedTarget) -> passes.QuantizationScheme:
    """``gguf`` for a GGUF whose weights are all of block types it runs natively (or floats),
    so that its own bits are kept; the target's default otherwise."""
    gguf = passes.get_scheme("gguf")
    if isinstance(source, frontends.GGUFSource) and gguf.runs_natively(source.weight_types()):
        return gguf
    return passes.get_scheme(resolved.recipe.default_quantization)


def _activations(asked: str | None, scheme: passes.QuantizationScheme, resolved: targets.ResolvedTarget) -> str:
    """int16 by default where the kernels have integer activations: llama.cpp's block layouts (the
    ``gguf`` scheme) on a CPU with integer dot products; float32 otherwise. Asking for integers
    where they are not there is an error."""
    possible = isinstance(scheme, passes.GGUFNative) and resolved.recipe.integer_activations(resolved.target)
    if asked is None:
        return "int16" if possible else "float32"
    if asked != "float32" and not possible:
        raise CompileError(f"{asked} activations need the gguf quantization on a CPU with AVX2; {scheme.name} on "
                           f"{resolved.name} computes in float32 (leave out --activations)")
    return asked


def _bound_scheme(scheme: passes.QuantizationScheme, source: frontends.ModelSource) -> passes.QuantizationScheme:
    """The ``gguf`` scheme bound to the source's tensor types; the others as they are."""
    if not isinstance(scheme, passes.GGUFNative):
        return scheme
    if not isinstance(source, frontends.GGUFSource):
        raise CompileError(f"quantization 'gguf' keeps a GGUF file's own blocks, but {source.name} is not a GGUF "
                           "file; choose another quantization (q4f32_1, q8f32_1, q0f32 …)")
    return scheme.for_source(source.tensor_info)


def _request(source, origin, resolved, scheme, context_window, prefill_chunk, calibrate, debug_dump) -> _Request:
    architecture, family = frontends.family_for(source.config)
    config = family.config_class.from_hf(source.config)
    context = min(context_window or config.context_window_size, config.context_window_size)
    chunk = min(prefill_chunk or MAX_PREFILL_CHUNK, context)
    return _Request(source, origin, architecture, family, config, resolved, scheme, context, chunk,
                    debug_dump, calibrate)


def _compile_into(r: _Request, staging: Path, report: _Report) -> None:
    """Every step of the compile, writing the artifact into ``staging``."""
    with report.phase("export"):
        exported = export(r)
    for note in r.scheme.notes(exported.source_params):
        report.say(note)
    with report.phase("build"):
        library = r.resolved.recipe.export_library(build(r, exported), staging)
    with report.phase("tokenizer"):
        tokenizer = save_tokenizer(r, staging)
    found = None
    if _should_calibrate(r, exported, report):
        with report.phase("calibrate"):
            found = calibrate(r, staging, tokenizer, report.bars)
    with report.phase("weights"):
        weights = write_weights(r, exported, staging, found, report.bars)
    manifest = _manifest(r, exported, staging, library, weights, tokenizer, found)
    manifest.write(staging)


# ---- the steps -----------------------------------------------------------------------------
def export(r: _Request) -> _Exported:
    """The family's module, quantized by the scheme, exported to Relax with the target's KV cache."""
    module = r.family.model_class(r.config, dtype=r.scheme.model_dtype)
    source_params = [(n, tuple(int(d) for d in p.shape), p.dtype) for n, p in module.named_parameters()]
    module = r.scheme.quantize_module(module)
    mod, named_params = module.export()
    mod = passes.dispatch_kv_cache(mod, module.kv_cache_spec(), r.resolved.target, r.resolved.recipe.kv_cache_kernels)
    return _Exported(mod, named_params, source_params)


def build(r: _Request, exported: _Exported):
    """The Relax pass pipeline and TVM's build for the target: the executable."""
    pipeline = passes.relax_pipeline(r.resolved.target, r.resolved.recipe, r.debug_dump,
                                     activations=r.activations)
    with _without_tvm_noise():
        return tvm.compile(exported.mod, r.resolved.target, relax_pipeline=pipeline)


def save_tokenizer(r: _Request, staging: Path) -> TokenizerInfo:
    """The source's tokenizer files, written into ``staging``."""
    present = r.source.save_tokenizer(staging)
    config_file = staging / "tokenizer_config.json"
    template = (staging / "chat_template.jinja").is_file() or (staging / "chat_template.json").is_file() or (
        config_file.is_file() and bool(json.loads(config_file.read_text()).get("chat_template")))
    return TokenizerInfo(present, tuple(_eos_ids(r.source.config, staging)), present and template)


def calibrate(r: _Request, staging: Path, tokenizer: TokenizerInfo, bars: bool) -> calibration.Calibration:
    """Activation statistics from a float32 build of the model for this CPU, built and run in
    memory (the tokenizer is the one already in ``staging``)."""
    float_request = dataclasses.replace(
        r, scheme=passes.get_scheme("q0f32"), resolved=targets.resolve(targets.HOST), debug_dump=None, calibrate=False,
        context_window=min(calibration.SEQUENCE_TOKENS, r.context_window),
        prefill_chunk=min(calibration.SEQUENCE_TOKENS, r.context_window))
    exported = export(float_request)
    executable = build(float_request, exported)
    converted = dict(_converted(float_request, exported))
    params = [converted[name] for name, _ in exported.named_params]
    manifest = _manifest(float_request, exported, staging, "", {}, tokenizer, None)
    capacity = len(calibration.OPENINGS) * (calibration.SEQUENCE_TOKENS + PAGE_SIZE)
    model = Model.from_parts(staging, manifest, executable, params, max_total_tokens=capacity)
    return calibration.calibrate(model, verbose=bars)


def write_weights(r: _Request, exported: _Exported, staging: Path, found: calibration.Calibration | None,
                  bars: bool) -> dict[str, str]:
    """The converted weights, stored by the scheme, as safetensors shards; returns {file: sha256}.

    What the scheme stores must be exactly the exported module's parameters, with their shapes
    and dtypes, or the runtime could not load it."""
    expected = dict(exported.named_params)
    importance, hessians = (found.importance, found.hessians) if found else ({}, {})
    shards: list[dict] = [{}]
    size = 0
    stored_names = set()
    converted = tqdm(_converted(r, exported), total=len(exported.source_params), desc="converting weights",
                     unit="tensor", disable=not bars, file=sys.stderr)
    for name, array in converted:
        for key, stored in r.scheme.convert(name, array, importance.get(name), hessians.get(name)).items():
            _check_stored(key, stored, expected.get(key), r.scheme)
            stored_names.add(key)
            if size and size + stored.nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][key] = stored
            size += stored.nbytes
    if stored_names != set(expected):
        raise CompileError(f"quantization {r.scheme.name} stored no weights for {sorted(set(expected) - stored_names)}")
    checksums = {}
    for i, shard in enumerate(shards):
        file = staging / f"params_shard_{i}.safetensors"
        save_file(shard, str(file))
        checksums[file.name] = sha256_of(file)
    return checksums


def _manifest(r: _Request, exported: _Exported, staging: Path, library: str, weights: dict[str, str],
              tokenizer: TokenizerInfo, found: calibration.Calibration | None) -> Manifest:
    cpu, features = r.resolved.cpu_requirements()
    return Manifest(
        architecture=r.architecture,
        family=r.family.name,
        model_config=r.source.config,
        source=str(r.origin),
        quantization=r.scheme.name,
        activations=r.activations,
        model_dtype=r.scheme.model_dtype,
        target=r.resolved.name,
        device=r.resolved.recipe.device,
        runs_in=r.resolved.recipe.runs_in,
        library=library,
        library_sha256=sha256_of(staging / library) if library else "",
        cpu=cpu,
        cpu_features=features,
        vocab_size=r.config.vocab_size,
        context_window_size=r.context_window,
        prefill_chunk_size=r.prefill_chunk,
        page_size=PAGE_SIZE,
        sliding_window=r.config.sliding_window,
        max_append=r.resolved.max_append(r.prefill_chunk, r.config.sliding_window),
        params=tuple(n for n, _ in exported.named_params),
        weights=weights,
        files=tuple(sorted({CONFIG_FILE, *(p.name for p in staging.iterdir())} - {".relaxlm-staging"})),
        tokenizer=tokenizer,
        generation=_generation_defaults(staging),
        calibration=found.summary() if found else None,
    )


# ---- helpers ---------------------------------------------------------------------------------
def _should_calibrate(r: _Request, exported: _Exported, report: _Report) -> bool:
    """Whether this compile calibrates: as asked, or by default where the scheme gains from it
    and the float32 build stays small enough to run on this CPU in minutes."""
    if not r.scheme.calibrates:
        return False
    if r.calibrate is not None:
        return r.calibrate
    float32_bytes = 4 * sum(math.prod(shape) for _, shape, _ in exported.source_params)
    if float32_bytes > CALIBRATION_DEFAULT_MAX_BYTES:
        report.say(f"not calibrating: the float32 build would take {float32_bytes / 2**30:.1f} GiB "
                   "(pass --calibrate to calibrate anyway)")
        return False
    return True


def _converted(r: _Request, exported: _Exported) -> Iterator[tuple[str, Any]]:
    fixup = frontends.tensor_fixup(r.family, r.source, r.config)
    return frontends.convert_weights(r.source, exported.source_params, fixup, r.scheme.keeps_blocks)


def _check_stored(key: str, stored, param, scheme) -> None:
    if param is None or tuple(stored.shape) != tuple(int(d) for d in param.shape) or str(stored.dtype) != param.dtype:
        declared = None if param is None else (tuple(int(d) for d in param.shape), param.dtype)
        raise CompileError(f"quantization {scheme.name} stored '{key}' as {tuple(stored.shape)} {stored.dtype}, "
                           f"but the compiled model declares {declared}")


def _eos_ids(hf_config: dict, staging: Path) -> list[int]:
    ids = hf_config.get("eos_token_id")
    generation_file = staging / "generation_config.json"
    if generation_file.is_file():
        ids = json.loads(generation_file.read_text()).get("eos_token_id", ids)
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


def _generation_defaults(staging: Path) -> dict[str, Any]:
    """The sampling settings the model's generation_config.json gives, if it has one."""
    generation_file = staging / "generation_config.json"
    if not generation_file.is_file():
        return {}
    settings = json.loads(generation_file.read_text())
    return {key: settings[key] for key in GENERATION_KEYS if settings.get(key) is not None}


@contextlib.contextmanager
def _without_tvm_noise() -> Iterator[None]:
    """Run the block with the process's stderr (where TVM's C++ logs) going to a file, then pass
    on every line of it but the :data:`TVM_NOISE` ones."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(noise in line for noise in TVM_NOISE):
                    sys.stderr.write(line)
            sys.stderr.flush()
