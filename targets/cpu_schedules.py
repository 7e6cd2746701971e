"""CPU schedule rules for the ``llvm`` target: which kernels get which schedule, or which
hand-written kernel of :mod:`.cpu_kernels` or :mod:`.cpu_attention` in their place.

TVM's llvm build applies no schedule of its own, and dlight's ``cpu.GEMV`` vectorises across
output rows (strided gathers) while compiling slowly. The rules, most specific first:

- :class:`GroupMatmul`: projections with 4-bit weights (``dequantize`` fused in front of the
  matmul by ``passes.fusion``) become ``group_gemv_cpu`` (decode) or ``group_gemm_cpu``
  (prefill), which unpack the codes in registers and apply each group's scale once per block.
- :class:`BlockMatmul`: projections with weights in llama.cpp's block layouts (the ``gguf``
  scheme) become ``block_gemv_cpu`` or ``block_gemm_cpu``, generated from the layout; with integer
  activations they become ``cpu_integer.block_gemv_integer_cpu`` / ``block_gemm_integer_cpu``.
- :class:`NTMatmul`: the other projections — ``C[..., j] (+)= sum_k A[..., k] * W[j, k]`` after
  ``FuseTransposeMatmul``, weights ``[out, in]`` — as row-wise dot products: the reduction is
  split, the inner part ``rfactor``-ed into a small accumulator vectorised along ``k``, blocks of
  output rows in parallel. An 8-bit ``dequantize`` is inlined for one row, and dequantized per
  block of weight rows for several (:func:`_schedule_blocked`).
- :class:`DecodeAttention`, :class:`RaggedPrefillAttention` and :class:`SplitQKV`: kernels of
  TVM's paged KV cache, replaced by relaxlm's.
- :class:`Injective`: elementwise and layout kernels, inlined into one loop nest.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.ir import TensorLoad
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .cpu_attention import KEY_TILE, decode_attention_cpu, paged_prefill_attention_cpu, ragged_prefill_attention_cpu
from relaxlm.passes.gguf_blocks import LAYOUTS
from relaxlm.passes.gguf_quantization import LAYOUT_ATTR

from .cpu_integer import (ACTIVATION_BITS, block_gemm_integer_cpu, block_gemv_integer_cpu, integer_gemv_supports,
                          integer_kernel_for)
from .cpu_kernels import (F32_LANES, GEMV_BLOCK, GROUP_MATMUL_PARAMS, PACKED_LANES, block_gemm_cpu, block_gemv_cpu,
                          gemm_block_rows, group_gemm_cpu, group_gemv_cpu, largest_divisor, split_qkv_cpu)

# Output rows per parallel task of the row-wise dot products (decode).
_ROWS_PER_TASK = 16
# Output rows per prefill task: the transposed dequantized block (_BLOCK_ROWS x K floats) stays in
# L2, and its outputs for one activation row fill 8 AVX2 registers.
_BLOCK_ROWS = 64
# Elements of K per accumulator: two AVX2 vectors, so two independent FMA chains per row.
_K_LANES = 16
# The block FuseTIR leaves for a fused dequantize (passes.quantization's TE op).
_DEQUANTIZE = "dequantize"


def _is_nt_matmul(block: tirx.SBlock) -> bool:
    """``C[..., j] = C[..., j] + A[..., k] * W[j, k]`` (operands possibly cast), with ``j`` the last
    spatial iterator and ``k`` the only, innermost, reduction iterator."""
    iters = list(block.iter_vars)
    if len(iters) < 2 or any(iv.iter_type != tirx.IterVar.DataPar for iv in iters[:-1]):
        return False
    if iters[-1].iter_type != tirx.IterVar.CommReduce:
        return False
    j, k = iters[-2].var, iters[-1].var
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not store.indices[-1].same_as(j):
        return False
    update = store.value
    if not (isinstance(update, tirx.Add) and isinstance(update.a, TensorLoad)
            and update.a.source.same_as(store.buffer) and isinstance(update.b, tirx.Mul)):
        return False
    operands = []
    for operand in (update.b.a, update.b.b):
        while isinstance(operand, tirx.Cast):
            operand = operand.value
        operands.append(operand)
    activation, weight = operands if _is_weight(operands[1], j, k, iters) else operands[::-1]
    # The weight is [j, k] (loaded, or unpacked from [j, k / n] words); the activation is a load
    # contiguous along k and shared by all output rows.
    return (isinstance(activation, TensorLoad) and _is_weight(weight, j, k, iters)
            and activation.indices[-1].same_as(k)
            and not any(_uses(index, j) for index in activation.indices)
            and not any(_uses(index, k) for index in store.indices))


def _is_weight(expr, j: tirx.Var, k: tirx.Var, iters) -> bool:
    """``W[j, k]``, or an expression of ``j`` and ``k`` only (an inlined dequantize)."""
    if isinstance(expr, TensorLoad):
        return _indexed_by(expr, [j, k])
    others = [iv.var for iv in iters if not (iv.var.same_as(j) or iv.var.same_as(k))]
    return _uses(expr, j) and _uses(expr, k) and not any(_uses(expr, v) for v in others)


def _indexed_by(load: TensorLoad, variables: list[tirx.Var]) -> bool:
    return len(load.indices) == len(variables) and all(i.same_as(v) for i, v in zip(load.indices, variables))


def _uses(expr, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


class NTMatmul(CPUScheduleRule):
    """Parallel, k-vectorised schedule for NT matmul / GEMV kernels with elementwise epilogues.

    Returns ``None`` (kernel left as it is) for anything else: other reductions, matmuls whose
    weight is not ``[j, k]`` with static ``j``/``k`` extents, or prologues that cannot be inlined.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        dequantize = [b.block_rv for b in infos if sch.get(b.block_rv).name_hint == _DEQUANTIZE]
        blocks = try_inline_contiguous_spatial(sch, [b for b in infos if sch.get(b.block_rv).name_hint != _DEQUANTIZE])
        if not blocks or not blocks[0].is_reduction():
            return None
        matmul, epilogues = blocks[0], blocks[1:]
        if not all(e.is_injective() for e in epilogues):
            return None
        *batch, j, k = matmul.iters
        if not isinstance(j.dom, (int, tirx.IntImm)) or not isinstance(k.dom, (int, tirx.IntImm)):
            return None
        # One activation row: unpack in registers. More: dequantize a block of rows per task.
        unpack = bool(dequantize) and all(isinstance(b.dom, (int, tirx.IntImm)) and int(b.dom) == 1 for b in batch)
        try:
            if unpack:
                for block in dequantize:
                    sch.compute_inline(block)
                dequantize = []
            if not _is_nt_matmul(sch.get(matmul.block_rv)):
                return None
            epilogues = [e.block_rv for e in epilogues]
            block_rows = largest_divisor(int(j.dom), (_BLOCK_ROWS, 32, 16, 8))
            if dequantize and block_rows is not None:
                return _schedule_blocked(sch, matmul.block_rv, epilogues, dequantize, block_rows)
            rows = largest_divisor(int(j.dom), (_ROWS_PER_TASK, 8, 4, 2, 1))
            lanes = largest_divisor(int(k.dom), (_K_LANES, 8, 4))
            if lanes is None or dequantize:
                return None
            vector = PACKED_LANES if unpack and lanes % PACKED_LANES == 0 else lanes
            return self._schedule(sch, matmul.block_rv, epilogues, rows, lanes, vector)
        except s_tir.ScheduleError:
            return None

    @staticmethod
    def _schedule(sch: s_tir.Schedule, block, epilogues, rows: int, lanes: int, vector: int) -> s_tir.Schedule:  # pylint: disable=too-many-arguments
        """Row-wise dot products (decode, and unquantized matmuls): lanes of ``k`` accumulate
        separately (``rfactor``) and are summed per output row."""
        *batch, j, k = sch.get_loops(block)
        m = sch.fuse(*batch) if batch else sch.add_unit_loop(block)
        jo, ji = sch.split(j, [None, rows])
        ko, ki = sch.split(k, [None, lanes])
        sch.reorder(jo, m, ji, ko, ki)
        partial = sch.rfactor(ki, factor_axis=0)
        # rfactor leaves the final sum over the lanes in a loop nest of its own; bring it (and the
        # epilogue) under the row loop so the lane accumulator shrinks to a per-row local buffer.
        jo, _, ji, ko, ki = sch.get_loops(partial)
        sch.reverse_compute_at(block, ji)
        for epilogue in epilogues:
            sch.reverse_compute_at(epilogue, ji)
        sch.parallel(jo)
        if vector < lanes:
            # Vectors of one packed word's codes, unrolled to keep lanes / vector FMA chains.
            ku, kv = sch.split(ki, [None, vector])
            sch.unroll(ku)
            sch.vectorize(kv)
        else:
            sch.vectorize(ki)
        # Parallelising needs the reductions intact, so their init statements are split off last.
        sch.vectorize(sch.get_loops(sch.decompose_reduction(partial, ko))[-1])
        return sch


