"""The llvm target's schedule rules and replacement kernels. Reference: the same kernel built
unscheduled (or TVM's own, for the attention kernels)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te, tirx

from relaxlm.passes import get_scheme
from relaxlm.targets import resolve
from relaxlm.targets.cpu_schedules import (DecodeAttention, GroupMatmul, Injective, NTMatmul, PagedPrefillAttention,
                                            RaggedPrefillAttention, SlidingDecodeAttention,
                                           SplitQKV)


@pytest.fixture(scope="module")
def target():
    return resolve("llvm").target


def nt_matmul(rows, out_features: int, in_features: int, residual: bool = False) -> tirx.PrimFunc:
    """``[1, rows, in] x [out, in]^T`` as FuseTransposeMatmul leaves it, optionally ``+ residual``."""
    x = te.placeholder((1, rows, in_features), name="x")
    w = te.placeholder((out_features, in_features), name="w")
    k = te.reduce_axis((0, in_features), name="k")
    y = te.compute((1, rows, out_features), lambda b, i, j: te.sum(x[b, i, k] * w[j, k], axis=k), name="NT_matmul")
    if not residual:
        return te.create_prim_func([x, w, y])
    r = te.placeholder((1, rows, out_features), name="r")
    out = te.compute(y.shape, lambda b, i, j: y[b, i, j] + r[b, i, j], name="T_add")
    return te.create_prim_func([x, w, r, out])


def run(func: tirx.PrimFunc, target, args: list[np.ndarray], out_shape) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
    return out.numpy()


def replacement_by(rule, func: tirx.PrimFunc, target, kernel: str) -> tirx.PrimFunc:
    """The hand-written kernel (its one block named ``kernel``) that ``rule`` puts in place of
    ``func``, checked to take the replaced kernel's parameters in their order."""
    sch = rule.apply(func, target, False)
    assert sch is not None
    replacement = sch.mod["main"]
    assert [(tuple(p.shape), str(p.dtype)) for p in replacement.params] == [
        (tuple(p.shape), str(p.dtype)) for p in func.params]
    assert f'T.sblock("{kernel}")' in replacement.script() and "T.parallel" in replacement.script()
    return replacement


def test_decode_gemv_is_parallel_and_vectorised(target):
    sch = NTMatmul().apply(nt_matmul(1, 96, 64), target, False)
    assert sch is not None
    script = sch.mod["main"].script()
    assert "T.parallel" in script and "T.vectorized" in script


@pytest.mark.parametrize("rows, residual", [(1, False), (1, True), (5, True)])
def test_scheduled_matches_unscheduled(target, rows, residual):
    rng = np.random.default_rng(0)
    seq_len = tirx.Var("seq_len", "int64")
    func = nt_matmul(seq_len if rows > 1 else 1, 48, 80, residual)
    sch = NTMatmul().apply(func, target, False)
    assert sch is not None
    args = [rng.standard_normal((1, rows, 80), dtype="float32"), rng.standard_normal((48, 80), dtype="float32")]
    if residual:
        args.append(rng.standard_normal((1, rows, 48), dtype="float32"))
    expected = run(func, target, args, (1, rows, 48))
    np.testing.assert_allclose(run(sch.mod["main"], target, args, (1, rows, 48)), expected, rtol=1e-5, atol=1e-5)


def test_other_kernels_are_left_alone(target):
    x = te.placeholder((4, 64), name="x")
    k = te.reduce_axis((0, 64), name="k")
    row_sum = te.compute((4,), lambda i: te.sum(x[i, k] * x[i, k], axis=k), name="sum_sq")
    w = te.placeholder((64, 32), name="w")  # [in, out]: not the NT layout
    k2 = te.reduce_axis((0, 64), name="k")
    nn = te.compute((4, 32), lambda i, j: te.sum(x[i, k2] * w[k2, j], axis=k2), name="NN_matmul")
    for func in (te.create_prim_func([x, row_sum]), te.create_prim_func([x, w, nn])):
        assert NTMatmul().apply(func, target, False) is None


