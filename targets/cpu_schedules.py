"""CPU schedules for the kernels that dominate LLM decode on the ``llvm`` target.

TVM's llvm build applies no schedule of its own, and dlight's ``cpu.GEMV`` vectorises across
output rows (strided gathers) while compiling slowly. :class:`NTMatmul` schedules the projection
kernels — ``C[..., j] (+)= sum_k A[..., k] * W[j, k]`` after ``FuseTransposeMatmul``, weights
``[out, in]`` — as row-wise dot products: the reduction is split, the inner part is ``rfactor``-ed
into a small accumulator that is vectorised along ``k`` (contiguous loads from both operands) and
blocks of output rows run in parallel. Decode is bound by reading the weights once, and this reads
them once, in order.

Quantized weights arrive as a ``dequantize`` block fused in front of the matmul
(``passes.fusion``). With one activation row (decode) it is inlined, so the kernel reads the packed
words and unpacks them in registers: the ``k`` lanes are split into vectors of one packed word's
codes, which makes the word index uniform across a vector (one broadcast load, then a vector
shift). With several rows (prefill) each parallel task first dequantizes its block of weight rows,
transposed, into a local buffer and multiplies every activation row with it as a sum of outer
products (see :func:`_schedule_blocked`).

:class:`DecodeAttention` and :class:`RaggedPrefillAttention` replace two CPU attention kernels of
TVM's paged KV cache (decode, and a prefill chunk over its own keys), which run one query head after
another with scalar code and rescale the output after every key (the prefill one scores masked keys
too): here (query, head) pairs run in parallel, ``q . k`` is vectorised and the online softmax
rescales once per :data:`_KEY_TILE` keys.
"""

from __future__ import annotations

import functools
import math

from tvm import s_tir, tirx
from tvm.ir import TensorLoad
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.script import tirx as T
from tvm.target import Target

# Output rows per parallel task of the row-wise dot products (decode).
_ROWS_PER_TASK = 16
# Output rows per prefill task: the transposed dequantized block (_BLOCK_ROWS x K floats) stays in
# L2, and its outputs for one activation row fill 8 AVX2 registers.
_BLOCK_ROWS = 64
# Elements of K per accumulator: two AVX2 vectors, so two independent FMA chains per row.
_K_LANES = 16
# The block FuseTIR leaves for a fused dequantize (passes.quantization's TE op).
_DEQUANTIZE = "dequantize"
# Lanes per vector when the weight is unpacked in registers: codes per uint32 at 4 bits, one AVX2
# vector of float32 (at 8 bits a word holds 4 codes, and the vector spans two words).
_PACKED_LANES = 8


def _largest_divisor(n: int, candidates: tuple[int, ...]) -> int | None:
    return next((c for c in candidates if n % c == 0), None)


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
            block_rows = _largest_divisor(int(j.dom), (_BLOCK_ROWS, 32, 16, 8))
            if dequantize and block_rows is not None:
                return _schedule_blocked(sch, matmul.block_rv, epilogues, dequantize, block_rows)
            rows = _largest_divisor(int(j.dom), (_ROWS_PER_TASK, 8, 4, 2, 1))
            lanes = _largest_divisor(int(k.dom), (_K_LANES, 8, 4))
            if lanes is None or dequantize:
                return None
            vector = _PACKED_LANES if unpack and lanes % _PACKED_LANES == 0 else lanes
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
        sch.vectorize(sch.split(sch.get_loops(producer)[-1], [None, _F32_LANES])[-1])
    sch.parallel(jo)
    sch.vectorize(ji)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(block, k))[-1])
    return sch




class Injective(CPUScheduleRule):
    """Kernels of elementwise and layout blocks only (split, concat, reshape, RoPE, activations):
    every block is inlined into the last, so the kernel is one loop nest that writes no
    intermediate buffer; big ones (prefill) run in parallel chunks of :data:`_INJECTIVE_CHUNK`."""

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
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        extent = sch.get(fused).extent
        if not isinstance(extent, tirx.IntImm) or int(extent) > _INJECTIVE_CHUNK:
            sch.parallel(sch.split(fused, [None, _INJECTIVE_CHUNK])[0])
        return sch


