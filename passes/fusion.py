"""Fusion passes that Relax's FuseOps does not do on its own.

:func:`fuse_dequantize_matmul` puts each ``dequantize`` (see ``passes.quantization``) into one
kernel with the matmul that reads it, so decode reads the packed weights and never writes a
dequantized copy. FuseOps would not: it fuses only elementwise/broadcast producers into a matmul,
and AnnotateTIROpPattern calls ``w[i, j] = f(packed[i, j // 8], scale[i, j // 32])`` injective.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.dpl.pattern import GlobalVarPattern, TuplePattern, is_op, wildcard

DEQUANTIZE = "dequantize"
# Matmul PrimFuncs as LegalizeOps names them (FuseTransposeMatmul's NT_matmul, or op.matmul's).
_MATMULS = ("NT_matmul", "matmul")
# Elementwise epilogues (bias, residual add, cast) fused after the matmul, at most this many.
_MAX_EPILOGUES = 2
# tvm.relax.OpPatternKind: elementwise and broadcast, the epilogues that FuseOps would fuse too.
_BROADCAST = 1


def _call_tir(*args) -> relax.dpl.DFPattern:
    return is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern(list(args)))


def _patterns() -> list[tuple[relax.dpl.DFPattern, dict]]:
    """dequantize → matmul → up to two unary/binary epilogues, the longest first."""
    # A dequantize reads two arrays (codes and scales) or, in llama.cpp's block layouts, up to four.
    dequantize = is_op("relax.call_tir")(GlobalVarPattern(), wildcard())
    matmul = _call_tir(wildcard(), dequantize)
    found = []
    for count in range(_MAX_EPILOGUES, -1, -1):
        node, annotations = matmul, {"dequantize": dequantize, "matmul": matmul}
        for i in range(count):
            # One pattern with alternatives rather than one per argument position: FuseOpsByPattern
            # runs each pattern over the whole module, so fewer patterns compile faster. Binary
            # first: with the one-argument branch first, the matcher misses most residual adds
            # (test_quantized_llama counts them).
            args = TuplePattern([wildcard(), node]) | TuplePattern([node, wildcard()]) | TuplePattern([node])
            node = is_op("relax.call_tir")(GlobalVarPattern(), args)
            annotations[f"epilogue{i}"] = node
        found.append((node, annotations))
    return found


def _is_dequantize(func) -> bool:
    """A PrimFunc whose one block is a ``dequantize``."""
    if not isinstance(func, tirx.PrimFunc):
        return False
    sch = s_tir.Schedule(func)
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))] == [DEQUANTIZE]


def _checker(mod: tvm.IRModule):
    # Decided once per module: the check runs for every candidate match.
    dequantize = {gv.name_hint for gv, func in mod.functions_items() if _is_dequantize(func)}
    elementwise = {gv.name_hint for gv, func in mod.functions_items()
                   if isinstance(func, tirx.PrimFunc) and int(func.attrs.get("op_pattern", 99)) <= _BROADCAST}

    def check(ctx: relax.transform.PatternCheckContext) -> bool:
        exprs = ctx.annotated_expr
        if exprs["dequantize"].args[0].name_hint not in dequantize:
            return False
        if not any(exprs["matmul"].args[0].name_hint.startswith(m) for m in _MATMULS):
            return False
        epilogues = [exprs[k] for k in sorted(exprs) if k.startswith("epilogue")]
        if any(e.args[0].name_hint not in elementwise for e in epilogues):
            return False
        # Every value but the last must be used only inside the group, or it would be lost.
        inner = [exprs["dequantize"], exprs["matmul"], *epilogues][:-1]
        return all(len(ctx.var_usages.get(ctx.value_to_bound_var[e], [])) == 1 for e in inner)

    return check


def fuse_dequantize_matmul() -> tvm.transform.Pass:
    """Group ``dequantize`` → matmul (→ elementwise epilogues) into one primitive function that
    FuseTIR turns into one kernel. Runs after LegalizeOps and AnnotateTIROpPattern, before
    FuseOps; FuseOps leaves the groups alone."""

    @tvm.transform.module_pass(opt_level=0, name="FuseDequantizeMatmul")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        check = _checker(mod)
        patterns = [relax.transform.FusionPattern(f"{DEQUANTIZE}_matmul", pattern, annotations, check)
                    for pattern, annotations in _patterns()]
        return relax.transform.FuseOpsByPattern(patterns, bind_constants=False)(mod)

    return run