def dequantize_nt_matmul(rows, out_features: int, in_features: int, residual: bool = True, bits: int = 4,
                         group: int = 32) -> tirx.PrimFunc:
    """The kernel FuseTIR makes of a group scheme's ``dequantize`` and the NT matmul that reads it,
    plus a residual add: ``[1, rows, in] x deq(packed [out, in / per_word], scales [out, in / group])^T + r``."""
    per_word, zero = 32 // bits, (1 << (bits - 1)) - 1
    x = te.placeholder((1, rows, in_features), name="x")
    packed = te.placeholder((out_features, in_features // per_word), "uint32", name="packed")
    scale = te.placeholder((out_features, in_features // group), "float16", name="scale")
    r = te.placeholder((1, rows, out_features), name="r")
    w = te.compute((out_features, in_features), lambda i, j: (
        ((packed[i, j // per_word] >> (j % per_word * bits).astype("uint32"))
         & tirx.const((1 << bits) - 1, "uint32")).astype("int32")
        .astype("float32") - float(zero)) * scale[i, j // group].astype("float32"), name="dequantize")
    k = te.reduce_axis((0, in_features), name="k")
    y = te.compute((1, rows, out_features), lambda b, i, j: te.sum(x[b, i, k] * w[j, k], axis=k), name="NT_matmul")
    if not residual:
        return te.create_prim_func([packed, scale, x, y])
    out = te.compute(y.shape, lambda b, i, j: y[b, i, j] + r[b, i, j], name="T_add")
    return te.create_prim_func([packed, scale, x, r, out])


def quantized_args(rng, rows: int, out_features: int, in_features: int, residual: bool = True, bits: int = 4,
                   group: int = 32):
    packed, scale = get_scheme(f"q{bits}f32_1").quantize(
        rng.standard_normal((out_features, in_features), dtype="float32"), group_size=group)
    args = [packed, scale, rng.standard_normal((1, rows, in_features), dtype="float32")]
    return args + [rng.standard_normal((1, rows, out_features), dtype="float32")] * residual


@pytest.mark.parametrize("rows", [1, 5])
def test_fused_dequantize_matmul_matches_unscheduled(target, rows):
    """Decode (1 row) unpacks in registers: no dequantized buffer at all; prefill (symbolic rows)
    dequantizes a block of weight rows per parallel task. Both compute what the plain kernel does."""
    rng = np.random.default_rng(0)
    func = dequantize_nt_matmul(1 if rows == 1 else tirx.Var("seq_len", "int64"), 48, 96)
    sch = NTMatmul().apply(func, target, False)
    assert sch is not None
    script = sch.mod["main"].script()
    assert "T.parallel" in script and "T.vectorized" in script
    assert ("dequantize" in script) == (rows > 1)
    args = quantized_args(rng, rows, 48, 96)
    expected = run(func, target, args, (1, rows, 48))
    np.testing.assert_allclose(run(sch.mod["main"], target, args, (1, rows, 48)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("residual, group, k", [(False, 32, 128), (True, 32, 128), (True, 16, 128),
                                                (True, 32, 6144)])
def test_group_matmul_replaces_the_4_bit_kernels(target, rows, residual, group, k):
    """4-bit projections (groups of 32, or 16) become ``group_gemv_cpu`` (one row: decode) or
    ``group_gemm_cpu`` (symbolic rows: prefill; 7 rows = a register tile of 6 and a leftover row;
    k = 6144 in three passes), with the replaced kernel's parameters in their order, and compute
    what the plain kernel does."""
    rng = np.random.default_rng(1)
    func = dequantize_nt_matmul(1 if rows == 1 else tirx.Var("seq_len", "int64"), 64, k, residual, group=group)
    replacement = replacement_by(GroupMatmul(), func, target, "gemv" if rows == 1 else "gemm")
    assert "dequantize" not in replacement.script()
    args = quantized_args(rng, rows, 64, k, residual, group=group)
    expected = run(func, target, args, (1, rows, 64))
    # Float32 sums of k terms in another order: at k = 6144 the outputs grow with sqrt(k), and the
    # error is taken relative to their scale (as the block kernels' test does).
    atol = 1e-5 if k == 128 else 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(run(replacement, target, args, (1, rows, 64)), expected, rtol=1e-5, atol=atol)


def test_group_matmul_leaves_other_matmuls_to_nt_matmul(target):
    """8-bit codes, unquantized weights, one row with ``k`` not a multiple of 64."""
    for func in (dequantize_nt_matmul(1, 48, 128, bits=8), dequantize_nt_matmul(tirx.Var("n", "int64"), 48, 128, bits=8),
                 nt_matmul(1, 48, 128), dequantize_nt_matmul(1, 48, 96)):
        assert GroupMatmul().apply(func, target, False) is None
        assert NTMatmul().apply(func, target, False) is not None


def paged_kv(rng, lengths: list[int], h_kv: int = 3, d: int = 64, page_size: int = 16) -> list[np.ndarray]:
    """Pages of random keys/values in shuffled page order, with TVM's page table for ``lengths``."""
    counts = [-(-n // page_size) for n in lengths]
    pages = rng.standard_normal((sum(counts) + 2, 2, h_kv, page_size, d), dtype="float32")
    page_values = rng.permutation(sum(counts) + 2)[: sum(counts)].astype("int32")
    page_indptr = np.concatenate([[0], np.cumsum(counts)]).astype("int32")
    last_page_len = np.array([n - (c - 1) * page_size if c else 0 for n, c in zip(lengths, counts)], "int32")
    return [pages, page_indptr, page_values, last_page_len]


def attention_results(funcs, target, arrays: list[np.ndarray], rows: int, *scalars) -> list[tuple[np.ndarray, ...]]:
    """(output, lse) of each attention kernel in ``funcs`` (TVM's signature, 9 query heads of 64)."""
    results = []
    for func in funcs:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        out, lse = (tvm.runtime.tensor(np.zeros(shape, "float32")) for shape in ((rows, 9, 64), (rows, 9)))
        lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out, lse, *scalars)
        results.append((out.numpy(), lse.numpy()))
    return results


def assert_same_attention(results):
    (out_tvm, lse_tvm), (out, lse) = results
    np.testing.assert_allclose(out, out_tvm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, lse_tvm, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("lengths", [[1], [16], [136], [17, 40, 5], [0, 20], [1000, 3], [515]])
def test_decode_attention_matches_tvms_kernel(target, lengths):
    """Reference: TVM's own CPU decode kernel over the same pages (GQA: 9 query, 3 kv heads)."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    tvms = _attention_decode_cpu(3, 9, 64, "float32", False, {})
    sch = DecodeAttention().apply(tvms, target, False)
    assert sch is not None and "T.parallel" in sch.mod["main"].script()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((len(lengths), 9, 64), dtype="float32")
    zeros = np.zeros(len(lengths), "int32")
    arrays = [q, *paged_kv(rng, lengths), zeros, zeros]
    # rotary_mode 0, rope scale and theta (unused), sm_scale
    assert_same_attention(attention_results([tvms, sch.mod["main"]], target, arrays, len(lengths), 0, 1.0, 1e4, 0.125))


@pytest.mark.parametrize("q_lengths, kv_lengths, causal", [
    ([128], [128], 1), ([3, 7], [3, 7], 1), ([4, 0, 6], [10, 0, 6], 1), ([4], [9], 0)])
def test_ragged_prefill_attention_matches_tvms_kernel(target, q_lengths, kv_lengths, causal):
    """Reference: TVM's own CPU kernel for a prefill chunk's attention over its own keys, which
    scores masked keys as exp2(-9000) = 0 where ours skips them."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    tvms = _attention_prefill_ragged_cpu(3, 9, 64, 64, "float32", {})
    sch = RaggedPrefillAttention().apply(tvms, target, False)
    assert sch is not None and "T.parallel" in sch.mod["main"].script()
    rng = np.random.default_rng(0)
    rows, keys = sum(q_lengths), sum(kv_lengths)
    arrays = [rng.standard_normal((rows, 9, 64), dtype="float32"), np.cumsum([0, *q_lengths]).astype("int32"),
              rng.standard_normal((keys, 3, 64), dtype="float32"), rng.standard_normal((keys, 3, 64), dtype="float32"),
              np.cumsum([0, *kv_lengths]).astype("int32"), np.zeros(rows, "int32"), np.zeros(len(q_lengths), "int32")]
    results = attention_results([tvms, sch.mod["main"]], target, arrays, rows, causal, 0, 1.0, 1e4, 0.125)
    assert_same_attention(results)


@pytest.mark.parametrize("q_lengths, kv_lengths, causal", [
    ([128], [300], 0), ([3, 7], [16, 0], 0), ([4, 2, 6], [10, 33, 6], 1), ([4], [9], 1), ([20, 17], [40, 33], 1)])
def test_paged_prefill_attention_matches_tvms_kernel(target, q_lengths, kv_lengths, causal):
    """Reference: TVM's own CPU kernel for a prefill chunk's queries over the cached keys (GQA),
    where every causal query sees a key (a query that sees none gets the mean of the masked values
    from TVM's kernel: the runtime never asks for it)."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu

    tvms = _attention_prefill_cpu(3, 9, 64, "float32", False, {})
    sch = PagedPrefillAttention().apply(tvms, target, False)
    assert sch is not None and "T.parallel" in sch.mod["main"].script()
    rng = np.random.default_rng(1)
    rows = sum(q_lengths)
    arrays = [rng.standard_normal((rows, 9, 64), dtype="float32"), np.cumsum([0, *q_lengths]).astype("int32"),
              *paged_kv(rng, kv_lengths), np.zeros(len(q_lengths), "int32"), np.zeros(rows, "int32")]
    results = attention_results([tvms, sch.mod["main"]], target, arrays, rows, causal, 0, 1.0, 1e4, 0.125)
    assert_same_attention(results)


@pytest.mark.parametrize("tokens", [1, 40])
def test_split_qkv_matches_tvms_kernel(target, tokens):
    """Reference: TVM's KV-cache kernel that splits the fused qkv, with RoPE off (``apply_rope``
    0), as relaxlm creates its cache; ours is a plain copy, parallel over many tokens."""
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    tvms = llama_rope_with_position_map(1e4, 1.0, 64, 9, 3, "float32", {})
    sch = SplitQKV().apply(tvms, target, False)
    assert sch is not None
    qkv = np.random.default_rng(3).standard_normal((tokens, 15, 64), dtype="float32")
    results = []
    for func in (tvms, sch.mod["main"]):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        outs = [tvm.runtime.tensor(np.zeros((tokens, heads, 64), "float32")) for heads in (9, 3, 3)]
        lib["main"](tvm.runtime.tensor(qkv), tvm.runtime.tensor(np.arange(tokens, dtype="int32")), *outs, 0)
        results.append([o.numpy() for o in outs])
    for ours, theirs in zip(results[1], results[0]):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(results[1][0], qkv[:, :9])

def test_attention_replacements_leave_other_kernels_alone(target):
    for rule in (DecodeAttention(), RaggedPrefillAttention(), PagedPrefillAttention()):
        assert rule.apply(nt_matmul(1, 96, 64), target, False) is None


def split_silu_multiply(rows, width: int) -> tirx.PrimFunc:
    """``silu(gate) * up`` of the halves of ``[1, rows, 2 * width]``, as FuseOps leaves it: three blocks."""
    x = te.placeholder((1, rows, 2 * width), name="x")
    gate = te.compute((1, rows, width), lambda b, i, j: x[b, i, j], name="T_split")
    up = te.compute((1, rows, width), lambda b, i, j: x[b, i, j + width], name="T_split_1")
    silu = te.compute(gate.shape, lambda b, i, j: gate[b, i, j] * tirx.sigmoid(gate[b, i, j]), name="silu")
    out = te.compute(gate.shape, lambda b, i, j: silu[b, i, j] * up[b, i, j], name="T_multiply")
    return te.create_prim_func([x, out])


@pytest.mark.parametrize("rows", [1, 40])
def test_injective_kernels_become_one_loop_nest(target, rows):
    """Intermediate buffers are inlined away; a big kernel (symbolic rows, prefill) runs in parallel."""
    func = split_silu_multiply(1 if rows == 1 else tirx.Var("seq_len", "int64"), 768)
    sch = Injective().apply(func, target, False)
    assert sch is not None
    script = sch.mod["main"].script()
    blocks = [line for line in script.splitlines() if line.lstrip().startswith("with T.sblock(")]
    assert len(blocks) == 1 and "sblock_alloc_buffer" not in script, script
    assert ("T.parallel" in script) == (rows > 1)
    x = np.random.default_rng(2).standard_normal((1, rows, 2 * 768), dtype="float32")
    np.testing.assert_allclose(run(sch.mod["main"], target, [x], (1, rows, 768)),
                               run(func, target, [x], (1, rows, 768)), rtol=1e-6, atol=1e-6)
    assert Injective().apply(nt_matmul(1, 48, 64), target, False) is None


def sliding_attention_reference(q, q_indptr, pages, page_indptr, page_values, length_info, causal, window, sm_scale):
    """numpy: each query of a chunk over its sequence's cached keys, as TVM's mask says (the last
    ``window - 1 - i`` keys for query i when causal, all otherwise), key p at page position p below
    the sinks and p - sinks + window start above."""
    rows, h_q, d = q.shape
    h_kv, page_size = pages.shape[2], pages.shape[3]
    out, lse = np.zeros((rows, h_q, d), "float32"), np.full((rows, h_q), -5e4, "float32")
    for b in range(len(q_indptr) - 1):
        seq_pages = page_values[page_indptr[b]:page_indptr[b + 1]]
        last, start, sinks = length_info[:, b]
        kv_len = (len(seq_pages) - 1) * page_size + last - start + sinks if len(seq_pages) else 0
        for i, row in enumerate(range(q_indptr[b], q_indptr[b + 1])):
            first = max(kv_len - max(window - i - 1, 0), 0) if causal else 0
            where = [p if p < sinks else p - sinks + start for p in range(first, kv_len)]
            if not where:
                continue
            for h in range(h_q):
                keys = np.stack([pages[seq_pages[w // page_size], 0, h // (h_q // h_kv), w % page_size] for w in where])
                values = np.stack([pages[seq_pages[w // page_size], 1, h // (h_q // h_kv), w % page_size] for w in where])
                scores = keys.astype(np.float64) @ q[row, h] * sm_scale * np.log2(np.e)
                weights = np.exp2(scores - scores.max())
                out[row, h] = weights @ values / weights.sum()
                lse[row, h] = scores.max() + np.log2(weights.sum())
    return out, lse


@pytest.mark.parametrize("causal", [1, 0])
@pytest.mark.parametrize("q_lengths, kv_pages, length_info", [
    # Cached keys 20 and 7 (last pages of 4 and 7), no sinks: window 8 masks most of the first.
    ([3, 5], [2, 1], [[4, 7], [0, 0], [0, 0]]),
    # A sequence without cached keys beside one of 40.
    ([2, 4], [0, 3], [[0, 8], [0, 0], [0, 0]]),
    # The window starts 5 keys into the pages, after 2 attention-sink keys: two ranges of pages.
    ([6], [2], [[12], [5], [2]]),
    # Two blocks of queries, the second past the window: its rows see no cached key.
    ([20], [3], [[8], [3], [1]]),
])
def test_sliding_window_prefill_attention_matches_numpy(target, q_lengths, kv_pages, length_info, causal):
    """relaxlm's kernel for the cached keys of a model with sliding-window layers (TVM's reads
    uninitialised memory there) against numpy, with TVM's mask and page layout."""
    from relaxlm.targets.cpu_attention import paged_prefill_sliding_window_cpu

    window, rows = 8, sum(q_lengths)
    rng = np.random.default_rng(0)
    pages = rng.standard_normal((sum(kv_pages) + 2, 2, 3, 16, 64), dtype="float32")
    page_values = rng.permutation(sum(kv_pages) + 2)[: sum(kv_pages)].astype("int32")
    arrays = [rng.standard_normal((rows, 9, 64), dtype="float32"), np.cumsum([0, *q_lengths]).astype("int32"),
              pages, np.cumsum([0, *kv_pages]).astype("int32"), page_values, np.array(length_info, "int32"),
              np.zeros(len(q_lengths), "int32"), np.zeros(rows, "int32")]
    kernel = paged_prefill_sliding_window_cpu(3, 9, 64, "float32", window)
    (out, lse), = attention_results([kernel], target, arrays, rows, causal, 0, 1.0, 1e4, 0.125)
    expected_out, expected_lse = sliding_attention_reference(*arrays[:6], causal, window, 0.125)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kv_pages, length_info", [
    ([2, 1], [[4, 7], [0, 0], [0, 0]]),
    ([0, 3], [[0, 8], [0, 0], [0, 0]]),
    # The window starts 5 keys into the pages, after 2 attention-sink keys.
    ([2], [[12], [5], [2]]),
    # Long enough to be split among tasks, the window 20 keys in, after 4 sinks.
    ([70, 2], [[9, 16], [20, 0], [4, 0]]),
])
def test_sliding_window_decode_attention_matches_numpy(target, kv_pages, length_info):
    """relaxlm's decode kernel in place of TVM's for a model with sliding-window layers: one query
    per sequence over every key the window keeps (the sinks, then the window)."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    sch = SlidingDecodeAttention().apply(_attention_decode_cpu(3, 9, 64, "float32", True, {}), target, False)
    assert sch is not None
    rows = len(kv_pages)
    rng = np.random.default_rng(2)
    pages = rng.standard_normal((sum(kv_pages) + 2, 2, 3, 16, 64), dtype="float32")
    page_values = rng.permutation(sum(kv_pages) + 2)[: sum(kv_pages)].astype("int32")
    q = rng.standard_normal((rows, 9, 64), dtype="float32")
    page_indptr = np.cumsum([0, *kv_pages]).astype("int32")
    arrays = [q, pages, page_indptr, page_values, np.array(length_info, "int32"), np.zeros(rows, "int32"),
              np.zeros(rows, "int32")]
    (out, lse), = attention_results([sch.mod["main"]], target, arrays, rows, 0, 1.0, 1e4, 0.125)
    expected_out, expected_lse = sliding_attention_reference(q, np.arange(rows + 1, dtype="int32"), pages, page_indptr,
                                                             page_values, np.array(length_info), 0, 8, 0.125)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-6, atol=1e-5)

