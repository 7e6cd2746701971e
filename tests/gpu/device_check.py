"""CUDA artifacts built on a machine without a GPU, checked and timed on one that has no TVM compiler.

Two steps, two machines:

``prepare`` (here: the full apache-tvm, nvcc, torch) compiles the artifacts for ``cuda:sm_90``
(H100; ``--arch`` for another GPU) and their CPU references, and writes ``manifest.json``: per
artifact the prompt, the CPU reference's greedy tokens and logits (each step's for the tiny
models, the prefill's for SmolLM2)::

    .venv/bin/python tests/gpu/device_check.py prepare .gpu/bundle

- the tiny test models of ``test_cuda.py`` (llama, gemma3, olmo3) at ``q0f32`` (reference: the
  llvm ``q0f32`` artifact of the same weights: the same arithmetic, tokens must be equal) and at
  ``q4f16_1`` (reference: llvm at the same quantization, same stored weights and fp16 compute);
- SmolLM2-135M-Instruct at ``q4f16_1`` (reference: llvm ``q4f16_1``; the llvm ``q0f32`` tokens are
  stored too, for information): a chat prompt, and the 128-token prompt the benchmark uses.

``run`` (on the GPU machine: Python, numpy, and a runtime-only TVM: the ``tvm`` and ``tvm_ffi``
packages without ``lib/libtvm_compiler.so``, imported with ``TVM_USE_RUNTIME_LIB=1``; keep
``tvm_ffi/lib/libtvm_ffi_testing.so``, which tvm_ffi's core links, and have CUDA's
``libcudart.so.13`` on the loader path; relaxlm itself need not be installed) loads each artifact on ``cuda``, compares its greedy tokens with
the manifest, and times SmolLM2: prefill of 128 tokens and 64 greedy decode steps (one warm-up,
then the median of ``--repeats`` runs). Where transformers and a CUDA torch are present it times
transformers too (fp16, eager) with SmolLM2's own weights dequantized from the artifact, i.e. the
same numbers::

    TVM_USE_RUNTIME_LIB=1 PYTHONPATH=.gpu/site python3 tests/gpu/device_check.py run .gpu/bundle

Exit status 1 if a ``q0f32`` artifact's tokens differ from its reference or its logits by more
than 1e-4 (the quantized ones are reported: fp16 summation order may flip a near tie). On one
machine with a GPU and the full TVM, run both steps there (``run`` then uses the installed relaxlm).
Where the bundle must travel in pieces (this session's device calls carried 64 MiB each), split a
weight shard with ``split -b`` and ``cat`` it back: loading checks each shard's SHA-256.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 16
SMOLLM2_TOKENS = 32
BENCH_PROMPT, BENCH_NEW = 128, 64
QUESTION = "What is the capital of France?"


# ---- prepare (the build machine) -------------------------------------------------------------------


def prepare(out: Path, arch: str) -> None:
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "gpu")]
    from support import build_tiny_model
    from family_checks import PROMPT
    from test_cuda import SPECS

    from relaxlm.compiler import compile_model
    from relaxlm.runtime import load

    out.mkdir(parents=True, exist_ok=True)
    work = out.parent / (out.name + "-work")
    entries = []

    def entry(name, artifact, reference, prompt, count, reference_name, **extra):
        model = load(reference)
        tokens, logits = greedy(model, prompt, count)
        entries.append({"name": name, "artifact": str(Path(artifact).relative_to(out)), "prompt": prompt,
                        "tokens": tokens, "reference": reference_name,
                        # Tiny vocabularies: every step's logits; SmolLM2: the prefill's.
                        "logits": (logits if logits.size <= 4096 else logits[:1]).tolist(), **extra})
        print(f"{name}: {reference_name} tokens {tokens}", flush=True)

    for family, spec in SPECS.items():
        tiny = build_tiny_model(spec, work)
        for quantization in ("q0f32", "q4f16_1"):
            cuda = compile_model(tiny.hf_dir, target=f"cuda:{arch}", quantization=quantization,
                                 output=out / f"{family}-{quantization}-cuda")
            reference = tiny.artifact if quantization == "q0f32" else compile_model(
                tiny.hf_dir, target="llvm", quantization=quantization, output=work / f"{family}-{quantization}-llvm")
            entry(f"{family} {quantization}", cuda, reference, PROMPT, NEW_TOKENS, f"llvm {quantization}",
                  exact=quantization == "q0f32")

    smol = compile_model("smollm2-135m", target=f"cuda:{arch}", quantization="q4f16_1",
                         output=out / "smollm2-135m-q4f16_1-cuda")
    cpu32 = load(compile_model("smollm2-135m", target="llvm", quantization="q0f32", output=work / "smol-q0f32"))
    from relaxlm.runtime.generation import prompt_tokens

    chat = prompt_tokens(cpu32, QUESTION, chat=True)
    text = (REPO / "README.md").read_text()
    bench = list(cpu32.tokenizer(text)["input_ids"][:BENCH_PROMPT])
    cpu4 = compile_model("smollm2-135m", target="llvm", quantization="q4f16_1", output=work / "smol-q4f16_1")
    entry("smollm2-135m q4f16_1 chat", smol, cpu4, chat, SMOLLM2_TOKENS, "llvm q4f16_1", exact=False,
          q0f32_tokens=greedy(cpu32, chat, SMOLLM2_TOKENS)[0])
    entry("smollm2-135m q4f16_1 bench prompt", smol, cpu4, bench, BENCH_NEW, "llvm q4f16_1", exact=False,
          bench=True)
    (out / "manifest.json").write_text(json.dumps({"arch": arch, "entries": entries}, indent=1))
    print(f"wrote {out / 'manifest.json'}")


# ---- run (the GPU machine) -------------------------------------------------------------------------


def greedy(model, prompt: list[int], count: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens after ``prompt`` (one prefill, then decode steps; the same steps as
    ``family_checks.greedy_tokens``) and the logits each token was taken from (count, vocab)."""
    tokens, steps = [], []
    with model.new_sequence() as seq:
        logits = seq.prefill(prompt)
        for _ in range(count):
            steps.append(logits)
            tokens.append(int(np.argmax(logits)))
            logits = seq.decode(tokens[-1])
    return tokens, np.stack(steps)


