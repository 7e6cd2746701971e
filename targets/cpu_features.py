"""The instruction-set features an llvm library may use, in the names Linux gives them.

LLVM generates code for one CPU (``mcpu``): for this machine's by default, so an artifact copied
to an older CPU would die of an illegal instruction. The compiler records the features of the
CPU it built for, and the runtime refuses to load on a CPU that lacks one of them.
"""

from __future__ import annotations

import tvm
from tvm.target import codegen

# LLVM feature → the flag /proc/cpuinfo lists for it. Only features that change the generated
# code's instructions; names are the same on both sides except where written out.
_X86 = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "movbe": "movbe", "aes": "aes", "pclmul": "pclmulqdq", "sha": "sha_ni",
    "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "avxvnni": "avx_vnni",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16", "amx-fp16": "amx_fp16",
}
_AARCH64 = {
    "neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "fullfp16": "fphp", "bf16": "bf16",
    "sve": "sve", "sve2": "sve2",
}


def cpu_features(target: tvm.target.Target) -> tuple[str, ...]:
    """The cpuinfo flags of every code-changing feature the llvm ``target`` enables, sorted."""
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    table = _AARCH64 if triple.startswith(("aarch64", "arm64")) else _X86
    return tuple(sorted(flag for feature, flag in table.items() if codegen.target_has_features(feature, target)))
