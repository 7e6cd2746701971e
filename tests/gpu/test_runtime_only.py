"""The runtime without the TVM compiler: how artifacts run on a GPU machine they were not built on.

There only ``libtvm_runtime*.so`` travel (``TVM_USE_RUNTIME_LIB=1``) and relaxlm is not installed;
``tests/gpu/device_check.py run`` imports ``relaxlm.runtime`` from the checkout. Checked here on
the CPU, in a subprocess without site-packages' ``.pth`` files (so without the relaxlm install).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tvm

from family_checks import PROMPT, greedy_tokens
from llama_specs import LLAMA_SPECS

SCRIPT = """
import json, sys
import device_check
model = device_check.import_runtime().load(sys.argv[1])
tokens = device_check.greedy(model, json.loads(sys.argv[2]), 4)[0]
import tvm
from relaxlm.runtime import ArtifactError, model as runtime_model
try:  # CUDA's runtime library: loaded where a driver is, a clear error where none is
    runtime_model._load_device_runtime("cuda")
    cuda = tvm.get_global_func("device_api.cuda", allow_missing=True) is not None
except ArtifactError as err:
    cuda = str(err)
print(json.dumps({"tokens": tokens, "cuda": cuda, "relax_imported": "tvm.relax" in sys.modules,
                  "relaxlm": sorted(m for m in sys.modules if m.startswith("relaxlm"))}))
"""


def test_runtime_loads_and_runs_with_the_runtime_only_tvm(tiny_models):
    tiny = tiny_models(LLAMA_SPECS["gqa_tied_fp16"])
    site = Path(tvm.__file__).resolve().parents[1]
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(site)]))
    # -S: no site-packages .pth files, so neither the relaxlm install nor anything but PYTHONPATH.
    out = subprocess.run([sys.executable, "-S", "-c", SCRIPT, str(tiny.artifact), json.dumps(PROMPT)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["relax_imported"]
    assert "relaxlm.compiler" not in result["relaxlm"]
    assert result["tokens"] == greedy_tokens(tiny.model, PROMPT, 4)
    # Without the loader, a runtime-only TVM reported "Device API cuda is not enabled" on a GPU.
    assert result["cuda"] is True or "libtvm_runtime_cuda.so" in result["cuda"]
