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
shift). With several rows (prefill) each parallel task first dequantizes its block of weight rows
into a local buffer and multiplies every activation row with it.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.ir import TensorLoad
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

# Output rows per parallel task: the rows' weights (rows x K floats) stay in cache while every
# activation row (prefill) is multiplied with them.
_ROWS_PER_TASK = 16
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
            rows = _largest_divisor(int(j.dom), (_ROWS_PER_TASK, 8, 4, 2, 1))
            lanes = _largest_divisor(int(k.dom), (_K_LANES, 8, 4))
            if lanes is None:
                return None
            vector = _PACKED_LANES if unpack and lanes % _PACKED_LANES == 0 else lanes
            return self._schedule(sch, matmul.block_rv, [e.block_rv for e in epilogues], dequantize, rows, lanes,
                                  vector)
        except s_tir.ScheduleError:
            return None

    @staticmethod
    def _schedule(sch: s_tir.Schedule, block, epilogues, dequantize, rows: int, lanes: int,  # pylint: disable=too-many-arguments
                  vector: int) -> s_tir.Schedule:
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
        for producer in dequantize:
            # Each task dequantizes its rows once, for all activation rows.
            sch.compute_at(producer, jo)
            sch.vectorize(sch.split(sch.get_loops(producer)[-1], [None, lanes])[-1])
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


def cpu_rules() -> list:
    """The dlight rules for the ``llvm`` target, most specific first."""
    return [NTMatmul()]


__all__ = ["NTMatmul", "cpu_rules"]
