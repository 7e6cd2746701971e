"""What this machine's CPU can run: checked before an llvm library is loaded.

An llvm library uses the instruction-set features of the CPU it was compiled for; on a CPU
without one of them it dies of an illegal instruction at the first call. The manifest lists
those features in the names of Linux's ``/proc/cpuinfo``; elsewhere the check cannot be made.
"""

from __future__ import annotations

from pathlib import Path

from .artifact import ArtifactError, Manifest

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The feature flags of this machine's first CPU (``flags`` on x86, ``Features`` on Arm);
    None where the system does not list them."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def check_cpu_features(path: Path, manifest: Manifest, flags: set[str] | None = None) -> None:
    """Refuse an llvm artifact whose code needs a feature this CPU lacks."""
    flags = cpu_flags() if flags is None else flags
    if flags is None or not manifest.cpu_features:
        return
    missing = sorted(set(manifest.cpu_features) - flags)
    if missing:
        raise ArtifactError(
            f"{path} was compiled for another CPU ({manifest.cpu}, with {', '.join(missing[:4])}"
            f"{' …' if len(missing) > 4 else ''}), which this one lacks; recompile it here "
            "(relaxlm compile … --target llvm) or for any such CPU (--target llvm:portable)"
        )
