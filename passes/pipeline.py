"""The Relax pass pipeline: from the exported IRModule to a module ready to build."""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import dlight

from .fusion import fuse_dequantize_matmul


def _dump(directory: Path | None, phase: str) -> list[tvm.transform.Pass]:
    """A pass that writes the IR after ``phase`` when ``--debug-dump`` asked for it."""
    if directory is None:
        return []

    @tvm.transform.module_pass(opt_level=0, name=f"dump_{phase}")
    def dump(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{phase}.py").write_text(mod.script(show_meta=False))
        return mod

    return [dump]


def fusion_passes() -> list[tvm.transform.Pass]:
    """From legalized Relax to fused kernels: the dequantize into its matmul (``passes.fusion``),
    then Relax's FuseOps/FuseTIR for everything else."""
    return [
        relax.transform.AnnotateTIROpPattern(),
        fuse_dequantize_matmul(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def _replace_hand_scheduled(rules: list) -> list[tvm.transform.Pass]:
    """dlight skips kernels marked scheduled, such as the paged KV cache's attention; a rule with
    a ``replaces`` attribute (a kernel name) supplies its own schedule for the kernel of that name."""
    replacing = {rule.replaces: rule for rule in rules if hasattr(rule, "replaces")}
    if not replacing:
        return []

    @tvm.transform.module_pass(opt_level=0, name="ReplaceHandScheduled")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current()
        for gv, func in list(mod.functions_items()):
            rule = replacing.get(gv.name_hint)
            sch = rule.apply(func, target, False) if rule is not None else None
            if sch is not None:
                mod[gv] = sch.mod["main"].with_attrs(func.attrs)
        return mod

    return [run]


def relax_pipeline(target: tvm.target.Target, recipe, debug_dump: Path | None = None,
                   activations: str = "float32"):
    """Legalize, fuse, schedule and lower for ``target``. ``recipe`` (a ``targets.TargetRecipe``)
    gives the dlight schedule rules and TVM's backend pass lists for the device; ``activations``
    (float32, int16, int8) what its rules' projections round activations to."""
    backend = recipe.backend
    schedule_rules = recipe.schedule_rules(activations)
    passes = (
        _dump(debug_dump, "0_exported")
        # nn.Linear exports permute_dims(W) + matmul: fuse them so weights are not transposed per call.
        + [relax.transform.FuseTransposeMatmul()]
        + backend.library_dispatch_passes(target)
        + [relax.transform.LegalizeOps(recipe.legalizations())]
        + fusion_passes()
        + _dump(debug_dump, "1_fused")
        + ([dlight.ApplyDefaultSchedule(*schedule_rules)] if schedule_rules else [])
        + _replace_hand_scheduled(schedule_rules)
        + _dump(debug_dump, "2_scheduled")
        + backend.dataflow_lower_passes(target)
        + backend.finalize_passes(target)
    )

    @tvm.transform.module_pass(opt_level=0, name="relaxlm_pipeline")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return run
