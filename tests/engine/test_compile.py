"""torch.compile: a model compiled after the engine hooked it gives the reference's numbers;
one compiled (and run) before is refused with a clear error; compiled statistics agree.

The default run uses the aot_eager backend (Dynamo and AOTAutograd, which decide whether the
hooks run and what the autograd edges are, without Inductor's code generation, which takes
10-20 s here); the slow run (pytest --runslow) repeats it with the default Inductor backend."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga


def cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")




def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6, 3))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile(backend):
    torch._dynamo.reset()
    x, y = torch.randn(7, 2, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    eager = small_model()
    ref = ga.reference_statistics(eager, x, y, cross_entropy)

    # (a) the engine first, then torch.compile: the hooks run eagerly (a graph break at each
    # hooked layer) and every statistic is the reference's, over several steps
    model = copy.deepcopy(eager)
    engine = ga.PerSampleGradients(model)
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        stats = engine.backward(cross_entropy(compiled(x), y))
        torch.testing.assert_close(stats.norms, ref["norms"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.cosines, ref["cosines"], rtol=1e-3, atol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref["mean_grad"][n], rtol=1e-4, atol=1e-6)

    # (b) compiling the statistics: GASW's weights from a compiled function agree with eager
    gasw, compiled_gasw = ga.GASW(2.0), torch.compile(ga.GASW(2.0), backend=backend)
    w_eager = engine.backward(cross_entropy(compiled(x), y), weights=gasw, write_grad=False).weights
    w_compiled = engine.backward(cross_entropy(compiled(x), y), weights=compiled_gasw, write_grad=False).weights
    torch.testing.assert_close(w_compiled, w_eager)
    engine.remove()

    # (c) compiled and run before the engine existed (and before any compiled code with the
    # hooks): Dynamo does not guard on hooks, so the compiled code skips hooks added later and
    # nothing is recorded; the engine refuses instead of returning wrong numbers
    torch._dynamo.reset()
    late = copy.deepcopy(eager)
    compiled_late = torch.compile(late, backend=backend)
    compiled_late(x)
    engine = ga.PerSampleGradients(late)
    try:
        with pytest.raises(ga.UnsupportedModuleError, match=r"torch\.compile.*create the engine before"):
            engine.backward(cross_entropy(compiled_late(x), y))
    finally:
        torch._dynamo.reset()
