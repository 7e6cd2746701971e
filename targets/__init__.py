"""Named targets: what a user types after ``--target`` and what TVM needs to build for it.

:data:`TARGETS` is the registry. A target knows its TVM ``Target``, its dlight schedule rules,
the dtype it computes fastest in, the default quantization, its library format and the runtime
device it runs on. Names are ``kind`` or ``kind:arch`` (``cuda:sm_86``, ``metal:m2``); ``auto``
is the best device on this machine. The GPU recipes live in :mod:`.gpu`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType
from typing import Callable

import tvm
from tvm.relax.backend.cpu_generic import pipeline as cpu_backend
from tvm.relax.backend.cuda import pipeline as cuda_backend
from tvm.relax.backend.gpu_generic import pipeline as gpu_backend

from . import cpu_attention, cpu_integer, cpu_kernels, cpu_schedules, gpu
from .cpu_features import cpu_features
from .errors import TargetError


@dataclasses.dataclass(frozen=True)
class TargetRecipe:
    """How to build for one kind of device."""

    name: str
    description: str
    make_target: Callable[[str | None], tvm.target.Target]
    # Its dlight schedule rules: (activations: int8, int16 or float32) -> rules, most specific first.
    schedule_rules: Callable[[str], list]
    # TVM's backend pipeline module for this device: its library dispatch, dataflow lowering and
    # finalisation passes (tvm.relax.backend.<backend>.pipeline).
    backend: ModuleType
    compute_dtype: str
    default_quantization: str
    # ``lib.so`` loads where it was built for; ``lib.tar`` holds objects that the machine that
    # runs them links at load (a Mac for Metal, TVM's web runtime for WebGPU).
    library_file: str
    # The architecture when the name has none (None: the target takes none, or has no default).
    default_arch: Callable[[], str | None] = lambda: None
    # Writes the library to a path: (executable, path, arch). Plain ``export_library`` by default.
    exporter: Callable[[object, Path, str | None], None] = lambda executable, path, _arch: (
        executable.export_library(str(path)))
    # The architecture this recipe builds for, set by :func:`resolve`.
    arch: str | None = None
    # The runtime device kind its libraries run on (TVM's name; default: the target's name).
    device: str = ""
    # Where its libraries run when that is not relaxlm's Python runtime (recorded in the manifest).
    runs_in: str | None = None
    # Whether its projections can round activations to integers for integer dot products on
    # this target (``--activations int16`` or ``int8``; ``targets.cpu_integer``).
    integer_activations: Callable[[tvm.target.Target], bool] = lambda _target: False
    # Relax ops legalized otherwise than TVM does by default (LegalizeOps' customize_legalize_map).
    legalizations: Callable[[], dict] = dict
    # Kernels of TVM's paged KV cache it replaces at export: (KV-cache spec) -> {name: PrimFunc}.
    kv_cache_kernels: Callable[[object], dict] = lambda _spec: {}
    # Whether its paged KV cache masks the cached keys of sliding-window layers exactly when a
    # call appends many tokens (relaxlm's CPU kernel does; TVM's GPU kernels are unverified).
    exact_sliding_window_prefill: bool = False

    def __post_init__(self):
        if not self.device:
            object.__setattr__(self, "device", self.name)

    def export_library(self, executable, directory) -> str:
        """Write the compiled library into ``directory``; returns its file name."""
        self.exporter(executable, Path(directory) / self.library_file, self.arch)
        return self.library_file

    def tvm_target(self, arch: str | None = None) -> tvm.target.Target:
        """The TVM target, for ``arch`` when the name had one (``cuda:sm_86``)."""
        return self.make_target(arch or self.arch)


# What ``llvm:portable`` builds for, by machine: a CPU that nearly every machine of the kind still
# in use has (x86-64-v3: AVX2 and FMA, Intel since 2013 and AMD since 2015).
PORTABLE_CPUS = {"x86_64": "x86-64-v3", "AMD64": "x86-64-v3", "aarch64": "generic", "arm64": "apple-m1"}


def _llvm(arch: str | None) -> tvm.target.Target:
    """This machine's CPU, or the CPU ``arch`` names (an LLVM CPU name, or ``portable``)."""
    from tvm.target import codegen

    if arch is None:
        cpu = codegen.llvm_get_system_cpu()
    elif arch == "portable":
        cpu = PORTABLE_CPUS.get(platform.machine(), "generic")
    else:
        cpu = arch
    if not codegen.llvm_is_valid_cpu(cpu, codegen.llvm_get_system_triple()):
        raise TargetError(f"target 'llvm:{arch}': LLVM knows no CPU '{cpu}' (try llvm for this CPU, "
                          "llvm:portable, or an LLVM CPU name such as llvm:x86-64-v3)")
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})


# What GPU targets share: 4-bit weights computed in fp16 (checked on an H100: tests/gpu).
_gpu_recipe = functools.partial(
    TargetRecipe, schedule_rules=lambda _activations: gpu.gpu_rules(), backend=gpu_backend, compute_dtype="float16",
    default_quantization="q4f16_1",
)

