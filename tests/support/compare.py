"""The comparisons every engine test makes: the engine's statistics and p.grad against a
reference (torch.func by default, or a per-sample autograd loop), within float32 tolerance."""
import torch

from gradalign.engine import PerSampleGradients
from gradalign.engine.reference import reference_statistics, statistics_of


def close(actual, expected, rtol=2e-4):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6 + rtol * scale)


def run_engine(model, x, y, loss_fn, weights=None, forward_seed=None, **options):
    for p in model.parameters():
        p.grad = None
    engine = PerSampleGradients(model, **options)
    if forward_seed is not None:  # dropout: the same masks as the reference's forward
        torch.manual_seed(forward_seed)
    stats = engine.backward(loss_fn(model(x), y), weights=weights)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    engine.remove()
    return stats, grads


def compare_all(model, make_batch, loss_fn, B, seed=0, reference=reference_statistics, forward_seed=None, **options):
    """Every statistic and p.grad (plain and weighted) of the engine (created with `options`, e.g.
    batch_first=False) against `reference` on one batch of B samples."""
    gen = torch.Generator().manual_seed(seed)
    x, y = make_batch(B, gen)
    weights = torch.rand(B, generator=gen) * 2
    ref = reference(model, x, y, loss_fn, weights=weights)
    stats, grads = run_engine(model, x, y, loss_fn, forward_seed=forward_seed, **options)
    close(stats.norms, ref["norms"])
    close(stats.cosines, ref["cosines"], rtol=1e-3)
    for name, expected in ref["grad_sq_sum"].items():
        close(stats.grad_sq_sum[name], expected)
        close(grads[name], ref["mean_grad"][name])
        close(stats.mean_grad[name], ref["mean_grad"][name])
    close(stats.weights, torch.ones(B))
    reread, weighted = run_engine(model, x, y, loss_fn, weights=weights, forward_seed=forward_seed, **options)
    for name, expected in ref["weighted_grad"].items():
        close(weighted[name], expected)
    # The same statistics read the other way round, |gbar|^2 and <g_i, gbar> before any norm:
    # where a layer takes the Gram route, |g_i|^2 then comes from the Gram diagonal.
    mean_sq_norm = sum(m.square().sum() for m in ref["mean_grad"].values())
    close(reread.mean_grad_sq_norm, mean_sq_norm)
    close(reread.dots_with_mean, ref["cosines"] * ref["norms"] * mean_sq_norm.sqrt())
    close(reread.norms, ref["norms"])
    close(reread.cosines, ref["cosines"], rtol=1e-3)
    return stats



def loop_reference(forward_seed):
    """Per-sample gradients by one backward per sample of ONE forward of the batch (seeded, so
    that dropout draws the masks the engine's forward drew)."""
    def reference(model, x, y, loss_fn, weights=None):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        torch.manual_seed(forward_seed)
        losses = loss_fn(model(x), y)
        rows = [torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
                for i in range(len(losses))]
        grads = {n: torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows])
                 for j, (n, p) in enumerate(params.items())}
        return statistics_of(grads, weights)
    return reference
