"""llama.cpp's block layouts (passes.gguf_blocks) against the ``gguf`` package: the stored
components put back byte for byte, and the ``dequantize`` op the model runs giving exactly
``gguf.quants.dequantize``'s float32 bits. The real tensors of both bundled files are checked in
test_real_gguf_native.py."""

import gguf
import numpy as np
import pytest
import tvm
from tvm import te

from relaxlm import targets
from relaxlm.passes.gguf_blocks import LAYOUTS, BlockLayout
from relaxlm.passes.gguf_quantization import FALLBACK_GROUPS, FLOAT, NATIVE, GGUFLinear, dequantize_op
from relaxlm.passes import get_scheme
from relaxlm.passes.quantization import GroupQuantizedLinear
from support import random_blocks

ROWS, COLS = 6, 512


def compiled_dequantize(layout: BlockLayout, parts: dict[str, np.ndarray], rows: int, cols: int) -> np.ndarray:
    """The layout's TE dequantize, built for this CPU and run on ``parts``."""
    placeholders = {c.name: te.placeholder(parts[c.name].shape, c.dtype, name=c.name) for c in layout.components}
    out = te.compute((rows, cols), lambda j, col: layout.value(placeholders, j, col), name="dequantize")
    lib = tvm.compile(te.create_prim_func([*placeholders.values(), out]), targets.resolve("llvm").target)
    device = tvm.cpu()
    args = [tvm.runtime.tensor(parts[c.name], device) for c in layout.components]
    result = tvm.runtime.empty((rows, cols), "float32", device)
    lib(*args, result)
    return result.numpy()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_split_then_join_gives_the_same_bytes(name):
    layout = LAYOUTS[name]
    raw = random_blocks(layout, ROWS, COLS)
    parts = layout.split(raw)
    assert {c.name for c in layout.components} == set(parts)
    assert all(parts[c.name].dtype == np.dtype(c.dtype) for c in layout.components)
    assert np.array_equal(layout.join(parts), raw)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_dequantize_op_gives_gguf_bits_exactly(name):
    """Random blocks of every supported type: the compiled dequantize and gguf's agree bit for bit
    (not within a tolerance: same float32 operations in the same order)."""
    layout = LAYOUTS[name]
    raw = random_blocks(layout, ROWS, COLS, seed=1)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    actual = compiled_dequantize(layout, layout.split(raw), ROWS, COLS)
    assert actual.dtype == np.float32 and np.array_equal(actual.view(np.uint32), expected.view(np.uint32))