# The target that builds for this machine's CPU (what runs here whatever the machine has).
HOST = "llvm"

TARGETS: dict[str, TargetRecipe] = {
    "llvm": TargetRecipe(
        name="llvm",
        description="this machine's CPU (llvm:portable or llvm:<LLVM CPU name> for an artifact to copy)",
        make_target=_llvm,
        # relaxlm's own rules: the projections, the KV cache's attention and qkv split, and the
        # injective kernels (targets.cpu_schedules). dlight's CPU rules (cpu.GEMV, cpu.Reduction)
        # are not used: they make the build many times slower, too slow for a real model.
        schedule_rules=cpu_schedules.cpu_rules,
        integer_activations=cpu_integer.has_integer_dots,
        backend=cpu_backend,
        device="cpu",
        compute_dtype="float32",
        default_quantization="q4f32_1",
        library_file="lib.so",
        kv_cache_kernels=cpu_attention.kv_cache_kernels,
        exact_sliding_window_prefill=True,
        # tanh (Gemma 3's GELU) as vector code: TVM's is a libm call per element.
        legalizations=cpu_kernels.vector_math_legalizations,
    ),
    "cuda": _gpu_recipe(
        name="cuda",
        description="an NVIDIA GPU (cuda:sm_75 ... cuda:sm_90; default: this machine's GPU)",
        make_target=gpu.cuda_target,
        backend=cuda_backend,
        library_file="lib.so",
        default_arch=gpu.cuda_default_arch,
        exporter=gpu.export_cuda,
    ),
    "metal": _gpu_recipe(
        name="metal",
        description="an Apple-silicon GPU (metal:m1, metal:m2; default m1, which runs on all)",
        make_target=gpu.metal_target,
        library_file="lib.tar",
        default_arch=lambda: "m1",
    ),
    "vulkan": _gpu_recipe(
        name="vulkan",
        description="a Vulkan GPU (needs a TVM built with Vulkan)",
        make_target=gpu.vulkan_target,
        library_file="lib.so",
    ),
    "webgpu": _gpu_recipe(
        name="webgpu",
        description="WebGPU in a browser, through TVM's web runtime",
        make_target=gpu.webgpu_target,
        # WGSL's f16 is an optional device feature (shader-f16); fp32 runs everywhere.
        compute_dtype="float32",
        default_quantization="q0f32",
        library_file="lib.tar",
        runs_in="a browser, through TVM's web runtime",
    ),
}


@dataclasses.dataclass(frozen=True)
class ResolvedTarget:
    """A recipe with its architecture chosen: everything the compiler needs."""

    name: str
    recipe: TargetRecipe
    target: tvm.target.Target

    def cpu_requirements(self) -> tuple[str | None, tuple[str, ...]]:
        """The CPU an llvm library's code is generated for and the features it may use (none
        recorded for GPU targets, whose host code is built for a generic CPU)."""
        if self.target.kind.name != "llvm":
            return None, ()
        return str(self.target.attrs["mcpu"]), cpu_features(self.target)

    def max_append(self, prefill_chunk: int, sliding_window: int | None) -> int:
        """The most tokens one call may append to one sequence and stay exact.

        With sliding-window layers, TVM 0.27's paged KV cache attends the appended chunk's own
        keys with one plain causal kernel for all layers, so a chunk longer than the window would
        let its last queries see keys that have slid out; up to the window, the chunk's keys lie
        inside every query's window. The cached keys need a kernel that masks them exactly, which
        only some recipes have; the others append one token per call."""
        if not sliding_window:
            return prefill_chunk
        return min(prefill_chunk, sliding_window) if self.recipe.exact_sliding_window_prefill else 1


def best_local() -> str:
    """The target ``auto`` means here: the first local GPU that can also be built for here (CUDA
    with nvcc, Metal, Vulkan with a TVM that has its codegen), else the CPU (``llvm``)."""
    if gpu.local_cuda_arch() is not None and shutil.which("nvcc") is not None:
        return "cuda"
    if tvm.metal(0).exist:
        return "metal"
    if tvm.vulkan(0).exist and tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None:
        return "vulkan"
    return HOST


def resolve(name: str) -> ResolvedTarget:
    """``kind``, ``kind:arch`` or ``auto`` → the recipe (with its architecture) and TVM target;
    unknown names, and targets that cannot be built here, are a :class:`TargetError`."""
    if name == "auto":
        name = best_local()
    kind, _, arch = name.partition(":")
    if kind not in TARGETS:
        raise TargetError(f"unknown target '{name}' (known: {', '.join(['auto', *TARGETS])})")
    recipe = TARGETS[kind]
    arch = arch or recipe.default_arch()
    recipe = dataclasses.replace(recipe, arch=arch)
    return ResolvedTarget(name=f"{kind}:{arch}" if arch else kind, recipe=recipe, target=recipe.tvm_target())


__all__ = ["HOST", "TARGETS", "ResolvedTarget", "TargetError", "TargetRecipe", "best_local", "resolve"]
