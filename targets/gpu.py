"""GPU targets: CUDA, Metal, Vulkan and WebGPU, their schedules and how their libraries are exported.

Three things about TVM 0.27 (the PyPI wheel) shape this file:

- dlight's GPU tensorize rules kill the process (a segfault in ``s_tir::Tensorize``, or a hang):
  ``MatmulTensorization`` for fp16 CUDA matmuls and ``MetalMatmul`` for Metal at any dtype.
  :class:`Matmul` keeps dlight's tiled matmul schedule without them (no tensor cores or simdgroup
  matrices yet: prefill is slower than it could be, decode is unaffected — it runs on GEMV).
- Without the NVIDIA driver (``libcuda.so.1``) TVM cannot load its CUDA runtime, and the CUDA module
  it builds carries CUDA *source* only. :func:`export_cuda` compiles that source with ``nvcc`` into
  a fatbin for the requested architecture (SASS plus PTX) and embeds the fatbin instead, so the
  ``.so`` loads on any machine with the driver, without a CUDA compiler there
  (``tests/gpu/device_check.py`` builds artifacts without a GPU and runs them on one with a
  runtime-only TVM).
- The wheel has no Vulkan code generator: the ``vulkan`` target checks for it at run time.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from pathlib import Path

import tvm
from tvm.support import cc
from tvm.s_tir.dlight import gpu

from .errors import TargetError

# Architectures `cuda:<arch>` accepts: Turing (RTX 20xx, T4) to Hopper (H100).
CUDA_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
# Apple GPU generations with a TVM tag; code built for m1 runs on every Apple-silicon Mac.
METAL_ARCHS = ("m1", "m2")


class Matmul(gpu.Matmul):
    """dlight's ``gpu.Matmul`` without its tensorizing sub-rules, which crash (see the module doc).

    ``gpu.Matmul`` picks them by target: ``MatmulTensorization`` for ``cuda`` from ``sm_70`` on,
    ``MetalMatmul`` for every ``metal`` target. So the function is scheduled for a stand-in of the
    same tile configuration that dlight does not tensorize for: ``cuda`` ``sm_60`` for CUDA (same
    configuration as every CUDA arch), a generic GPU (``webgpu``; dlight's default configuration,
    which is also Metal's) for Metal. Past that choice the rule reads nothing from the target.
    The ``dlight.do_not_tensorize`` attribute would also stop the CUDA crash, but only after
    ``MatmulTensorization`` imports ``tvm.s_tir.tensor_intrin``, which is slow, in every process.
    """

    def apply(self, func, target, tunable):
        """Schedule ``func`` as ``gpu.Matmul`` does, minus tensorization."""
        return super().apply(func, _untensorized_stand_in(target.kind.name) or target, tunable)


@functools.lru_cache(maxsize=None)
def _untensorized_stand_in(kind: str) -> tvm.target.Target | None:
    if kind == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": "sm_60", "max_shared_memory_per_block": 49152})
    if kind == "metal":
        return tvm.target.Target({"kind": "webgpu"})
    return None


def gpu_rules() -> list:
    """TVM's default GPU schedule (as in ``relax.backend.cuda.pipeline``) with our :class:`Matmul`."""
    return [Matmul(), gpu.GEMV(), gpu.Reduction(), gpu.GeneralReduction(), gpu.Fallback()]


# --- CUDA -------------------------------------------------------------------------------------------


def local_cuda_arch() -> str | None:
    """``sm_XY`` of this machine's first CUDA GPU, or None without one (or without the driver)."""
    device = tvm.cuda(0)
    if not device.exist:
        return None
    return "sm_" + device.compute_version.replace(".", "")


def cuda_default_arch() -> str:
    """The local GPU's architecture; an error naming the choices where there is no GPU."""
    arch = local_cuda_arch()
    if arch is None:
        raise TargetError(
            "no CUDA GPU here to take the architecture from: name it, e.g. cuda:sm_86 (RTX 30xx, A10) "
            f"or cuda:sm_89 (RTX 40xx, L4); known: {', '.join(CUDA_ARCHS)}"
        )
    return arch


def cuda_target(arch: str) -> tvm.target.Target:
    """CUDA for ``arch`` with an x86-64 host; needs ``nvcc`` (checked now, used at export)."""
    if arch not in CUDA_ARCHS:
        raise TargetError(f"unknown CUDA architecture '{arch}' (known: {', '.join(CUDA_ARCHS)})")
    if shutil.which("nvcc") is None:
        raise TargetError(
            "target 'cuda' needs the CUDA compiler nvcc to build device code and none is on PATH: "
            "install the CUDA toolkit (12 or newer) and add its bin/ to PATH"
        )
    # Where a driver is present TVM would compile the kernels itself (NVRTC, for the *local* GPU's
    # architecture). Keep the source in the module instead so export_cuda compiles it, for `arch`,
    # the same way with or without a GPU. Only in-process execution of a fresh build depends on
    # TVM's own path, and relaxlm always exports and loads.
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    return tvm.target.Target(
        {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024, "thread_warp_size": 32,
         # The static shared-memory limit of every architecture in CUDA_ARCHS.
         "max_shared_memory_per_block": 49152},
        host={"kind": "llvm"},
    )


def export_cuda(executable, path: Path, arch: str) -> None:
    """Export a ``.so`` whose CUDA modules hold a fatbin for ``arch`` (compiled with nvcc here)."""
    pack = functools.partial(_pack_imports_with_fatbin, arch=arch)
    executable.export_library(str(path), fpack_imports=pack)


def _pack_imports_with_fatbin(module, is_system_lib: bool, prefix: str, workspace_dir: str, *, arch: str) -> str:
    """``export_library``'s ``fpack_imports`` hook: TVM's serialised import tree with every CUDA
    source module recompiled to a fatbin, written as the object that carries it into the ``.so``."""
    blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy().tobytes()
    sources = _cuda_sources(module)
    blob = _rewrite_cuda_modules(blob, lambda source: _nvcc_fatbin(source, arch), sources)
    triple = cc.create_shared.get_target_triple()
    llvm_target = json.dumps({"kind": "llvm", "mtriple": triple.strip()})
    obj = tvm.get_global_func("codegen.codegen_blob")(blob, is_system_lib, llvm_target, prefix)
    path = os.path.join(workspace_dir, f"{prefix}devc.o")
    obj.write_to_file(path)
    return path


def _cuda_sources(module) -> set[bytes]:
    """The CUDA source of every CUDA module in ``module``'s import tree that holds source."""
    found = set()
    for child in module.imports:
        if child.kind == "cuda":
            found.add(child.inspect_source("cuda").encode())
        found |= _cuda_sources(child)
    return found


def _nvcc_fatbin(source: bytes, arch: str) -> bytes:
    """nvcc: SASS for ``arch`` and its PTX (for newer GPUs to JIT) in one fatbin."""
    from tvm.support import nvcc

    number = arch.removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(source.decode(), target_format="fatbin", arch=gencode, compiler="nvcc"))


