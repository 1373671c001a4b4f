"""Mixed precision (autocast, half models) and devices: the engine against a float32 reference.

Under autocast or in a bfloat16/float16 model the layers' inputs and output gradients carry
that precision's rounding, so no method can match float32 exactly; the engine must match it
to that precision (norms, cosines, second moments) and be as close as autograd's own gradient
in the same precision (p.grad). Tests marked `cuda` run only where a GPU is present.
"""

import pytest
import torch

import gradalign as ga
from tests.support.engine_models import ARCHITECTURES
from gradalign.engine.representations import Dense, Factored, IndexedRows
from tests.support.layer_models import LAYER_ARCHITECTURES

ALL = {**ARCHITECTURES, **LAYER_ARCHITECTURES}
# every rule at least once, to keep this file fast: Linear on features (Gram route) and on
# tokens, Conv, ConvTranspose, GroupNorm, LayerNorm, Embedding, eval BatchNorm, the fallback, a
# shared layer; then Conv3d, LoRA and the seed MLP too
FEW = ["conv2d_groupnorm", "conv_transpose1d", "sequence", "shared_bn_fallback"]
SOME = FEW + ["conv3d", "lora", "seed_mlp"]
CPU_AND_CUDA = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# mode -> (autocast dtype or None, model dtype)
MODES = {"bf16-autocast": (torch.bfloat16, torch.float32), "fp16-autocast": (torch.float16, torch.float32),
         "half": (None, torch.float16), "bf16-model": (None, torch.bfloat16)}