# Elements per parallel task of an injective kernel; smaller kernels (decode) stay serial, as
# waking the thread pool costs more than they do.
_INJECTIVE_CHUNK = 1 << 14

# Codes per block of group_gemv_cpu: one vector of packed words.
_GEMV_BLOCK = _PACKED_LANES * _PACKED_LANES
# Activation rows by weight rows of group_gemm_cpu's register tile: 12 accumulators of 8 lanes,
# plus 3 + 4 loaded vectors, fit AVX2's 16 registers.
_GEMM_TILE_ROWS, _GEMM_TILE_COLS = 6, 2
# Roles of the buffers of a decode projection kernel, in the order group_gemv_cpu takes them.
_GEMV_ROLES = ("x", "packed", "scale", "residual", "out")


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
        buffers = _group_matmul_buffers(func)
        if buffers is None:
            return None
        (n, words), groups = (int(d) for d in buffers["packed"].shape), int(buffers["scale"].shape[1])
        k, rows = words * _PACKED_LANES, buffers["x"].shape[:-1]
        shapes = [tuple(buffers[r].shape) for r in ("x", "out")]
        scale_dtype, residual = str(buffers["scale"].dtype), "residual" in buffers
        if all(isinstance(d, (int, tirx.IntImm)) and int(d) == 1 for d in rows):
            if k % _GEMV_BLOCK:
                return None
            kernel = group_gemv_cpu(n, k, groups, shapes, scale_dtype, residual)
        else:
            if _gemm_block_rows(n) is None:
                return None
            kernel = group_gemm_cpu(n, k, groups, shapes, scale_dtype, residual)
        # The parameters of the kernel it replaces, in their order, and its attributes.
        param_of = dict(zip(_GEMV_ROLES, kernel.params))
        params = [param_of[_role(buffers, p)] for p in func.params]
        return s_tir.Schedule(tirx.PrimFunc(params, kernel.body, kernel.ret_type, func.attrs))


def _role(buffers: dict[str, tirx.Buffer], buffer: tirx.Buffer) -> str:
    return next(role for role, b in buffers.items() if b.same_as(buffer))