# The import blob (tvm-ffi ``PackImportsToBytes``), all integers u64 little-endian:
#   nbytes | import-tree row_ptr (count, items) | child indices (count, items) |
#   per module: kind (length, bytes), then unless kind == "_lib": payload (length, bytes).
# A CUDA payload (CUDAModuleNode::SaveToBytes) is fmt | function table | code, fmt and code as
# (length, bytes); TVM's loader feeds a "fatbin" code to cuModuleLoadData as it is.


def _rewrite_cuda_modules(blob: bytes, compile_source, sources: set[bytes]) -> bytes:
    """``blob`` with each CUDA payload whose fmt is ``cuda`` (source) replaced by a ``fatbin`` one."""
    reader = _Reader(blob)
    reader.u64()
    row_ptr = reader.u64_list()
    children = reader.u64_list()
    modules = []
    for _ in range(len(row_ptr) - 1):
        kind = reader.string()
        payload = None if kind == b"_lib" else reader.string()
        if kind == b"cuda":
            payload = _recompiled(payload, compile_source, sources)
        modules.append((kind, payload))
    if reader.offset != len(blob):
        raise TargetError("this TVM packs its modules in a layout relaxlm does not know; cannot embed CUDA code")
    body = _u64_list(row_ptr) + _u64_list(children)
    for kind, payload in modules:
        body += _string(kind) + (b"" if payload is None else _string(payload))
    return struct.pack("<Q", len(body)) + body


def _recompiled(payload: bytes, compile_source, sources: set[bytes]) -> bytes:
    reader = _Reader(payload)
    if reader.string() != b"cuda":
        return payload  # already compiled (ptx / cubin / fatbin)
    source = next((s for s in sources if payload.endswith(_string(s))), None)
    if source is None:
        raise TargetError("cannot find the CUDA source in TVM's CUDA module; cannot embed CUDA code")
    function_table = payload[reader.offset:len(payload) - len(_string(source))]
    return _string(b"fatbin") + function_table + _string(compile_source(source))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.offset)
        self.offset += 8
        return value

    def u64_list(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def string(self) -> bytes:
        size = self.u64()
        self.offset += size
        return self.data[self.offset - size:self.offset]


def _string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _u64_list(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values) + 1}Q", len(values), *values)


# --- Metal, Vulkan, WebGPU --------------------------------------------------------------------------


def metal_target(arch: str) -> tvm.target.Target:
    """Apple GPU ``arch`` (TVM's ``apple/<arch>-gpu`` tag), host code for arm64 macOS."""
    if arch not in METAL_ARCHS:
        raise TargetError(f"unknown Metal architecture '{arch}' (known: {', '.join(METAL_ARCHS)})")
    return tvm.target.Target(f"apple/{arch}-gpu")


def vulkan_target(arch: str | None) -> tvm.target.Target:
    """Vulkan with 16-bit storage and arithmetic; only where this TVM has the Vulkan codegen."""
    if arch is not None:
        raise TargetError(f"target 'vulkan' takes no architecture (got 'vulkan:{arch}')")
    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is None:
        raise TargetError(
            "target 'vulkan' needs a TVM built with Vulkan (USE_VULKAN=ON, with the Vulkan SDK); "
            "the apache-tvm wheel has no Vulkan code generator"
        )
    return tvm.target.Target(
        {"kind": "vulkan", "supports_float16": True, "supports_int16": True, "supports_int8": True,
         "supports_8bit_buffer": True, "supports_16bit_buffer": True,
         "supports_storage_buffer_storage_class": True},
        host={"kind": "llvm"},
    )


def webgpu_target(arch: str | None) -> tvm.target.Target:
    """WGSL kernels with a wasm32 host, for TVM's web runtime."""
    if arch is not None:
        raise TargetError(f"target 'webgpu' takes no architecture (got 'webgpu:{arch}')")
    return tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"})