@pytest.fixture(autouse=True)
def no_tf32():
    """cuDNN convolutions default to TF32 (10-bit mantissa) on recent GPUs, which would blur the
    float32 reference itself: these comparisons need true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rel(actual, expected) -> float:
    """Relative L2 error of tensors or lists of tensors, taken together."""
    a = torch.cat([t.double().flatten() for t in actual]) if isinstance(actual, list) else actual.double()
    e = torch.cat([t.double().flatten() for t in expected]) if isinstance(expected, list) else expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def low_precision_run(mode, arch, B, device):
    """(engine stats, engine p.grad, {weighted?: autograd p.grad in the same precision}, float32
    reference, the trainable parameters)."""
    autocast_dtype, model_dtype = MODES[mode]
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL[arch]()
    gen = torch.Generator().manual_seed(0)
    x, y = make_batch(B, gen)
    w = torch.rand(B, generator=gen) * 2
    model, x, y, w = model.to(device), x.to(device), y.to(device), w.to(device)
    ref = ga.reference_statistics(model, x, y, loss_fn, weights=w)  # float32
    model = model.to(model_dtype)
    x = x.to(model_dtype) if x.is_floating_point() else x

    def losses():
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            return loss_fn(model(x), y)

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    autograd = {}
    for weighted in (False, True):  # autograd's mean and weighted gradients in this precision
        (losses() * (w if weighted else 1)).mean().backward()
        autograd[weighted] = {n: p.grad for n, p in params.items()}
        model.zero_grad(set_to_none=True)
    engine = ga.PerSampleGradients(model, verify=True)  # verify's tolerance follows the precision
    stats = engine.backward(losses(), weights=w)
    engine.remove()
    return stats, {n: p.grad for n, p in params.items()}, autograd, ref, params


def check_low_precision(mode, arch, B, device):
    stats, grads, autograd, ref, params = low_precision_run(mode, arch, B, device)
    eps = torch.finfo(MODES[mode][0] or MODES[mode][1]).eps  # bf16: 2^-7, fp16: 2^-10
    names = list(ref["mean_grad"])
    assert stats.norms.dtype == torch.float32 and stats.norms.device.type == device
    assert all(grads[n].dtype == params[n].dtype and grads[n].device.type == device for n in names)
    assert rel(stats.norms, ref["norms"]) < 2 * eps
    assert (stats.cosines - ref["cosines"]).abs().max() < 8 * eps
    assert rel([stats.grad_sq_sum[n] for n in names], [ref["grad_sq_sum"][n] for n in names]) < 2 * eps
    # p.grad and the mean gradient: as close to float32 as autograd's own in this precision
    for ours, weighted in ((grads, True), (stats.mean_grad, False)):
        expected = [ref["weighted_grad" if weighted else "mean_grad"][n] for n in names]
        assert rel([ours[n] for n in names], expected) < rel([autograd[weighted][n] for n in names], expected) + eps


@pytest.mark.parametrize("B", [1, 7, 64])
@pytest.mark.parametrize("arch", FEW)
@pytest.mark.parametrize("mode", ["bf16-autocast", "half"])
def test_low_precision_matches_float32_reference(mode, arch, B):
    check_low_precision(mode, arch, B, "cpu")


@pytest.mark.parametrize("arch", SOME)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_low_precision(mode, arch):
    check_low_precision(mode, arch, 7, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("arch", sorted(ALL))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_low_precision_on_cuda(mode, arch):
    check_low_precision(mode, arch, 7, "cuda")


def test_float16_factors_do_not_overflow():
    # |a|^2 |d|^2 = (64 * 300^2)^2 is far above float16's 65504: summed in float32 it is exact
    A, D = torch.full((3, 1, 1, 64), 300.0), torch.full((3, 1, 1, 2), 1.0)
    for grads, full in [(Factored(A.half(), D.half(), torch.Size([2, 64])), Factored(A, D, torch.Size([2, 64]))),
                        (Dense(A[:, 0, 0].half()), Dense(A[:, 0, 0])),
                        (IndexedRows(torch.zeros(3, 2, dtype=torch.long), torch.full((3, 2, 8), 3000.0).half(), 4),
                         IndexedRows(torch.zeros(3, 2, dtype=torch.long), torch.full((3, 2, 8), 3000.0), 4))]:
        assert torch.isfinite(grads.sq_norms()).all() and torch.isfinite(grads.sq_sum()).all()
        torch.testing.assert_close(grads.sq_norms(), full.sq_norms())
        torch.testing.assert_close(grads.sq_sum(), full.sq_sum())


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_statistics_read_inside_autocast_stay_float32(device):
    # a float32 forward, then the backward and every read inside an autocast region: the
    # engine's products must not be autocast to bfloat16
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL["conv2d_groupnorm"]()
    x, y = make_batch(9, torch.Generator().manual_seed(0))
    model, x, y = model.to(device), x.to(device), y.to(device)
    ref = ga.reference_statistics(model, x, y, loss_fn)
    engine = ga.PerSampleGradients(model)
    losses = loss_fn(model(x), y)
    with torch.autocast(device, dtype=torch.bfloat16):
        stats = engine.backward(losses, weights=ga.GASW(2.0))
        norms, cosines, sq = stats.norms, stats.cosines, stats.grad_sq_sum
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, ref["norms"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cosines, ref["cosines"], rtol=1e-4, atol=1e-5)
    for n, expected in ref["grad_sq_sum"].items():
        torch.testing.assert_close(sq[n], expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("arch", sorted(ALL))
def test_statistics_path_runs_on_the_meta_device(arch):
    # meta tensors have no data: any host read (.item(), bool(tensor), torch.unique) raises, and so
    # does any operation mixing in a tensor created on the CPU
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL[arch]()
    x, y = make_batch(5, torch.Generator().manual_seed(0))
    model, x, y = model.to("meta"), x.to("meta"), y.to("meta")
    engine = ga.PerSampleGradients(model)
    gasw = ga.GASW(2.0, leave_one_out=True)
    stats = engine.backward(loss_fn(model(x), y), weights=gasw)
    reference = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    outputs = [stats.norms, stats.cosines, stats.dots(reference), gasw._fallbacks,
               *stats.grad_sq_sum.values(), *(p.grad for p in model.parameters() if p.requires_grad)]
    assert all(t.device.type == "meta" for t in outputs)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", sorted(ALL))
def test_no_host_sync_on_cuda(arch):
    # CUDA's sync debug mode raises on any operation that waits for the GPU
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL[arch]()
    x, y = make_batch(7, torch.Generator().manual_seed(0))
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    ref = ga.reference_statistics(model, x, y, loss_fn)
    engine = ga.PerSampleGradients(model)
    gasw = ga.GASW(2.0)
    losses = loss_fn(model(x), y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = engine.backward(losses, weights=gasw)
        norms, cosines, sq = stats.norms, stats.cosines, stats.grad_sq_sum
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(norms, ref["norms"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cosines, ref["cosines"], rtol=1e-3, atol=1e-5)
    assert all(t.is_cuda for t in sq.values()) and gasw.fallbacks == 0


def test_grad_scaler_scales_norms_and_p_grad_but_not_cosines():
    # float16 with a GradScaler: the engine gets scaler.scale(losses); unscale_ restores p.grad
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL["conv2d_groupnorm"]()
    x, y = make_batch(7, torch.Generator().manual_seed(0))
    engine = ga.PerSampleGradients(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    results = []
    for scale in (False, True):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            losses = loss_fn(model(x), y)
        stats = engine.backward(scaler.scale(losses) if scale else losses, weights=ga.GASW(2.0))
        if scale:
            scaler.unscale_(optimizer)
        results.append((stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (scaled, scaled_grads) = results
    torch.testing.assert_close(scaled.norms, 1024 * plain.norms, rtol=1e-3, atol=0)
    torch.testing.assert_close(scaled.cosines, plain.cosines, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(scaled.weights, plain.weights, rtol=1e-3, atol=1e-5)
    for n, g in plain_grads.items():
        torch.testing.assert_close(scaled_grads[n], g, rtol=1e-3, atol=1e-6)