def import_runtime():
    """``relaxlm.runtime``, from this checkout when relaxlm is not installed (the GPU machine)."""
    try:
        import relaxlm.runtime as runtime
        return runtime
    except ImportError:
        pass
    package = types.ModuleType("relaxlm")
    package.__path__ = []
    sys.modules["relaxlm"] = package
    spec = importlib.util.spec_from_file_location("relaxlm.runtime", REPO / "runtime" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "runtime")])
    runtime = importlib.util.module_from_spec(spec)
    sys.modules["relaxlm.runtime"] = runtime
    spec.loader.exec_module(runtime)
    return runtime


def run(bundle: Path, repeats: int, only: str | None) -> int:
    import tvm

    runtime = import_runtime()
    runtime.model._load_device_runtime("cuda")  # a runtime-only TVM loads no device backend itself
    print(f"GPU: {tvm.cuda(0).device_name}, compute {tvm.cuda(0).compute_version}", flush=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    failed = False
    loaded = {}
    for e in manifest["entries"]:
        if only and only not in e["name"]:
            continue
        path = bundle / e["artifact"]
        if not path.is_dir():
            print(f"{e['name']}: SKIPPED, {path} not here")
            continue
        start = time.perf_counter()
        model = loaded.get(path) or runtime.load(path, device="cuda")
        loaded[path] = model
        load_s = time.perf_counter() - start
        tokens, logits = greedy(model, e["prompt"], len(e["tokens"]))
        same = next((i for i, (a, b) in enumerate(zip(tokens, e["tokens"])) if a != b), len(tokens))
        verdict = "MATCH" if tokens == e["tokens"] else f"DIFFER from token {same}"
        # Logits of the same steps (teacher-forced by the GPU's own tokens: compared only up to
        # the first differing token, inclusive).
        expected = np.asarray(e["logits"], dtype=np.float32)[:same + 1]
        errors = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(logits, expected)]
        error = f", max logits rel. error over {len(errors)} steps {max(errors):.1e}"
        print(f"{e['name']}: {verdict} ({len(tokens)} tokens vs {e['reference']}{error}; load {load_s:.1f} s)")
        if tokens != e["tokens"]:
            print(f"  cuda:      {tokens}\n  reference: {e['tokens']}")
            failed |= e["exact"]
        failed |= e["exact"] and max(errors) > 1e-4
        if "q0f32_tokens" in e:
            print(f"  vs llvm q0f32: {'MATCH' if tokens == e['q0f32_tokens'] else 'differ'} "
                  f"({sum(a == b for a, b in zip(tokens, e['q0f32_tokens']))}/{len(tokens)} positions equal)")
        if e.get("bench"):
            bench(model, e["prompt"], repeats, path)
    return 1 if failed else 0


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(model, prompt: list[int], repeats: int, path: Path) -> None:
    """Prefill and decode tokens/s of ``model``, and of transformers with the same weights."""
    def prefill():
        with model.new_sequence() as seq:
            seq.prefill(prompt)

    def decode():  # greedy steps after the prompt; each returns the logits to the host (as generate does)
        with model.new_sequence() as seq:
            logits = seq.prefill(prompt)
            start = time.perf_counter()
            for _ in range(BENCH_NEW):
                logits = seq.decode(int(np.argmax(logits)))
            return time.perf_counter() - start

    rows = [("relaxlm (TVM, q4f16_1)", len(prompt) / timed(prefill, repeats),
             BENCH_NEW / statistics.median([decode() for _ in range(repeats + 1)][1:]))]
    try:
        pre, dec, tokens = transformers_speed(model, path, prompt, repeats)
        rows.append(("transformers (torch fp16 eager, same weights dequantized)", pre, dec))
        ours = greedy(model, prompt, BENCH_NEW)[0]
        same = next((i for i, (a, b) in enumerate(zip(ours, tokens)) if a != b), BENCH_NEW)
        print(f"  transformers' greedy tokens equal relaxlm's for the first {same} of {BENCH_NEW}")
    except Exception as err:  # noqa: BLE001 - the reference is optional; the check above stands
        print(f"  no transformers reference: {type(err).__name__}: {err}")
    print(f"\n  prompt {len(prompt)} tokens, {BENCH_NEW} greedy decode steps, median of {repeats} runs after 1 warm-up")
    print(f"  {'':55s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name, pre, dec in rows:
        print(f"  {name:55s} {pre:14.0f} {dec:13.1f}")


def transformers_model(model, path: Path, device: str = "cuda", dtype: str = "float16"):
    """transformers' model of the artifact's config, with the artifact's weights (dequantized,
    fused projections split back into HF's tensors)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    cfg = model.manifest.model_config
    config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    hf = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).to(device).eval()
    stored = {}
    for file in model.manifest.weights:
        stored.update(load_file(str(path / file)))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    state = {}
    for name, array in stored.items():
        if name.endswith(".q_scale"):
            continue
        if name.endswith(".q_weight"):
            prefix = name[: -len("q_weight")]
            name, array = prefix + "weight", dequantize(array, stored[prefix + "q_scale"])
        if ".qkv_proj." in name:
            parts = zip(("q_proj", "k_proj", "v_proj"), np.split(array, [q, q + kv]))
            state.update({name.replace("qkv_proj", part): piece for part, piece in parts})
        elif ".gate_up_proj." in name:
            parts = zip(("gate_proj", "up_proj"), np.split(array, 2))
            state.update({name.replace("gate_up_proj", part): piece for part, piece in parts})
        else:
            state[name] = array
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(getattr(torch, dtype)) for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m or not config.tie_word_embeddings]:
        raise ImportError(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf


def transformers_speed(model, path: Path, prompt: list[int], repeats: int) -> tuple[float, float, list[int]]:
    """Prefill and decode tokens/s of transformers (fp16, eager, on the GPU) with the same weights,
    and its greedy tokens (the first ``BENCH_NEW``, plus one)."""
    import torch

    hf = transformers_model(model, path)
    ids = torch.tensor([prompt], device="cuda")

    @torch.no_grad()
    def prefill():
        hf(ids, use_cache=True)
        torch.cuda.synchronize()

    @torch.no_grad()
    def decode():
        out = hf(ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        start, cache, tokens = time.perf_counter(), out.past_key_values, [int(token)]
        for _ in range(BENCH_NEW):
            out = hf(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))  # to the host each step, as relaxlm's loop does
        decode.tokens = tokens
        return time.perf_counter() - start

    pre = len(prompt) / timed(prefill, repeats)
    dec = BENCH_NEW / statistics.median([decode() for _ in range(repeats + 1)][1:])
    return pre, dec, decode.tokens


def dequantize(q_weight: np.ndarray, q_scale: np.ndarray, bits: int = 4, group: int = 32) -> np.ndarray:
    """``passes.quantization.GroupQuantization.dequantize`` (copied: passes needs the TVM compiler)."""
    per_word, zero = 32 // bits, (1 << (bits - 1)) - 1
    rows, words = q_weight.shape
    codes = (q_weight[..., None] >> (np.arange(per_word, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
    values = codes.reshape(rows, -1, group).astype(np.float32) - zero
    return (values * q_scale.astype(np.float32)[..., None]).reshape(rows, words * per_word)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="compile the CUDA artifacts and their CPU references (here)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--arch", default="sm_90")
    r = sub.add_parser("run", help="check and time the artifacts (on the GPU machine)")
    r.add_argument("bundle", type=Path)
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--only", help="only the entries whose name contains this")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.bundle.resolve(), args.arch)
        return 0
    return run(args.bundle, args.repeats, args.only)


if __name__ == "__main__":
    sys.exit(main())
