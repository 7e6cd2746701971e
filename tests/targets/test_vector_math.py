"""The CPU target's vectorisable tanh, tanh-GELU, sigmoid and SiLU
(targets.cpu_kernels.vector_math_legalizations), against float64 numpy: transformers'
gelu_pytorch_tanh formula, np.tanh, and 1 / (1 + np.exp(-x))."""

import math

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from relaxlm.targets.cpu_kernels import vector_math_legalizations

X = np.concatenate([np.linspace(-20, 20, 4001), np.linspace(-1e-3, 1e-3, 101), [0.0, 5e-8, -3.0e-5]]).astype("float32")


def _run(op):
    @R.function
    def main(x: R.Tensor((X.size,), "float32")):
        return op(x)

    mod = relax.transform.LegalizeOps(vector_math_legalizations())(tvm.IRModule({"main": main}))
    # No libm tanh, exp or sigmoid left: the loop can vectorise.
    script = mod.script()
    for relax_op in ("R.nn.gelu_tanh", "R.tanh", "R.nn.silu", "R.sigmoid"):
        script = script.replace(relax_op, "")
    assert not any(word in script for word in ("tanh", "T.exp", "sigmoid")), script
    executable = tvm.compile(mod, target="llvm")
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(X)).numpy()


@pytest.mark.parametrize("name", ["tanh", "gelu_tanh", "sigmoid", "silu"])
def test_vector_math_matches_float64(name):
    x = X.astype(np.float64)
    if name == "tanh":
        ours, expected = _run(R.tanh), np.tanh(x)
    elif name in ("sigmoid", "silu"):
        ours = _run(R.sigmoid if name == "sigmoid" else R.nn.silu)
        expected = 1 / (1 + np.exp(-x)) * (x if name == "silu" else 1)
    else:
        ours = _run(R.nn.gelu_tanh)
        expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    # Float32 rounding of results near 1 (tanh, sigmoid) or of x (GELU, SiLU): 2e-7 of the larger
    # of 1 and |x|.
    assert np.all(np.abs(ours - expected) <= 2.5e-7 * np.maximum(1, np.abs(x)))
    if name in ("sigmoid", "silu"):
        # Also relative where the result is tiny (x far below 0): measured 9.6e-7, about 8 float32
        # steps, from rounding 1 + e^-x before the division.
        nonzero = expected != 0
        assert np.all(np.abs(ours - expected)[nonzero] <= 1.2e-6 * np.abs(expected[nonzero]))
