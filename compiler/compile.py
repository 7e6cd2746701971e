"""``compile_model``: read a model, export it, run the passes, build for the target, and write
the artifact (complete or absent: built in a temporary directory, renamed into place)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import tvm
from safetensors.numpy import save_file
from tqdm import tqdm

from relaxlm import frontends, passes, targets
from relaxlm.runtime.artifact import CONFIG_FILE, FORMAT_VERSION, sha256_of
from relaxlm.runtime.engine import Model

from . import calibration

PAGE_SIZE = 16
MAX_PREFILL_CHUNK = 1024
SHARD_BYTES = 1 << 29
# Calibration runs a float32 build on the CPU (sampling 512 tokens); past this size it would take
# long, and the memory of the machine, so it is on by default only below it.
CALIBRATION_DEFAULT_MAX_BYTES = 4 << 30


class CompileError(Exception):
    """A compile request that cannot be carried out; the message says what to do."""


class _Phases:
    """Times each phase and reports it on stderr."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.seconds: dict[str, float] = {}

    def record(self, name: str, seconds: float) -> None:
        """Note that phase ``name`` took ``seconds``."""
        self.seconds[name] = seconds
        if self.verbose:
            print(f"  {name:<9} {seconds:6.1f} s", file=sys.stderr)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.record(name, time.perf_counter() - start)


