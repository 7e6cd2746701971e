"""Named targets: what a user types after ``--target`` and what TVM needs to build for it.

:data:`TARGETS` is the registry. A target knows its TVM ``Target``, its dlight schedule rules,
the dtype it computes fastest in, the default quantization, its library format and the runtime
device it runs on.
"""

from __future__ import annotations

import dataclasses
import os
from types import ModuleType
from typing import Callable

import tvm
from tvm.relax.backend.cpu_generic import pipeline as cpu_backend

from . import cpu_schedules


class TargetError(Exception):
    """A target name that cannot be built here; the message says what to do instead."""


@dataclasses.dataclass(frozen=True)
class TargetRecipe:
    """How to build for one kind of device."""

    name: str
    description: str
    make_target: Callable[[str | None], tvm.target.Target]
    schedule_rules: Callable[[], list]
    # TVM's backend pipeline module for this device: its library dispatch, dataflow lowering and
    # finalisation passes (tvm.relax.backend.<backend>.pipeline).
    backend: ModuleType
    device: str
    compute_dtype: str
    default_quantization: str
    library_file: str

    def export_library(self, executable, directory) -> str:
        """Write the compiled library into ``directory``; returns its file name."""
        executable.export_library(str(directory / self.library_file))
        return self.library_file

    def tvm_target(self, arch: str | None = None) -> tvm.target.Target:
        """The TVM target, for ``arch`` when the name had one (``cuda:sm_86``)."""
        return self.make_target(arch)


def _host_llvm(arch: str | None) -> tvm.target.Target:
    if arch is not None:
        raise TargetError(f"target 'llvm' takes no architecture (got 'llvm:{arch}'); it builds for this CPU")
    from tvm.target import codegen

    return tvm.target.Target(
        {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    )


TARGETS: dict[str, TargetRecipe] = {
    "llvm": TargetRecipe(
        name="llvm",
        description="this machine's CPU",
        make_target=_host_llvm,
        # Our own NT-matmul rule (the projections that dominate decode); everything else stays
        # unscheduled. dlight's CPU rules (cpu.GEMV, cpu.Reduction) are not used: they made a tiny
        # model build 8x slower and did not finish SmolLM2-135M in 5 minutes.
        schedule_rules=cpu_schedules.cpu_rules,
        backend=cpu_backend,
        device="cpu",
        compute_dtype="float32",
        default_quantization="q4f32_1",
        library_file="lib.so",
    ),
}


@dataclasses.dataclass(frozen=True)
class ResolvedTarget:
    """A recipe with its architecture chosen: everything the compiler needs."""

    name: str
    recipe: TargetRecipe
    target: tvm.target.Target


def resolve(name: str) -> ResolvedTarget:
    """``llvm``, ``auto`` or ``kind:arch`` → the recipe and TVM target; unknown names are an error."""
    if name == "auto":
        name = "llvm"
    kind, _, arch = name.partition(":")
    if kind not in TARGETS:
        raise TargetError(f"unknown target '{name}' (known: {', '.join(['auto', *TARGETS])})")
    recipe = TARGETS[kind]
    return ResolvedTarget(name=name, recipe=recipe, target=recipe.tvm_target(arch or None))


__all__ = ["TARGETS", "ResolvedTarget", "TargetError", "TargetRecipe", "resolve"]