def test_components_are_known_by_dtype_and_shape():
    """The CPU kernels find each component by its dtype and width (BlockLayout.component_of)."""
    for layout in LAYOUTS.values():
        found = [layout.component_of(c.dtype, c.per_block * (COLS // layout.block), COLS) for c in layout.components]
        assert found == list(layout.components), layout.name


# ---- the scheme's choices, for a source of given tensor types -----------------------------------
def scheme_for(types: dict[str, str]):
    """The gguf scheme for a source whose HF tensors have these types (64 rows each)."""
    return get_scheme("gguf").for_source(lambda hf: (types.get(hf), 64))


def test_storage_follows_the_source_types():
    scheme = scheme_for({"m.q_proj.weight": "Q4_K", "m.k_proj.weight": "Q4_K", "m.v_proj.weight": "Q6_K",
                         "m.o_proj.weight": "Q2_K", "m.norm.weight": "F32", "m.up_proj.weight": "F16"})
    assert scheme.storage("m.qkv_proj.weight", (192, 256)) == NATIVE
    assert scheme.storage("m.qkv_proj.weight", (192, 64)) == FALLBACK_GROUPS  # 64 columns: no 256-blocks
    assert scheme.storage("m.o_proj.weight", (64, 256)) == FALLBACK_GROUPS
    assert scheme.storage("m.norm.weight", (256,)) == FLOAT
    assert scheme.storage("m.up_proj.weight", (64, 256)) == FLOAT
    notes = scheme.notes([("m.o_proj.weight", (64, 256), "float32"), ("m.norm.weight", (256,), "float32")])
    assert notes == ["weights in block types relaxlm does not run natively yet (Q2_K: 1 of 1) are stored as q8f32_1"]


def test_a_fused_projection_of_mixed_types_becomes_one_matmul_per_run():
    """q and k of one type and v of another (as Q4_K_M files have): two stored weights."""
    from tvm.relax.frontend import nn

    class Attention(nn.Module):
        def __init__(self):
            self.qkv_proj = nn.Linear(256, 192, bias=False)
            self.o_proj = nn.Linear(256, 64, bias=False)

    scheme = scheme_for({"a.q_proj.weight": "Q5_0", "a.k_proj.weight": "Q5_0", "a.v_proj.weight": "Q8_0",
                         "a.o_proj.weight": "IQ2_XS"})

    class Outer(nn.Module):
        def __init__(self):
            self.a = Attention()

    module = scheme.quantize_module(Outer())
    assert isinstance(module.a.qkv_proj, GGUFLinear) and isinstance(module.a.o_proj, GroupQuantizedLinear)
    assert [(p.layout.name, p.rows) for p in module.a.qkv_proj.parts] == [("Q5_0", 128), ("Q8_0", 64)]


def test_gguf_needs_a_gguf_source():
    from relaxlm.passes import PassError

    with pytest.raises(PassError, match="needs a GGUF file"):
        get_scheme("gguf").storage("m.q_proj.weight", (64, 256))


def test_dequantize_op_is_annotated_with_its_layout():
    """The CPU schedule rule finds the layout in the dequantize block's annotation."""
    from tvm.relax.frontend import nn

    layout = LAYOUTS["Q4_0"]

    class Weight(nn.Module):
        def __init__(self):
            self.d = nn.Parameter((4, 2), dtype="float16")
            self.qs = nn.Parameter((4, 32), dtype="uint8")

        def forward(self, x: nn.Tensor):
            return nn.op.matmul(x, nn.op.permute_dims(dequantize_op(layout, [self.d, self.qs], 4, 64)))

    mod, _ = Weight().export_tvm({"forward": {"x": nn.spec.Tensor((1, 64), "float32")}})
    assert '"gguf_type": "Q4_0"' in mod.script()


@pytest.mark.parametrize("name", sorted(n for n, layout in LAYOUTS.items() if layout.nibble_weight))
def test_nibble_words_hold_the_layouts_codes(name):
    """The 16-bit integer kernels read 4-bit codes as ``(word >> 4 n) & 15`` of the uint16 words
    over each 64 weights' 32 bytes (BlockLayout.nibble_words), and Q5_0's fifth bit from bit
    ``e`` of its block's ``qh``: each lane is the code, less code_min, that the layout's own
    ``code`` gives the weight it names."""
    layout = LAYOUTS[name]
    raw = random_blocks(layout, ROWS, COLS, seed=3)
    parts = layout.split(raw)
    placeholders = {c.name: te.placeholder(parts[c.name].shape, c.dtype, name=c.name) for c in layout.components}
    codes = te.compute((ROWS, COLS), lambda j, col: layout.code_byte(placeholders, j, col // layout.block,
                                                                     col % layout.block), name="codes")
    lib = tvm.compile(te.create_prim_func([*placeholders.values(), codes]), targets.resolve("llvm").target)
    result = tvm.runtime.empty((ROWS, COLS), "uint8", tvm.cpu())
    lib(*[tvm.runtime.tensor(parts[c.name], tvm.cpu()) for c in layout.components], result)
    expected = result.numpy().reshape(ROWS, -1, 64)
    words = parts["qs"].reshape(ROWS, -1, 32).copy().view("<u2")
    nibbles = layout.nibble_words()
    assert sorted(w for weights in nibbles for w in weights) == list(range(64))
    fifth = np.zeros((ROWS, COLS // 64, 64), np.uint16)
    if layout.fifth_bits:
        bits = parts[layout.fifth_bits].astype(np.uint32).reshape(ROWS, -1, 1)  # a word per block of 32
        fifth = ((bits >> np.arange(32, dtype=np.uint32)) & 1).reshape(ROWS, -1, 64).astype(np.uint16) * 16
    for n, weights in enumerate(nibbles):
        assert np.array_equal(((words >> (4 * n)) & 15) | fifth[..., weights], expected[..., weights])