def default_output(source_name: str, quantization: str, target_name: str) -> Path:
    """``dist/<name>-<quantization>-<target>`` under the working directory."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{source_name}-{quantization}-{target_name.replace(':', '-')}")
    return Path("dist") / safe


def compile_model(model: str | os.PathLike, target: str = "llvm", quantization: str | None = None,
                  output: str | os.PathLike | None = None, *, context_window: int | None = None,
                  prefill_chunk: int | None = None, debug_dump: str | os.PathLike | None = None,
                  calibrate: bool | None = None, verbose: bool = False) -> Path:
    """Compile ``model`` (a HF directory, a ``.gguf`` file or a bundled alias) for ``target``
    with ``quantization`` (default: the target's) and return the artifact directory.

    ``calibrate`` measures activation statistics on a float32 build first and weighs the
    quantization by them (``compiler.calibration``). By default it is on for 4-bit schemes and
    models whose float32 weights take at most :data:`CALIBRATION_DEFAULT_MAX_BYTES`."""
    for option, value in (("context_window", context_window), ("prefill_chunk", prefill_chunk)):
        if value is not None and value <= 0:
            raise CompileError(f"{option} must be a positive number of tokens, not {value}")
    resolved = targets.resolve(target)
    scheme = passes.get_scheme(quantization or resolved.recipe.default_quantization)
    phases = _Phases(verbose)
    start = time.perf_counter()
    source = frontends.open_source(model)
    try:
        # Everything that can reject the input runs before the first line of progress.
        architecture, family = frontends.family_for(source.config)
        config = family.config_class.from_hf(source.config)
        name = str(model) if str(model) in frontends.BUNDLED else source.name
        out = Path(output) if output else default_output(name, scheme.name, resolved.name)
        if verbose:
            print(f"relaxlm: compiling {model} ({architecture}) for {resolved.name} at {scheme.name}", file=sys.stderr)
        phases.record("read", time.perf_counter() - start)
        build = _Build(source, architecture, family, config, resolved, scheme,
                       Path(debug_dump) if debug_dump else None,
                       calibrate)
        return _write_artifact(build, out, phases, context_window, prefill_chunk, verbose)
    finally:
        source.close()


@dataclasses.dataclass
class _Build:
    """What one compile works from."""

    source: frontends.ModelSource
    architecture: str
    family: frontends.Family
    config: frontends.ModelConfig
    resolved: targets.ResolvedTarget
    scheme: passes.QuantizationScheme
    debug_dump: Path | None
    # None: decide by the scheme and the model's size (see _should_calibrate).
    calibrate: bool | None = False


def _write_artifact(b: _Build, out: Path, phases: _Phases, context_window, prefill_chunk, verbose) -> Path:
    config = b.config
    context = min(context_window or config.context_window_size, config.context_window_size)
    chunk = min(prefill_chunk or MAX_PREFILL_CHUNK, context)
    with phases("export"):
        module = b.family.model_class(config, dtype=b.scheme.model_dtype)
        # Weights are converted for the unquantized module's parameters (named as HF's tensors);
        # the scheme turns each into the arrays the quantized module stores.
        source_params = [(n, tuple(int(d) for d in p.shape), p.dtype) for n, p in module.named_parameters()]
        module = b.scheme.quantize_module(module)
        mod, named_params = module.export()
        mod = passes.dispatch_kv_cache(mod, module.kv_cache_spec(), b.resolved.target)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with phases("build"):
            recipe = b.resolved.recipe
            pipeline = passes.relax_pipeline(b.resolved.target, recipe, b.debug_dump)
            executable = tvm.compile(mod, b.resolved.target, relax_pipeline=pipeline)
            library = recipe.export_library(executable, staging)
        found = None
        if _should_calibrate(b, source_params, verbose):
            with phases("calibrate"):
                found = _calibrate(b, out.parent, verbose)
        with phases("weights"):
            fixup = frontends.tensor_fixup(b.family, b.source, config)
            converted = frontends.convert_weights(b.source, source_params, fixup)
            weights = _write_weights(staging, b.scheme, converted, len(source_params),
                                     {n: p for n, p in named_params}, found.importance if found else {},
                                     found.hessians if found else {}, verbose)
        with phases("tokenizer"):
            has_tokenizer = b.source.save_tokenizer(staging)
        manifest = {
            "format_version": FORMAT_VERSION,
            "architecture": b.architecture,
            "family": b.family.name,
            "model_config": b.source.config,
            "quantization": b.scheme.name,
            "model_dtype": b.scheme.model_dtype,
            "target": b.resolved.name,
            "device": recipe.device,
            "library": library,
            "vocab_size": config.vocab_size,
            "context_window_size": context,
            "prefill_chunk_size": chunk,
            "page_size": PAGE_SIZE,
            "sliding_window": config.sliding_window,
            "stage_count": 1,
            "params": [n for n, _ in named_params],
            "weights": weights,
            "tokenizer": {"present": has_tokenizer, "eos_token_ids": _eos_ids(b.source.config, staging)},
            "generation": {"temperature": 0.0, "max_tokens": 256},
            "calibration": found.summary() if found else None,
        }
        (staging / CONFIG_FILE).write_text(json.dumps(manifest, indent=2, default=str))
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if verbose:
        total = sum(phases.seconds.values())
        print(f"relaxlm: wrote {out} in {total:.1f} s", file=sys.stderr)
    return out


def _should_calibrate(b: _Build, source_params, verbose: bool) -> bool:
    """Whether this compile calibrates: as asked, or by default where the scheme gains from it
    and the float32 build stays small enough to run on this CPU in minutes."""
    if not b.scheme.calibrates:
        return False
    if b.calibrate is not None:
        return b.calibrate
    float32_bytes = 4 * sum(math.prod(shape) for _, shape, _ in source_params)
    if float32_bytes > CALIBRATION_DEFAULT_MAX_BYTES:
        if verbose:
            print(f"relaxlm: not calibrating: the float32 build would take {float32_bytes / 2**30:.1f} GiB "
                  "(pass --calibrate to calibrate anyway)", file=sys.stderr)
        return False
    return True


def _calibrate(b: _Build, scratch: Path, verbose: bool) -> calibration.Calibration:
    """Build the model at float32 for the CPU in a scratch directory, and calibrate on it."""
    float_build = dataclasses.replace(b, scheme=passes.get_scheme("q0f32"), resolved=targets.resolve("llvm"),
                                      debug_dump=None, calibrate=False)
    with tempfile.TemporaryDirectory(prefix=".calibration.", dir=scratch) as directory:
        path = _write_artifact(float_build, Path(directory) / "float32", _Phases(False),
                               context_window=calibration.SEQUENCE_TOKENS, prefill_chunk=None, verbose=False)
        capacity = len(calibration.OPENINGS) * (calibration.SEQUENCE_TOKENS + PAGE_SIZE)
        return calibration.calibrate(Model(path, device="cpu", max_total_tokens=capacity), verbose=verbose)


def _write_weights(staging: Path, scheme, converted, count: int, expected: dict, importance: dict,
                   hessians: dict, verbose: bool) -> dict[str, str]:
    """Write converted weights (stored by ``scheme``) as safetensors shards; returns {file: sha256}.

    ``expected`` maps the exported module's parameter names to its parameters: what the scheme
    stores must be exactly those, with their shapes and dtypes, or the runtime could not load it."""
    shards: list[dict] = [{}]
    size = 0
    stored_names = set()
    for name, array in tqdm(converted, total=count, desc="converting weights", unit="tensor",
                            disable=not verbose, file=sys.stderr):
        for key, stored in scheme.convert(name, array, importance.get(name), hessians.get(name)).items():
            _check_stored(key, stored, expected.get(key), scheme)
            stored_names.add(key)
            if size and size + stored.nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][key] = stored
            size += stored.nbytes
    if stored_names != set(expected):
        raise CompileError(f"quantization {scheme.name} stored no weights for {sorted(set(expected) - stored_names)}")
    checksums = {}
    for i, shard in enumerate(shards):
        file = staging / f"params_shard_{i}.safetensors"
        save_file(shard, str(file))
        checksums[file.name] = sha256_of(file)
    return checksums


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


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished artifact into place, replacing an older one only once it is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