def _schedule_blocked(sch: s_tir.Schedule, block, epilogues, dequantize, rows: int) -> s_tir.Schedule:
    """Several activation rows (prefill) against a dequantized weight: each parallel task
    dequantizes ``rows`` weight rows, transposed to ``[k, j]``, and multiplies every
    activation row with them as a sum of outer products: per ``k`` one broadcast activation value
    and one FMA per vector of the block's outputs, which stay in registers for the whole row."""
    *batch, j, k = sch.get_loops(block)
    m = sch.fuse(*batch)
    jo, ji = sch.split(j, [None, rows])
    sch.reorder(jo, m, k, ji)
    accumulator = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulator, m)
    for epilogue in epilogues:
        sch.reverse_compute_at(epilogue, m)
    for producer in dequantize:
        sch.compute_at(producer, jo)
        sch.transform_layout(producer, ("write", 0), lambda row, col: (col, row))
        sch.vectorize(sch.split(sch.get_loops(producer)[-1], [None, F32_LANES])[-1])
    sch.parallel(jo)
    sch.vectorize(ji)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(block, k))[-1])
    return sch




class Injective(CPUScheduleRule):
    """Kernels of elementwise and layout blocks only (split, concat, reshape, RoPE, activations):
    every block is inlined into the last, so the kernel is one loop nest that writes no
    intermediate buffer; big ones run in parallel chunks of about :data:`_INJECTIVE_CHUNK` elements.
    Where the rows are symbolic (the tokens of a call), a chunk is whole rows: a chunk of elements
    would run its full length, masked, for a decode step's one row (a 576-wide reshape took 24 us)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        remaining = try_inline(sch, infos)
        if len(remaining) != 1:
            return None
        loops = sch.get_loops(remaining[0].block_rv)
        if not loops:
            return None
        symbolic = [i for i, loop in enumerate(loops) if not isinstance(sch.get(loop).extent, tirx.IntImm)]
        if not symbolic:
            fused = _fuse(sch, loops)
            if int(sch.get(fused).extent) > _INJECTIVE_CHUNK:
                sch.parallel(sch.split(fused, [None, _INJECTIVE_CHUNK])[0])
            return sch
        rows, row = _fuse(sch, loops[:symbolic[-1] + 1]), loops[symbolic[-1] + 1:]
        row_size = math.prod(int(sch.get(loop).extent) for loop in row)
        sch.parallel(sch.split(rows, [None, max(1, _INJECTIVE_CHUNK // row_size)])[0])
        if row:
            _fuse(sch, row)
        return sch


def _fuse(sch: s_tir.Schedule, loops):
    """``loops`` fused into one (the one loop itself)."""
    return sch.fuse(*loops) if len(loops) > 1 else loops[0]


# Elements per parallel task of an injective kernel; smaller kernels (decode) stay serial, as
# waking the thread pool costs more than they do.
_INJECTIVE_CHUNK = 1 << 14

class GroupMatmul(CPUScheduleRule):
    """4-bit projections: ``dequantize`` (8 codes per uint32, a scale per group) → NT matmul →
    optionally ``+ residual``, as ``passes.fusion`` leaves them, become hand-written kernels with
    the same parameters: :func:`group_gemv_cpu` for one activation row (decode) and
    :func:`group_gemm_cpu` for several (prefill). Anything else (8-bit codes, other epilogues,
    shapes they do not tile) is left to :class:`NTMatmul`.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        found = _quantized_projection(func, _group_weight)
        if found is None:
            return None
        _, buffers = found
        (n, words), groups = (int(d) for d in buffers["packed"].shape), int(buffers["scale"].shape[1])
        k = words * PACKED_LANES
        shapes = [tuple(buffers[r].shape) for r in ("x", "out")]
        scale_dtype, residual = str(buffers["scale"].dtype), "residual" in buffers
        if _one_row(buffers["x"]):
            if k % GEMV_BLOCK:
                return None
            kernel = group_gemv_cpu(n, k, groups, shapes, scale_dtype, residual)
        else:
            if gemm_block_rows(n) is None:
                return None
            kernel = group_gemm_cpu(n, k, groups, shapes, scale_dtype, residual)
        return _in_place_of(func, kernel, dict(zip(GROUP_MATMUL_PARAMS, kernel.params)), buffers)


