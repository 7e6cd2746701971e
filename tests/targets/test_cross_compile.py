"""GPU targets built on a machine without a GPU: tiny Llama, Gemma 3 and OLMo models compiled for
CUDA, Metal and WebGPU, and each artifact checked for the device code the other machine needs
(a fatbin with SASS for the requested architecture; an arm64 Mach-O object and Metal shaders;
wasm objects and WGSL). The reference is the file formats: the fatbin header, Mach-O and wasm
magic numbers, and TVM's own library loader.

Builds are few (a tiny fp16 CUDA build takes tens of seconds on 2 cores): each family is built
for CUDA and one other target, each target for at least two families.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tarfile
import textwrap

import pytest
import tvm
from tvm import te, tirx
from tvm.s_tir import dlight

from gemma3_specs import GEMMA3_SPECS
from llama_specs import LLAMA_SPECS
from olmo_specs import OLMO_SPECS
from relaxlm.compiler import compile_model
from relaxlm.targets import TARGETS, TargetError, gpu, resolve

SPECS = {
    "llama": LLAMA_SPECS["gqa_tied_fp16"],
    "gemma3": GEMMA3_SPECS["sliding_global_softcap"],
    "olmo3": OLMO_SPECS["olmo3_sliding_yarn"],
}
BUILDS = [
    ("llama", "cuda:sm_86"), ("llama", "cuda:sm_89"), ("llama", "metal"), ("llama", "webgpu"),
    ("gemma3", "cuda:sm_89"), ("gemma3", "metal"),
    ("olmo3", "cuda:sm_86"), ("olmo3", "webgpu"),
]
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
FATBIN_ELF, FATBIN_PTX = 2, 1
MACHO_ARM64 = struct.pack("<II", 0xFEEDFACF, 0x0100000C)
WASM_MAGIC = b"\0asm\x01\0\0\0"


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory):
    """Each (family, target) of BUILDS compiled once, at the target's default quantization."""
    root = tmp_path_factory.mktemp("cross")
    built = {}

    def get(family: str, target: str):
        if (family, target) not in built:
            hf_dir = tiny_models(SPECS[family]).hf_dir
            built[family, target] = compile_model(hf_dir, target=target, output=root / f"{family}-{target.replace(':', '-')}")
        return built[family, target]

    return get


def fatbin_entries(data: bytes, start: int) -> list[tuple[int, int]]:
    """(kind, sm) of each entry of the fatbin at ``start``: kind 2 is an ELF cubin, 1 is PTX."""
    _version, header_size, size = struct.unpack_from("<HHQ", data, start + 4)
    entries, offset, end = [], start + header_size, start + header_size + size
    while offset < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
        (sm,) = struct.unpack_from("<I", data, offset + 28)
        entries.append((kind, sm))
        offset += entry_header + payload
    return entries


def manifest(artifact) -> dict:
    return json.loads((artifact / "relaxlm-config.json").read_text())


def tar_members(artifact) -> dict[str, bytes]:
    with tarfile.open(artifact / "lib.tar") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.parametrize("family,target", [b for b in BUILDS if b[1].startswith("cuda")])
def test_cuda_library_carries_a_fatbin_for_the_requested_arch(artifacts, family, target):
    artifact = artifacts(family, target)
    config = manifest(artifact)
    assert (config["target"], config["device"], config["quantization"], config["library"]) == (
        target, "cuda", "q4f16_1", "lib.so")
    data = (artifact / "lib.so").read_bytes()
    assert data.count(FATBIN_MAGIC) == 1
    sm = int(target.removeprefix("cuda:sm_"))
    # SASS for the GPU asked for, and its PTX for newer GPUs to JIT.
    assert sorted(fatbin_entries(data, data.find(FATBIN_MAGIC))) == [(FATBIN_PTX, sm), (FATBIN_ELF, sm)]
    assert b"__global__" not in data, "CUDA source left in the library"


# TVM's library loader reads the .so's module blob and hands the CUDA module's bytes to
# ffi.Module.load_from_bytes.cuda, which this wheel lacks (no libcuda here): a stand-in records
# what a GPU machine's loader would get. In a subprocess so the stand-in never shadows a real one.
LOADER_CHECK = textwrap.dedent("""
    import json, struct, sys
    import tvm, tvm_ffi
    seen = []
    def load_cuda(data):
        data = bytes(data)
        (n,) = struct.unpack_from("<Q", data, 0)
        fatbin = data.find(struct.pack("<I", 0xBA55ED50))
        (size,) = struct.unpack_from("<Q", data, fatbin + 8)
        seen.append({"fmt": data[8:8 + n].decode(), "fatbin_is_last": fatbin + 16 + size == len(data)})
        return tvm.get_global_func("runtime.SourceModuleCreate")("", "cuda")
    tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda", load_cuda)
    tvm.runtime.load_module(sys.argv[1])
    print(json.dumps(seen))
""")


