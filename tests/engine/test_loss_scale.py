"""Loss scale: float32 losses multiplied by 1e20 or 1e-30 give norms correct to float32, the
same cosines and the same GASW weights, although |g_i|^2 (1e40, 1e-60) does not fit float32.

The engine divides the output gradients of one backward by one power of two near their largest
magnitude (engine/scale.py) before any square is formed; these tests compare against a float64
reference of the same scaled losses, and against the unscaled engine."""
import copy

import pytest
import torch

import gradalign as ga
from tests.support.dispatch import Counts
from tests.support.engine_models import ARCHITECTURES
from gradalign.engine import scale as scale_module
from gradalign.engine.reference import statistics_of
from gradalign.engine.representations.dense import row_sq_norms
from tests.support.layer_models import LAYER_ARCHITECTURES

ALL = {**ARCHITECTURES, **LAYER_ARCHITECTURES}
# every kind of representation: Linear on features (Gram and factor routes) and on tokens,
# Embedding, LayerNorm, Conv with GroupNorm, the torch.func fallback, attention, raw parameters,
# a tied Embedding + Linear matrix (Summed, its S from autograd), position embeddings shared by all samples,
# layers over many positions whose cosine terms come from per-sample gradients formed once,
# LoRA adapters at initialisation (B = 0: layers whose output gradients are all zero, which must
# not take part in choosing the scale)
SOME = ["seed_mlp", "residual_mlp", "sequence", "conv2d_groupnorm", "shared_bn_fallback", "encoder_post_norm",
        "vit_cls_pos", "raw_parameters", "tied_lm", "shared_positions", "many_positions", "lora_init"]


def scaled(loss_fn, scale):
    return lambda out, y: loss_fn(out, y) * scale


def engine_run(model, x, y, loss_fn, weighting):
    model = copy.deepcopy(model)
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(loss_fn(model(x), y), weights=weighting)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    engine.remove()
    return stats, grads


@pytest.mark.parametrize("scale", [1e20, 1e-30])
@pytest.mark.parametrize("arch", SOME)
def test_scaled_losses_against_a_float64_reference(arch, scale):
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL[arch]()
    x, y = make_batch(16, torch.Generator().manual_seed(0))
    x64 = x.double() if x.is_floating_point() else x
    per_sample = ga.reference_gradients(copy.deepcopy(model).double(), x64, y, scaled(loss_fn, scale))
    plain_stats, _ = engine_run(model, x, y, loss_fn, ga.GASW(2.0))
    stats, grads = engine_run(model, x, y, scaled(loss_fn, scale), ga.GASW(2.0))
    ref = statistics_of(per_sample, stats.weights.double())

    assert torch.isfinite(stats.norms).all() and (stats.norms > 0).all()
    torch.testing.assert_close(stats.norms.double(), ref["norms"], rtol=1e-4, atol=0)
    torch.testing.assert_close(stats.cosines, plain_stats.cosines, rtol=0, atol=1e-5)
    torch.testing.assert_close(stats.cosines.double(), ref["cosines"], rtol=0, atol=1e-4)
    torch.testing.assert_close(stats.mean_grad_norm.double(), ref["norms"].new_tensor(
        torch.cat([g.reshape(-1) for g in ref["mean_grad"].values()]).norm().item()), rtol=1e-4, atol=0)
    torch.testing.assert_close(stats.weights, plain_stats.weights, rtol=1e-4, atol=1e-5)
    assert ga.GASW(2.0)(stats).sum().item() == pytest.approx(16.0)
    # p.grad is the weighted mean of the scaled gradients: scaled exactly as they are
    for name, g in grads.items():
        expected = ref["weighted_grad"][name]
        torch.testing.assert_close(g.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("arch", ["seed_mlp", "lora_init"])
@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_gasw_does_not_fall_back_and_leave_one_out_agrees(scale, arch):
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL[arch]()
    x, y = make_batch(32, torch.Generator().manual_seed(1))
    for leave_one_out in (False, True):
        plain_gasw, gasw = ga.GASW(2.0, leave_one_out=leave_one_out), ga.GASW(2.0, leave_one_out=leave_one_out)
        plain, _ = engine_run(model, x, y, loss_fn, plain_gasw)
        stats, _ = engine_run(model, x, y, scaled(loss_fn, scale), gasw)
        assert gasw.fallbacks == 0 and plain_gasw.fallbacks == 0
        torch.testing.assert_close(stats.weights, plain.weights, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ALL))
