#!/usr/bin/env bash
# Build llama.cpp's own C++ tools (llama-bench, llama-server, llama-perplexity), the speed anchor of
# `relaxlm bench --compare llama.cpp`, from the sources inside the pinned llama-cpp-python sdist.
# About 5 minutes on 2 cores. Usage: .ci/build_llama_cpp.sh [DIR]   (default: ./build/llama.cpp)
# Static binaries land in DIR/bin; put it on PATH or pass `relaxlm bench --llama-bench DIR/bin/llama-bench`.
set -euo pipefail

version=0.3.36
dest="$(mkdir -p "${1:-build/llama.cpp}" && cd "${1:-build/llama.cpp}" && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"

# The instruction sets of this CPU, named (not GGML_NATIVE): a native build crashed in llama.cpp's
# AMX code on a VM that reports AMX, so AMX stays off.
has() { grep -qw "$1" /proc/cpuinfo; }
flags=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
for feature in avx avx2 fma f16c avx512f avx512_vnni avx512_vbmi avx512_bf16; do
    option="GGML_$(echo "$feature" | tr '[:lower:]' '[:upper:]' | sed 's/^AVX512F$/AVX512/')"
    if has "$feature"; then flags+=("-D$option=ON"); else flags+=("-D$option=OFF"); fi
done

cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF "${flags[@]}" > "$work/cmake.log" 2>&1 || { cat "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" -j "$(nproc)" --target llama-bench llama-server llama-perplexity > "$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; exit 1; }
mkdir -p "$dest/bin"
cp "$work/build/bin/"* "$dest/bin/"
echo "$dest/bin/llama-bench"