def _one_row(x: tirx.Buffer) -> bool:
    """Whether the activations ``x`` are one row (decode) rather than several (prefill)."""
    return all(isinstance(d, (int, tirx.IntImm)) and int(d) == 1 for d in x.shape[:-1])


def _in_place_of(func: tirx.PrimFunc, kernel: tirx.PrimFunc, param_of: dict, buffers: dict) -> s_tir.Schedule:
    """``kernel`` with the parameters of ``func``, the kernel it replaces, in their order (each
    kernel parameter by its role, ``param_of``), and its attributes."""
    params = [param_of[next(role for role, b in buffers.items() if b.same_as(p))] for p in func.params]
    return s_tir.Schedule(tirx.PrimFunc(params, kernel.body, kernel.ret_type, func.attrs))


def _quantized_projection(func: tirx.PrimFunc, weight_roles) -> tuple[tirx.SBlock, dict] | None:
    """``(dequantize block, buffers by role)`` of a projection kernel as ``passes.fusion`` leaves
    it — ``dequantize`` → NT matmul → optionally ``+ residual`` — or None when ``func`` is not one.
    The roles are ``x``, ``out``, ``residual`` and those ``weight_roles(dequantize, weight)``
    gives the stored arrays (None: not a weight this rule knows); float32 activations only."""
    sch = s_tir.Schedule(func)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if [b.name_hint for b in blocks] not in ([_DEQUANTIZE, "NT_matmul"], [_DEQUANTIZE, "NT_matmul", "T_add"]):
        return None
    dequantize, matmul, *epilogue = blocks
    weight = dequantize.writes[0].source
    roles = weight_roles(dequantize, weight)
    x = [r.source for r in matmul.reads if not r.source.same_as(weight) and not r.source.same_as(matmul.writes[0].source)]
    if roles is None or len(x) != 1:
        return None
    buffers = {**roles, "x": x[0], "out": matmul.writes[0].source}
    if epilogue:
        residual = _added_to(epilogue[0], buffers["out"])
        if residual is None:
            return None
        buffers.update(residual=residual, out=epilogue[0].writes[0].source)
    float32 = all(str(buffers[r].dtype) == "float32" for r in buffers if r not in roles)
    if not (float32 and len(func.params) == len(buffers)
            and all(any(b.same_as(p) for p in func.params) for b in buffers.values())):
        return None
    try:
        sch.compute_inline(sch.get_sblock(_DEQUANTIZE))
    except s_tir.ScheduleError:
        return None
    return (dequantize, buffers) if _is_nt_matmul(sch.get(sch.get_sblock("NT_matmul"))) else None