def _group_matmul_buffers(func: tirx.PrimFunc) -> dict[str, tirx.Buffer] | None:
    """The buffers of a 4-bit projection kernel by role (:data:`_GEMV_ROLES`), or None when
    ``func`` is not one."""
    sch = s_tir.Schedule(func)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    names = [b.name_hint for b in blocks]
    if names not in ([_DEQUANTIZE, "NT_matmul"], [_DEQUANTIZE, "NT_matmul", "T_add"]):
        return None
    dequantize, matmul, *epilogue = blocks
    weight = dequantize.writes[0].source
    packed, scale = (r.source for r in dequantize.reads) if len(dequantize.reads) == 2 else (None, None)
    x = [r.source for r in matmul.reads if not r.source.same_as(weight) and not r.source.same_as(matmul.writes[0].source)]
    if packed is None or len(x) != 1 or str(packed.dtype) != "uint32":
        return None
    (n, words), (_, groups), k = packed.shape, scale.shape, weight.shape[1]
    if not (int(words) * _PACKED_LANES == int(k) and int(k) % int(groups) == 0
            and (int(k) // int(groups)) % _PACKED_LANES == 0 and int(n) == int(weight.shape[0])):
        return None
    buffers = {"x": x[0], "packed": packed, "scale": scale, "out": matmul.writes[0].source}
    if epilogue:
        residual = _added_to(epilogue[0], buffers["out"])
        if residual is None:
            return None
        buffers.update(residual=residual, out=epilogue[0].writes[0].source)
    float32 = all(str(buffers[r].dtype) == "float32" for r in buffers if r not in ("packed", "scale"))
    if not (float32 and len(func.params) == len(buffers)
            and all(any(b.same_as(p) for p in func.params) for b in buffers.values())):
        return None
    try:
        sch.compute_inline(sch.get_sblock(_DEQUANTIZE))
    except s_tir.ScheduleError:
        return None
    return buffers if _is_nt_matmul(sch.get(sch.get_sblock("NT_matmul"))) else None


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


# pylint: disable=invalid-name,unused-argument,too-many-arguments,too-many-locals
def group_gemv_cpu(n: int, k: int, groups: int, shapes: list[tuple], scale_dtype: str, residual: bool) -> tirx.PrimFunc:
    """``out = x . dequantize(packed, scale)^T (+ residual)`` for one activation row ``x`` of ``k``
    float32 values and 4-bit codes (8 per uint32, zero point 7). Its parameters are
    :data:`_GEMV_ROLES`; without ``residual`` the kernel never reads that one, and the caller
    leaves it out. ``k`` is a multiple of :data:`_GEMV_BLOCK`.

    A row is read :data:`_PACKED_LANES` words (a block of 64 codes) at a time, as one vector whose
    lane ``l`` is word ``l``. Shifting the whole vector by ``4 s`` puts code ``s`` of every word in
    its lane, so a block is 8 immediate shifts, masks, converts, zero-point subtractions and FMAs,
    against ``x`` permuted once per call to the same order (``x_planes``). The FMAs go to two
    partial sums (latency), which the lanes' group scales multiply once per block; each row's lanes
    are summed at its end. Output rows go in parallel blocks of :data:`_ROWS_PER_TASK`."""
    group, x_shape, out_shape = k // groups, shapes[0], shapes[1]
    blocks, lanes, rows = k // _GEMV_BLOCK, _PACKED_LANES, _largest_divisor(n, (_ROWS_PER_TASK, 8, 4, 2, 1))

    @T.macro
    def plane(partial, packed, x_planes, j, b, s):
        # Code s of each of the block's words, times x at that code's position.
        for lane in T.vectorized(lanes):
            partial[lane] += (T.Cast("float32", T.Cast("int32", T.bitwise_and(
                T.shift_right(packed[j, b * lanes + lane], T.uint32(4 * s)), T.uint32(15)))) - 7.0
                ) * x_planes[(b * lanes + s) * lanes + lane]

    @T.prim_func(s_tir=True)
    def group_gemv(x: T.Buffer(x_shape, "float32"), packed: T.Buffer((n, k // lanes), "uint32"),
                   scale: T.Buffer((n, groups), scale_dtype), added: T.Buffer(out_shape, "float32"),
                   out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        x_row = T.decl_buffer((k,), "float32", data=x.data)
        out_row = T.decl_buffer((n,), "float32", data=out.data)
        # Python-level ifs: without a residual the kernel never touches the parameter (dropped).
        if residual:
            added_row = T.decl_buffer((n,), "float32", data=added.data)
        x_planes = T.alloc_buffer((k,), "float32")
        for b, s, w in T.grid(blocks, lanes, lanes):
            with T.sblock("x_planes"):
                vb, vs, vw = T.axis.remap("SSS", [b, s, w])
                x_planes[(vb * lanes + vs) * lanes + vw] = x_row[(vb * lanes + vw) * lanes + vs]
        for task in T.parallel(n // rows):
            with T.sblock("gemv"):
                if residual:
                    T.reads(x_planes[0:k], packed[0:n, 0:k // lanes], scale[0:n, 0:groups], added_row[0:n])
                else:
                    T.reads(x_planes[0:k], packed[0:n, 0:k // lanes], scale[0:n, 0:groups])
                T.writes(out_row[0:n])
                acc = T.sblock_alloc_buffer((lanes,), "float32")
                even = T.sblock_alloc_buffer((lanes,), "float32")
                odd = T.sblock_alloc_buffer((lanes,), "float32")
                total = T.sblock_alloc_buffer((1,), "float32")
                for r in T.serial(rows):
                    j: T.let[T.int32] = task * rows + r
                    for lane in T.vectorized(lanes):
                        acc[lane] = 0.0
                    for b in T.serial(blocks):
                        for lane in T.vectorized(lanes):
                            even[lane] = 0.0
                            odd[lane] = 0.0
                        for s in T.unroll(lanes // 2):
                            plane(even, packed, x_planes, j, b, 2 * s)
                            plane(odd, packed, x_planes, j, b, 2 * s + 1)
                        for lane in T.vectorized(lanes):
                            acc[lane] += (even[lane] + odd[lane]) * T.Cast(
                                "float32", scale[j, (b * lanes + lane) * lanes // group])
                    total[0] = 0.0
                    for lane in T.serial(lanes):
                        total[0] += acc[lane]
                    if residual:
                        out_row[j] = total[0] + added_row[j]
                    else:
                        out_row[j] = total[0]

    return group_gemv


def _gemm_block_rows(n: int) -> int | None:
    """Weight rows per parallel task of :func:`group_gemm_cpu`: 64, or 32 where that leaves too
    few tasks to share among the threads (576 rows: 18 tasks, not 9)."""
    for rows in (64, 32):
        if n % rows == 0 and (n // rows >= 16 or rows == 32):
            return rows
    return None


def group_gemm_cpu(n: int, k: int, groups: int, shapes: list[tuple], scale_dtype: str, residual: bool) -> tirx.PrimFunc:
    """``out = x . dequantize(packed, scale)^T (+ residual)`` for any number of activation rows
    (prefill), 4-bit codes as in :func:`group_gemv_cpu`, same parameters.

    Each parallel task dequantizes a block of :func:`_gemm_block_rows` weight rows once (in
    order, vectorised) and multiplies every activation row with it in tiles of
    :data:`_GEMM_TILE_ROWS` activation rows by :data:`_GEMM_TILE_COLS` weight rows: per 8 values
    of ``k``, 3 + 4 vector loads feed 12 independent FMA chains that stay in registers, and each
    of the 12 outputs is summed across its lanes at the end. Rows left over go one at a time."""
    group, x_shape, out_shape = k // groups, shapes[0], shapes[1]
    block, lanes, cols = _gemm_block_rows(n), _PACKED_LANES, _GEMM_TILE_COLS
    rows = functools.reduce(lambda a, b: a * b, x_shape[:-1])
    tiles = rows // _GEMM_TILE_ROWS

    @T.macro
    def tile(acc, total, x_rows, weights, out_rows, added_rows, first, count, j0, jb):
        """Outputs of activation rows ``first ..`` (``count`` of them) for weight rows ``jb ..``
        of the task's block (``j0``: the block's first row)."""
        for r, c in T.grid(count, cols):
            for lane in T.vectorized(lanes):
                acc[r, c, lane] = 0.0
        for kv in T.serial(k // lanes):
            for r in T.unroll(count):
                for c in T.unroll(cols):
                    for lane in T.vectorized(lanes):
                        acc[r, c, lane] += (x_rows[(first + r) * k + kv * lanes + lane]
                                            * weights[(jb + c) * k + kv * lanes + lane])
        for r in T.unroll(count):
            for c in T.unroll(cols):
                total[0] = 0.0
                for lane in T.serial(lanes):
                    total[0] += acc[r, c, lane]
                if residual:
                    out_rows[(first + r) * n + j0 + jb + c] = total[0] + added_rows[(first + r) * n + j0 + jb + c]
                else:
                    out_rows[(first + r) * n + j0 + jb + c] = total[0]

    @T.prim_func(s_tir=True)
    def group_gemm(x: T.Buffer(x_shape, "float32"), packed: T.Buffer((n, k // lanes), "uint32"),
                   scale: T.Buffer((n, groups), scale_dtype), added: T.Buffer(out_shape, "float32"),
                   out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        x_rows = T.decl_buffer((rows * k,), "float32", data=x.data)
        out_rows = T.decl_buffer((rows * n,), "float32", data=out.data)
        if residual:
            added_rows = T.decl_buffer((rows * n,), "float32", data=added.data)
        else:
            added_rows = out_rows  # never read
        for task in T.parallel(n // block):
            with T.sblock("gemm"):
                if residual:
                    T.reads(x_rows[0:rows * k], packed[0:n, 0:k // lanes], scale[0:n, 0:groups], added_rows[0:rows * n])
                else:
                    T.reads(x_rows[0:rows * k], packed[0:n, 0:k // lanes], scale[0:n, 0:groups])
                T.writes(out_rows[0:rows * n])
                weights = T.sblock_alloc_buffer((block * k,), "float32")
                acc = T.sblock_alloc_buffer((_GEMM_TILE_ROWS, cols, lanes), "float32")
                total = T.sblock_alloc_buffer((1,), "float32")
                j0: T.let[T.int32] = task * block
                for jj, w in T.grid(block, k // lanes):
                    for lane in T.vectorized(lanes):
                        weights[jj * k + w * lanes + lane] = (T.Cast("float32", T.Cast("int32", T.bitwise_and(
                            T.shift_right(packed[j0 + jj, w], T.Cast("uint32", lane * 4)), T.uint32(15)))) - 7.0
                            ) * T.Cast("float32", scale[j0 + jj, w * lanes // group])
                for jb in T.serial(block // cols):
                    for t in T.serial(tiles):
                        tile(acc, total, x_rows, weights, out_rows, added_rows, t * _GEMM_TILE_ROWS,
                             _GEMM_TILE_ROWS, j0, jb * cols)
                    for m in T.serial(tiles * _GEMM_TILE_ROWS, rows):
                        tile(acc, total, x_rows, weights, out_rows, added_rows, m, 1, j0, jb * cols)

    return group_gemm


# float32 lanes of one AVX2 vector.
_F32_LANES = 8
# Keys per step of the attention kernels' online softmax (a page of TVM's cache).
_KEY_TILE = 16
# TVM's "minus infinity" for running maxima: exp2 of (it - a real score) is exactly 0 in float32.
_NEG = -5e4
_LOG2_E = math.log2(math.e)
# Slots of the attention kernels' ``state`` buffer: running max, its update, softmax sum, rescale.
_MAX, _NEW_MAX, _SUM, _RESCALE = 0, 1, 2, 3


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

    @staticmethod
    def kernel(reads: dict) -> tirx.PrimFunc | None:
        """relaxlm's kernel for the shapes of TVM's, or None where it has none."""
        raise NotImplementedError


class DecodeAttention(_AttentionReplacement):
    """One query per sequence over its paged keys: :func:`decode_attention_cpu`."""

    replaces = "batch_decode_paged_kv_cpu"

    @staticmethod
    def kernel(reads: dict) -> tirx.PrimFunc | None:
        q, pages = reads["Q"], reads["pages"]
        (_, h_q, d), (_, _, h_kv, page_size, _) = q.shape, pages.shape
        if int(d) % _F32_LANES or int(page_size) != _KEY_TILE:
            return None
        return decode_attention_cpu(int(h_kv), int(h_q), int(d), str(q.dtype))


class RaggedPrefillAttention(_AttentionReplacement):
    """A prefill chunk's queries over the chunk's own keys: :func:`ragged_prefill_attention_cpu`."""

    replaces = "batch_prefill_ragged_kv"

    @staticmethod
    def kernel(reads: dict) -> tirx.PrimFunc | None:
        q, k = reads["q"], reads["k"]
        (_, h_q, d), (_, h_kv, _) = q.shape, k.shape
        if int(d) % _F32_LANES:
            return None
        return ragged_prefill_attention_cpu(int(h_kv), int(h_q), int(d), str(q.dtype))


@T.macro
def _start(o, state):
    # As in TVM's kernels: with no keys the output is 0 and the lse -5e4.
    state[_MAX] = _NEG
    state[_SUM] = 1.0
    for i in T.vectorized(o.shape[0]):
        o[i] = 0.0


@T.macro
def _attend(q_row, keys, values, n, sm_scale, o, partial, score, state):
    """Online softmax over ``n`` keys and values (rows of ``keys``/``values``): vectorised dot
    products into ``score``, then one rescale of ``o`` and the weighted values."""
    state[_NEW_MAX] = state[_MAX]
    for key in T.serial(n):
        for lane in T.vectorized(_F32_LANES):
            partial[lane] = 0.0
        for c in T.serial(o.shape[0] // _F32_LANES):
            for lane in T.vectorized(_F32_LANES):
                partial[lane] += (T.Cast("float32", q_row[c * _F32_LANES + lane])
                                  * T.Cast("float32", keys[key, c * _F32_LANES + lane]))
        score[key] = 0.0
        for lane in T.serial(_F32_LANES):
            score[key] += partial[lane]
        score[key] *= sm_scale * _LOG2_E
        state[_NEW_MAX] = T.max(state[_NEW_MAX], score[key])
    state[_RESCALE] = T.exp2(state[_MAX] - state[_NEW_MAX])
    state[_SUM] *= state[_RESCALE]
    for i in T.vectorized(o.shape[0]):
        o[i] *= state[_RESCALE]
    for key in T.serial(n):
        score[key] = T.exp2(score[key] - state[_NEW_MAX])
        state[_SUM] += score[key]
        for i in T.vectorized(o.shape[0]):
            o[i] += score[key] * T.Cast("float32", values[key, i])
    state[_MAX] = state[_NEW_MAX]


@T.macro
def _finish(o, state, out_row, lse, row, h):
    for i in T.vectorized(o.shape[0]):
        out_row[i] = T.Cast(out_row.dtype, o[i] / state[_SUM])
    lse[row, h] = state[_MAX] + T.log2(state[_SUM])


def decode_attention_cpu(h_kv: int, h_q: int, d: int, dtype: str) -> tirx.PrimFunc:
    """One query per sequence over its cached keys, with TVM's signature and results (output and
    log2-sum-exp per head). Each (sequence, head) is one parallel task, which attends to one page
    of keys at a time. relaxlm applies RoPE in the model (``RopeMode.NONE``): ``rotary_mode`` is 0."""
    group, page_size = h_q // h_kv, _KEY_TILE

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_cpu(
        var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle, var_page_values: T.handle,
        var_length_info: T.handle, var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
        var_output: T.handle, var_lse: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        batch_size, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", offset_factor=1)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", offset_factor=1)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", offset_factor=1)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", offset_factor=1)
        T.match_buffer(var_q_rope_position, (batch_size,), "int32", offset_factor=1)
        output = T.match_buffer(var_output, (batch_size, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, h_q), "float32")
        T.Assert(rotary_mode == 0, "relaxlm's CPU attention expects RoPE applied by the model")
        for task in T.parallel(batch_size * h_q):
            with T.sblock("attn"):
                T.reads(q[0:batch_size, 0:h_q, 0:d], pages[0:max_num_pages, 0:2, 0:h_kv, 0:page_size, 0:d],
                        page_indptr[0:batch_size + 1], page_values[0:nnz_pages], last_page_len[0:batch_size])
                T.writes(output[0:batch_size, 0:h_q, 0:d], lse[0:batch_size, 0:h_q])
                o = T.sblock_alloc_buffer((d,), "float32")
                partial = T.sblock_alloc_buffer((_F32_LANES,), "float32")
                score = T.sblock_alloc_buffer((page_size,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")
                b: T.let[T.int32] = task // h_q
                h: T.let[T.int32] = task % h_q
                begin: T.let[T.int32] = page_indptr[b]
                num_pages: T.let[T.int32] = page_indptr[b + 1] - begin
                _start(o, state)
                for p in T.serial(num_pages):
                    page: T.let[T.int32] = page_values[begin + p]
                    keys = T.decl_buffer((page_size, d), dtype, data=pages.data,
                                         elem_offset=((page * 2 + 0) * h_kv + h // group) * page_size * d)
                    values = T.decl_buffer((page_size, d), dtype, data=pages.data,
                                           elem_offset=((page * 2 + 1) * h_kv + h // group) * page_size * d)
                    _attend(T.decl_buffer((d,), dtype, data=q.data, elem_offset=task * d), keys, values,
                            T.if_then_else(p == num_pages - 1, last_page_len[b], page_size), sm_scale,
                            o, partial, score, state)
                _finish(o, state, T.decl_buffer((d,), dtype, data=output.data, elem_offset=task * d), lse, b, h)

    return batch_decode_paged_kv_cpu


def ragged_prefill_attention_cpu(h_kv: int, h_q: int, d: int, dtype: str) -> tirx.PrimFunc:
    """The queries of a prefill chunk over the chunk's own keys (causal when the runtime says so),
    with TVM's signature and results. Each (query, head) is one parallel task, which attends to
    :data:`_KEY_TILE` keys at a time and skips the masked ones (exactly 0 in TVM's kernel)."""
    group, tile = h_q // h_kv, _KEY_TILE

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
        var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        batch_size, qo_len, kv_len = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", offset_factor=1)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", offset_factor=1)
        T.match_buffer(var_q_rope_position, (qo_len,), "int32", offset_factor=1)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", offset_factor=1)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        T.Assert(rotary_mode == 0, "relaxlm's CPU attention expects RoPE applied by the model")
        for task in T.parallel(qo_len * h_q):
            with T.sblock("attn"):
                T.reads(q[0:qo_len, 0:h_q, 0:d], k[0:kv_len, 0:h_kv, 0:d], v[0:kv_len, 0:h_kv, 0:d],
                        q_indptr[0:batch_size + 1], kv_indptr[0:batch_size + 1])
                T.writes(output[0:qo_len, 0:h_q, 0:d], lse[0:qo_len, 0:h_q])
                o = T.sblock_alloc_buffer((d,), "float32")
                partial = T.sblock_alloc_buffer((_F32_LANES,), "float32")
                score = T.sblock_alloc_buffer((tile,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")
                seq = T.sblock_alloc_buffer((1,), "int32")
                row: T.let[T.int32] = task // h_q
                h: T.let[T.int32] = task % h_q
                # The query's sequence: the last one starting at or before it (empty ones included).
                seq[0] = 0
                for i in T.serial(batch_size):
                    if q_indptr[i] <= row:
                        seq[0] = i
                begin: T.let[T.int32] = kv_indptr[seq[0]]
                # Causal: the chunk's queries end where its keys end, each sees the keys up to its own.
                limit: T.let[T.int32] = T.if_then_else(causal > 0, kv_indptr[seq[0] + 1] - q_indptr[seq[0] + 1] + row + 1,
                                                       kv_indptr[seq[0] + 1]) - begin
                _start(o, state)
                for t in T.serial(T.ceildiv(limit, tile)):
                    keys = T.decl_buffer((tile, d), dtype, data=k.data, strides=[h_kv * d, 1],
                                         elem_offset=((begin + t * tile) * h_kv + h // group) * d)
                    values = T.decl_buffer((tile, d), dtype, data=v.data, strides=[h_kv * d, 1],
                                           elem_offset=((begin + t * tile) * h_kv + h // group) * d)
                    _attend(T.decl_buffer((d,), dtype, data=q.data, elem_offset=task * d), keys, values,
                            T.min(tile, limit - t * tile), sm_scale, o, partial, score, state)
                _finish(o, state, T.decl_buffer((d,), dtype, data=output.data, elem_offset=task * d), lse, row, h)

    return batch_prefill_ragged_kv


def cpu_rules() -> list:
    """The dlight rules for the ``llvm`` target, most specific first."""
    return [GroupMatmul(), NTMatmul(), DecodeAttention(), RaggedPrefillAttention(), Injective()]


__all__ = ["DecodeAttention", "GroupMatmul", "Injective", "NTMatmul", "RaggedPrefillAttention", "cpu_rules", "decode_attention_cpu",
           "group_gemm_cpu", "group_gemv_cpu", "ragged_prefill_attention_cpu"]