def test_tvm_loader_reads_the_embedded_fatbin(artifacts):
    library = artifacts("llama", "cuda:sm_86") / "lib.so"
    result = subprocess.run([sys.executable, "-c", LOADER_CHECK, str(library)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [{"fmt": "fatbin", "fatbin_is_last": True}]


@pytest.mark.parametrize("family", [b[0] for b in BUILDS if b[1] == "metal"])
def test_metal_tar_holds_arm64_objects_and_metal_shaders(artifacts, family):
    artifact = artifacts(family, "metal")
    config = manifest(artifact)
    assert (config["target"], config["device"], config["quantization"], config["library"]) == (
        "metal:m1", "metal", "q4f16_1", "lib.tar")
    members = tar_members(artifact)
    assert members and all(data.startswith(MACHO_ARM64) for data in members.values()), list(members)
    shaders = b"".join(members.values())
    assert b"#include <metal_stdlib>" in shaders and b"kernel void" in shaders


@pytest.mark.parametrize("family", [b[0] for b in BUILDS if b[1] == "webgpu"])
def test_webgpu_tar_holds_wasm_objects_and_wgsl(artifacts, family):
    artifact = artifacts(family, "webgpu")
    config = manifest(artifact)
    assert (config["target"], config["device"], config["quantization"], config["library"]) == (
        "webgpu", "webgpu", "q0f32", "lib.tar")
    members = tar_members(artifact)
    assert members and all(data.startswith(WASM_MAGIC) for data in members.values()), list(members)
    assert b"@compute @workgroup_size" in b"".join(members.values())


@pytest.mark.parametrize("target", ["cuda:sm_86", "metal", "webgpu"])
def test_gguf_blocks_build_for_every_gpu_kind(tiny_gguf_file, tmp_path, target):
    """A GGUF at its own blocks (every supported type) through dlight's generic dequantize path:
    the same device code as the other builds, at quantization gguf."""
    artifact = compile_model(tiny_gguf_file, target=target, output=tmp_path / "gguf")
    assert manifest(artifact)["quantization"] == "gguf"
    if target.startswith("cuda"):
        data = (artifact / "lib.so").read_bytes()
        assert sorted(fatbin_entries(data, data.find(FATBIN_MAGIC))) == [(FATBIN_PTX, 86), (FATBIN_ELF, 86)]
    else:
        members = tar_members(artifact)
        magic = MACHO_ARM64 if target == "metal" else WASM_MAGIC
        assert members and all(data.startswith(magic) for data in members.values()), list(members)


def test_vulkan_fails_at_once_with_one_line_naming_what_to_install(tiny_models, tmp_path):
    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None:
        pytest.skip("this TVM has the Vulkan code generator")  # the wheel has none; a TVM built with Vulkan builds
    hf_dir = tiny_models(SPECS["llama"]).hf_dir
    result = subprocess.run([sys.executable, "-m", "relaxlm.compiler.cli", "compile", str(hf_dir), "--target", "vulkan",
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "relaxlm: error: " in result.stderr and "TVM built with Vulkan" in result.stderr
    assert not list(tmp_path.iterdir())


def test_cuda_without_nvcc_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TargetError, match="needs the CUDA compiler nvcc") as error:
        resolve("cuda:sm_86")
    assert "\n" not in str(error.value)


def test_auto_is_the_cpu_without_a_gpu():
    if tvm.cuda(0).exist or tvm.metal(0).exist or tvm.vulkan(0).exist:
        pytest.skip("this machine has a GPU")
    assert resolve("auto").name == "llvm"


@pytest.mark.parametrize("name,message", [
    ("cuda:sm_61", "unknown CUDA architecture 'sm_61'"),
    ("metal:m9", "unknown Metal architecture 'm9'"),
    ("webgpu:x", "takes no architecture"),
    ("opencl", "unknown target 'opencl'"),
])
def test_bad_names_are_target_errors(name, message):
    with pytest.raises(TargetError, match=message):
        resolve(name)


def test_cuda_needs_an_arch_where_there_is_no_gpu():
    if tvm.cuda(0).exist:
        assert resolve("cuda").name == f"cuda:{gpu.local_cuda_arch()}"
    else:
        with pytest.raises(TargetError, match="e.g. cuda:sm_86"):
            resolve("cuda")


def test_every_gpu_target_names_its_device_dtype_and_quantization():
    gpus = {name: recipe for name, recipe in TARGETS.items() if name != "llvm"}
    assert {name: (r.device, r.compute_dtype, r.default_quantization) for name, r in gpus.items()} == {
        "cuda": ("cuda", "float16", "q4f16_1"),
        "metal": ("metal", "float16", "q4f16_1"),
        "vulkan": ("vulkan", "float16", "q4f16_1"),
        "webgpu": ("webgpu", "float32", "q0f32"),
    }


# --- The dlight workaround: gpu.Matmul's tensorize sub-rules segfault (TVM 0.27). ---------------

def fp16_prefill_matmul() -> tvm.IRModule:
    """An fp16 ``[1, n, 128] x [256, 128]^T`` (dynamic rows, like prefill) that dlight would tensorize."""
    n = tirx.Var("n", "int32")
    x = te.placeholder((1, n, 128), "float16", name="x")
    w = te.placeholder((256, 128), "float16", name="w")
    k = te.reduce_axis((0, 128), name="k")
    y = te.compute((1, n, 256), lambda b, i, j: te.sum(x[b, i, k] * w[j, k], axis=k), name="NT_matmul")
    return tvm.IRModule({"main": te.create_prim_func([x, w, y])})


@pytest.mark.parametrize("target", ["cuda:sm_86", "metal"])
def test_our_matmul_rule_schedules_fp16_matmuls_without_tensor_intrinsics(target):
    with resolve(target).target:
        scheduled = dlight.ApplyDefaultSchedule(gpu.Matmul())(fp16_prefill_matmul())
    script = scheduled.script()
    assert "blockIdx.x" in script and "threadIdx" in script
    assert not any(word in script for word in ("mma", "wmma", "simdgroup")), "tensorized"


def test_the_python_runtime_refuses_a_webgpu_artifact_in_one_line(artifacts):
    from relaxlm.runtime import ArtifactError, load

    with pytest.raises(ArtifactError, match="web runtime"):
        load(artifacts("llama", "webgpu"))