def _group_weight(dequantize: tirx.SBlock, weight: tirx.Buffer) -> dict[str, tirx.Buffer] | None:
    """``packed`` and ``scale`` of a 4-bit group dequantize (8 codes per uint32)."""
    if len(dequantize.reads) != 2:
        return None
    packed, scale = (r.source for r in dequantize.reads)
    if str(packed.dtype) != "uint32":
        return None
    (n, words), (_, groups), k = packed.shape, scale.shape, weight.shape[1]
    if not (int(words) * PACKED_LANES == int(k) and int(k) % int(groups) == 0
            and (int(k) // int(groups)) % PACKED_LANES == 0 and int(n) == int(weight.shape[0])):
        return None
    return {"packed": packed, "scale": scale}


def _added_to(block: tirx.SBlock, result: tirx.Buffer) -> tirx.Buffer | None:
    """The other operand of ``out[i] = result[i] + other[i]`` (either order), else None."""
    store = block.body
    if not (isinstance(store, tirx.BufferStore) and isinstance(store.value, tirx.Add)):
        return None
    loads = [store.value.a, store.value.b]
    if not all(isinstance(l, TensorLoad) and list(l.indices) == list(store.indices) for l in loads):
        return None
    sources = [l.source for l in loads]
    others = [s for s in sources if not s.same_as(result)]
    if len(others) != 1 or tuple(others[0].shape) != tuple(result.shape):
        return None
    return others[0]



class BlockMatmul(CPUScheduleRule):
    """Projections with weights in llama.cpp's block layouts (the ``gguf`` scheme: a
    ``dequantize`` block annotated with its layout, fused in front of the NT matmul, optionally
    ``+ residual``) become :func:`block_gemv_cpu` (one activation row) or :func:`block_gemm_cpu`
    (several), with the replaced kernel's parameters; other shapes are left to :class:`NTMatmul`.
    With ``activation_bits`` (8 or 16) they become :func:`block_gemv_integer_cpu` /
    :func:`block_gemm_integer_cpu` where the CPU has an integer dot product (at 16 bits where 8
    could overflow on the layout's codes: ``integer_kernel_for``)."""

    def __init__(self, activation_bits: int | None = None):
        super().__init__()
        self.activation_bits = activation_bits

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        found = _quantized_projection(func, _block_weight)
        if found is None:
            return None
        dequantize, buffers = found
        layout = LAYOUTS[str(dequantize.annotations[LAYOUT_ATTR])]
        n, k = int(buffers["out"].shape[-1]), int(buffers["x"].shape[-1])
        shapes = [tuple(buffers[r].shape) for r in ("x", "out")]
        residual = "residual" in buffers
        integer = (integer_kernel_for(target, layout, self.activation_bits)
                   if self.activation_bits and integer_gemv_supports(layout, k) else None)
        dot, bits = integer or (None, None)
        if _one_row(buffers["x"]) and dot is not None:
            kernel = block_gemv_integer_cpu(layout, n, k, shapes, residual, dot, bits)
        elif _one_row(buffers["x"]):
            kernel = block_gemv_cpu(layout, n, k, shapes, residual)
        elif gemm_block_rows(n) is not None and dot is not None:
            kernel = block_gemm_integer_cpu(layout, n, k, shapes, residual, dot, bits)
        elif gemm_block_rows(n) is not None:
            kernel = block_gemm_cpu(layout, n, k, shapes, residual)
        else:
            return None
        return _in_place_of(func, kernel, {p.name: p for p in kernel.params}, buffers)


def _block_weight(dequantize: tirx.SBlock, weight: tirx.Buffer) -> dict[str, tirx.Buffer] | None:
    """The components of a dequantize in one of llama.cpp's block layouts, by name: the layout
    from the block's annotation, each component by its dtype and width."""
    layout = LAYOUTS.get(str(dequantize.annotations.get(LAYOUT_ATTR, "")))
    k = int(weight.shape[1])
    if layout is None or k % layout.block:
        return None
    roles = {}
    for region in dequantize.reads:
        component = layout.component_of(str(region.source.dtype), int(region.source.shape[1]), k)
        if component is None or component.name in roles:
            return None
        roles[component.name] = region.source
    return roles if len(roles) == len(layout.components) else None


class _AttentionReplacement(CPUScheduleRule):
    """Replaces the TVM CPU attention kernel named ``replaces`` (the pipeline offers it these
    hand-written kernels, which dlight skips) with relaxlm's, built by ``kernel`` from the buffers
    TVM's kernel reads."""

    replaces: str

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not (isinstance(func, tirx.PrimFunc) and self.is_target_available(target)
                and func.attrs.get("global_symbol") == self.replaces):
            return None
        # The shapes come from the buffers TVM's kernel reads (its parameters are handles).
        original = s_tir.Schedule(func)
        reads = {region.source.name: region.source for region in original.get(original.get_sblock("attn")).reads}
        kernel = self.kernel(reads)
        return s_tir.Schedule(kernel) if kernel is not None else None

    def kernel(self, reads: dict) -> tirx.PrimFunc | None:
        """relaxlm's kernel for the shapes of TVM's, or None where it has none."""
        raise NotImplementedError


def _paged_heads(q, pages) -> tuple[int, int, int] | None:
    """(kv heads, query heads, head dim) of a TVM kernel over the paged cache, or None where
    relaxlm's kernels take none of its shapes."""
    (_, h_q, d), (_, _, h_kv, page_size, _) = q.shape, pages.shape
    if int(d) % F32_LANES or int(page_size) != KEY_TILE:
        return None
    return int(h_kv), int(h_q), int(d)


class DecodeAttention(_AttentionReplacement):
    """One query per sequence over its paged keys: :func:`decode_attention_cpu`."""

    replaces = "batch_decode_paged_kv_cpu"
    sliding = False

    def kernel(self, reads: dict) -> tirx.PrimFunc | None:
        heads = _paged_heads(reads["Q"], reads["pages"])
        return heads and decode_attention_cpu(*heads, str(reads["Q"].dtype), sliding=self.sliding)


class SlidingDecodeAttention(DecodeAttention):
    """One query per sequence over the keys its window keeps: :func:`decode_attention_cpu`."""

    replaces = "batch_decode_paged_kv_cpu_sliding_window"
    sliding = True


class RaggedPrefillAttention(_AttentionReplacement):
    """A prefill chunk's queries over the chunk's own keys: :func:`ragged_prefill_attention_cpu`."""

    replaces = "batch_prefill_ragged_kv"

    @staticmethod
    def kernel(reads: dict) -> tirx.PrimFunc | None:
        q, k = reads["q"], reads["k"]
        (_, h_q, d), (_, h_kv, _) = q.shape, k.shape
        if int(d) % F32_LANES:
            return None
        return ragged_prefill_attention_cpu(int(h_kv), int(h_q), int(d), str(q.dtype))


class PagedPrefillAttention(_AttentionReplacement):
    """A prefill chunk's queries over the cached keys before it: :func:`paged_prefill_attention_cpu`."""

    replaces = "batch_prefill_paged_kv_cpu"

    @staticmethod
    def kernel(reads: dict) -> tirx.PrimFunc | None:
        heads = _paged_heads(reads["q"], reads["pages"])
        return heads and paged_prefill_attention_cpu(*heads, str(reads["q"].dtype))


class SplitQKV(CPUScheduleRule):
    """Replaces the KV cache's split of the fused qkv (TVM's ``fused_rope``, left unscheduled)
    with :func:`split_qkv_cpu`."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not (isinstance(func, tirx.PrimFunc) and self.is_target_available(target)
                and func.attrs.get("global_symbol") == "fused_rope" and len(func.params) == 6):
            return None
        original = s_tir.Schedule(func)
        blocks = [original.get(b) for b in original.get_child_blocks(original.get_sblock("root"))]
        if [b.name_hint for b in blocks] != ["llama_fused_rope"]:
            return None
        block = blocks[0]
        qkv = block.reads[-1].source
        q, k, _ = (region.source for region in block.writes)
        (_, _, d), h_q = qkv.shape, q.shape[1]
        return s_tir.Schedule(split_qkv_cpu(int(h_q), int(k.shape[1]), int(d), str(qkv.dtype)))


def cpu_rules(activations: str = "float32") -> list:
    """The dlight rules for the ``llvm`` target, most specific first; ``activations`` (int8,
    int16, float32): what the projections of block layouts round their activations to
    (``cpu_integer``)."""
    return [GroupMatmul(), BlockMatmul(ACTIVATION_BITS.get(activations)), NTMatmul(), DecodeAttention(),
            SlidingDecodeAttention(), RaggedPrefillAttention(), PagedPrefillAttention(), SplitQKV(), Injective()]


__all__ = ["BlockMatmul", "DecodeAttention", "GroupMatmul", "Injective", "NTMatmul", "PagedPrefillAttention",
           "RaggedPrefillAttention", "SlidingDecodeAttention", "SplitQKV", "cpu_rules"]
