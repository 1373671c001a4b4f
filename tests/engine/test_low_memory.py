"""engine.backward(..., memory="low"): norms and cosines reduced inside the backward (a power of two
per group of calls), p.grad from a second backward of sum_i w_i l_i. Against a float64 torch.func
reference (also at losses x 1e20 and x 1e-30, where |g_i|^2 does not fit float32) and against the
default mode's p.grad, on every kind of representation."""
import copy

import pytest
import torch

import gradalign as ga
from gradalign.engine import scale as scale_module
from gradalign.engine.reference import statistics_of
from tests.support.engine_models import ARCHITECTURES
from tests.support.layer_models import LAYER_ARCHITECTURES

ALL = {**ARCHITECTURES, **LAYER_ARCHITECTURES}
# MLP (Gram and factor routes), residual, conv with GroupNorm, attention (nn.TransformerEncoder, a ViT
# with cls token and positions: raw parameters), a tied Embedding + Linear LM, an LSTM LM, the torch.func
# fallback, shared positions, LoRA at initialisation (all-zero output gradients), conv transposes
SOME = ["seed_mlp", "residual_mlp", "conv2d_groupnorm", "encoder_post_norm", "vit_cls_pos", "tied_lm", "lstm_lm",
        "shared_bn_fallback", "shared_positions", "lora_init", "raw_parameters", "conv_transpose2d", "bag_gru"]


def clip(stats):
    return (stats.norms.median() / stats.norms).clamp(max=1.0)


def reference(model, x, y, loss_fn, loop: bool) -> dict:
    """{name: (B, ...) per-sample gradients}: torch.func, or one backward per sample of one forward
    (torch.func cannot vmap nn.LSTM/GRU)."""
    if not loop:
        return ga.reference_gradients(model, x, y, loss_fn)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    losses = loss_fn(model(x), y)
    rows = [torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
            for i in range(len(losses))]
    return {n: torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows])
            for j, (n, p) in enumerate(params.items())}


def run(model, x, y, loss_fn, weighting, memory, scale=1.0):
    model = copy.deepcopy(model)
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(loss_fn(model(x), y) * scale, weights=weighting, memory=memory)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    engine.remove()
    return stats, grads


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-30])
@pytest.mark.parametrize("arch", SOME)
def test_low_memory_against_a_float64_reference(arch, scale):
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL[arch]()
    x, y = make_batch(12, torch.Generator().manual_seed(0))
    x64 = x.double() if x.is_floating_point() else x
    per_sample = reference(copy.deepcopy(model).double(), x64, y, lambda out, t: loss_fn(out, t) * scale,
                           loop=arch in ("lstm_lm", "bag_gru"))
    for weighting in (ga.GASW(2.0), clip):
        stats, grads = run(model, x, y, loss_fn, weighting, "low", scale)
        default, default_grads = run(model, x, y, loss_fn, weighting, "default", scale)
        ref = statistics_of(per_sample, stats.weights.double())
        torch.testing.assert_close(stats.norms.double(), ref["norms"], rtol=1e-4, atol=0)
        torch.testing.assert_close(stats.weights, default.weights, rtol=1e-4, atol=1e-5)
        if weighting is not clip:
            torch.testing.assert_close(stats.cosines.double(), ref["cosines"], rtol=0, atol=1e-4)
        assert set(grads) == set(default_grads)
        for name, g in grads.items():
            expected = ref["weighted_grad"][name]
            atol = 1e-5 * expected.abs().max().item()
            torch.testing.assert_close(g.double(), expected, rtol=1e-4, atol=atol)
            torch.testing.assert_close(g.double(), default_grads[name].double(), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("arch", ["seed_mlp", "encoder_post_norm", "tied_lm", "lstm_lm"])
def test_every_group_scaled_matches_the_default_mode(arch, monkeypatch):
    """On the CPU a group whose gradients are safely in range is not divided: force the division."""
    monkeypatch.setattr(scale_module, "SAFE_EXPONENT", -1000)
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL[arch]()
    x, y = make_batch(9, torch.Generator().manual_seed(2))
    weights = torch.rand(9, generator=torch.Generator().manual_seed(3)) * 2
    for weighting in (None, weights, ga.GASW(2.0)):
        stats, grads = run(model, x, y, loss_fn, weighting, "low")
        default, default_grads = run(model, x, y, loss_fn, weighting, "default")
        torch.testing.assert_close(stats.norms, default.norms, rtol=1e-4, atol=0)
        torch.testing.assert_close(stats.weights, default.weights, rtol=1e-4, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, default_grads[name], rtol=1e-4, atol=1e-6 * g.abs().max().item())


def test_what_low_memory_does_not_keep_is_refused_with_the_fix():
    model, make_batch, loss_fn = ALL["seed_mlp"]()
    x, y = make_batch(6, torch.Generator().manual_seed(0))
    stats, _ = run(model, x, y, loss_fn, None, "low")
    with pytest.raises(ga.StatisticNotKeptError, match="memory='default'"):
        stats.grad_sq_sum  # noqa: B018 - GAGA's sums need the per-sample gradients
    with pytest.raises(ga.StatisticNotKeptError, match="needs"):
        stats.cosines  # noqa: B018 - not asked for: no `needs`
    assert getattr(stats, "mean_grad", None) is None  # (an AttributeError too)
    with pytest.raises(ValueError, match="'default' or 'low'"):
        run(model, x, y, loss_fn, None, "small")
    engine = ga.PerSampleGradients(copy.deepcopy(model), verify=True)
    with pytest.raises(ga.GradAlignError, match="verify"):
        engine.backward(loss_fn(engine.model(x), y), memory="low")


def test_write_grad_false_and_an_empty_batch():
    model, make_batch, loss_fn = ALL["seed_mlp"]()
    x, y = make_batch(6, torch.Generator().manual_seed(0))
    model = copy.deepcopy(model)
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(loss_fn(model(x), y), memory="low", write_grad=False)
    assert all(p.grad is None for p in model.parameters()) and stats.norms.shape == (6,)
    stats = engine.backward(loss_fn(model(x[:0]), y[:0]), memory="low")
    assert stats.norms.shape == (0,) and all(p.grad is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("how", ["function", "wrapper"])
def test_activation_checkpointing(how):
    """Blocks that recompute their forward in the backward: the hooks see the recomputed region's
    gradients in the first backward, and the second backward recomputes it again."""
    import torch.nn.functional as F
    from gradalign.engine.reference import reference_statistics
    from tests.support.compare import close
    from tests.support.sharded_models import batch, build
    x, y = batch(n=7)

    def classify(out, t):
        return F.cross_entropy(out, t, reduction="none")
    for weighting in (clip, ga.GASW(2.0)):
        model = build(checkpoint=how)
        engine = ga.PerSampleGradients(model)
        stats = engine.backward(classify(model(x), y), weights=weighting, memory="low")
        ref = reference_statistics(build(), x, y, classify, weights=stats.weights)
        close(stats.norms, ref["norms"])
        for name, p in model.named_parameters():
            close(p.grad, ref["weighted_grad"][name.replace("_checkpoint_wrapped_module.", "")])
        engine.remove()


def test_gaga_says_to_use_the_default_mode():
    model, make_batch, loss_fn = ALL["seed_mlp"]()
    x, y = make_batch(6, torch.Generator().manual_seed(0))
    stats, _ = run(model, x, y, loss_fn, None, "low")
    with pytest.raises(ga.StatisticNotKeptError, match="grad_sum is not kept.*memory='default'"):
        ga.GSNRAccumulator(tau=0.5).update(stats)