def test_the_scaled_path_matches_torch_func_on_every_architecture(arch, monkeypatch):
    # on the CPU the multiply pass is skipped when it is not needed: force it everywhere
    monkeypatch.setattr(scale_module, "SAFE_EXPONENT", -1000)
    from tests.support.compare import compare_all
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL[arch]()
    compare_all(model, make_batch, loss_fn, B=7)


def test_the_scale_is_a_power_of_two_above_the_largest_output_gradient(monkeypatch):
    monkeypatch.setattr(scale_module, "SAFE_EXPONENT", -1000)
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL["seed_mlp"]()
    x, y = make_batch(8, torch.Generator().manual_seed(0))
    stats, _ = engine_run(model, x, y, scaled(loss_fn, 3e25), None)
    scale = float(stats.scale)
    assert scale == 2.0 ** round(torch.log2(torch.tensor(scale)).item())
    assert 1e24 < scale < 1e27


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_all_zero_output_gradients_take_no_part_in_the_scale(scale):
    """LoRA adapters at initialisation (B = 0): A's output gradients are all zero. frexp(0) gives
    exponent 0, which must not win over the others' (about +-66 and -100 here): the scale follows
    the largest non-zero output gradient, so it is within a few powers of two of the loss scale."""
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL["lora_init"]()
    x, y = make_batch(8, torch.Generator().manual_seed(0))
    stats, _ = engine_run(model, x, y, scaled(loss_fn, scale), None)
    assert 2.0 ** -20 < float(stats.scale) / scale < 2.0 ** 20
    assert (stats.norms > 0).all() and torch.isfinite(stats.norms).all()


def test_every_output_gradient_zero_is_left_unscaled():
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL["seed_mlp"]()
    x, y = make_batch(4, torch.Generator().manual_seed(0))
    stats, grads = engine_run(model, x, y, scaled(loss_fn, 0.0), ga.GASW(2.0))
    assert float(stats.scale) == 1.0
    assert (stats.norms == 0).all() and (stats.cosines == 0).all() and (stats.weights == 1).all()
    assert all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("by_rows", [False, True])
def test_the_norm_check_says_safe_only_where_the_exact_extremes_do(by_rows):
    """engine/scale.py's CPU fast path (one norm per gradient, or per row of a (B, n) one) may leave a
    decision to the exact min/max pass, but never calls safe what the min/max exponent puts outside
    2^-32 .. 2^32; the row norms it keeps are row_sq_norms' own."""
    torch.manual_seed(0)
    verdicts = {}
    for k in range(-80, 81, 2):
        grads = [torch.randn(16, 33) * 2.0 ** k, torch.zeros(5), torch.randn(3, 7, 2) * 2.0 ** (k // 2)]
        exponent = max(int(torch.frexp(g.abs().amax())[1]) for g in grads if g.any())
        rows = {} if by_rows else None
        verdicts[k] = scale_module.clearly_safe(grads, rows)
        if verdicts[k]:
            assert -scale_module.SAFE_EXPONENT <= exponent <= scale_module.SAFE_EXPONENT, k
        if by_rows:
            assert list(rows) == [id(grads[0])] and rows[id(grads[0])][0] is grads[0]
            assert torch.equal(rows[id(grads[0])][1], row_sq_norms(grads[0]))
    assert all(verdicts[k] for k in range(-20, 21, 2))  # the common case takes the fast path
    assert not any(verdicts[k] for k in (-80, -70, 70, 80))
    assert not scale_module.clearly_safe([torch.zeros(4)])
    assert not scale_module.clearly_safe([torch.tensor([1.0, float("nan")])])


def norm_reads(func, args) -> int:
    """The tensors a norm operator reads: a vector norm one, a foreach norm each of its list."""
    if func is torch.ops.aten.linalg_vector_norm.default:
        return 1
    return len(args[0]) if func is torch.ops.aten._foreach_norm.Scalar else 0


def test_the_norms_take_the_output_gradients_row_norms_from_the_loss_scale_check():
    """A one-position layer's output gradient d is read once by a norm, for the check and its |d_i|^2 both:
    a norm read of each layer's input and of each output gradient, L layers, 2L reads (3L before)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    engine = ga.PerSampleGradients(model)
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    with Counts(norm_reads) as reads:
        stats = engine.backward(losses, weights=lambda s: (1.0 / s.norms).clamp(max=1.0), release=True)
    assert reads.count == 2 * 2
    ref = ga.reference_statistics(model, x, y, lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none"))
    torch.testing.assert_close(stats.norms, ref["norms"])
