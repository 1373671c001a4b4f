"""The engine against the torch.func reference, on several architectures and batch sizes."""
import pytest
import torch

from tests.support.engine_models import (ARCHITECTURES, PERSAMPLE_ROUTES, classification_batch, cross_entropy, random_architecture,
                           recording_engine, route_labels, seed_mlp)
from gradalign.engine import PerSampleGradients, reference_gradients, reference_statistics
from tests.support.compare import close, compare_all, run_engine


@pytest.mark.parametrize("B", [1, 7, 64])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_statistic_matches_torch_func(arch, B):
    torch.manual_seed(0)
    model, make_batch, loss_fn = ARCHITECTURES[arch]()
    compare_all(model, make_batch, loss_fn, B)


@pytest.mark.parametrize("seed", range(12))
def test_random_architectures(seed):
    model, make_batch, loss_fn = random_architecture(seed)
    compare_all(model, make_batch, loss_fn, B=5, seed=seed)


def test_mean_gradient_matches_plain_backward_and_accumulates():
    torch.manual_seed(1)
    model, make_batch, loss_fn = ARCHITECTURES["conv1d"]()
    x, y = make_batch(9, torch.Generator().manual_seed(1))
    loss_fn(model(x), y).mean().backward()
    loss_fn(model(x), y).mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    engine = PerSampleGradients(model)
    engine.backward(loss_fn(model(x), y))
    engine.backward(loss_fn(model(x), y))  # adds, as autograd does
    for n, p in model.named_parameters():
        close(p.grad, expected[n])


def test_dots_with_arbitrary_reference_and_gram_route():
    torch.manual_seed(2)
    model, make_batch, loss_fn = ARCHITECTURES["seed_mlp"]()
    x, y = make_batch(16, torch.Generator().manual_seed(2))  # B (n_in + n_out) < n_in n_out: Gram route
    grads = reference_gradients(model, x, y, loss_fn)
    stats, _ = run_engine(model, x, y, loss_fn)
    reference = {n: torch.randn_like(g[0]) for n, g in grads.items()}
    expected = sum((g.flatten(1) @ reference[n].flatten()) for n, g in grads.items())
    close(stats.dots(reference), expected)
    mean = {n: g.mean(0) for n, g in grads.items()}
    close(stats.dots_with_mean, sum(g.flatten(1) @ mean[n].flatten() for n, g in grads.items()))


@pytest.mark.parametrize("channels,length", [(1, 64), (16, 5)])
def test_conv_ghost_and_materialised_routes_agree(channels, length):
    # (1, 64): T (n_in + n_out) > n_in n_out -> materialised; (16, 5): ghost route
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv1d(channels, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * (length - 2), 3))
    compare_all(model, classification_batch(channels, length, classes=3), cross_entropy, B=6)


def test_cosine_is_zero_for_a_sample_with_zero_gradient():
    torch.manual_seed(4)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    x[2] = 0.0
    engine = PerSampleGradients(model)
    out = model(x)
    losses = (out * torch.tensor([[1.0, 0.0]])).sum(1) * torch.tensor([1.0, 1.0, 0.0, 1.0])
    stats = engine.backward(losses)
    assert stats.norms[2] == 0 and stats.cosines[2] == 0
    assert torch.isfinite(stats.cosines).all()


def test_evaluation_forwards_are_not_recorded():
    model, make_batch, loss_fn = ARCHITECTURES["seed_mlp"]()
    engine = PerSampleGradients(model)
    x, y = make_batch(8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(torch.randn(3, 40))  # different batch size, must not disturb the next backward
    model(torch.randn(5, 40))  # a forward whose output never reaches the losses
    reference_gradients(model, x[:2], y[:2], loss_fn)  # torch.func calls on the hooked model
    stats = engine.backward(loss_fn(model(x), y))
    assert stats.norms.shape == (8,)


@pytest.mark.parametrize("label", sorted(PERSAMPLE_ROUTES))
def test_architectures_take_the_listed_routes(label):
    """The parameter that engine_models.PERSAMPLE_ROUTES names for a route takes that route, so
    that a change to the cost rules cannot move the tested architectures off a route unnoticed."""
    arch, B, name = PERSAMPLE_ROUTES[label]
    torch.manual_seed(0)
    model, make_batch, loss_fn = ARCHITECTURES[arch]()
    engine, record = recording_engine(model)
    x, y = make_batch(B, torch.Generator().manual_seed(0))
    engine.backward(loss_fn(model(x), y))
    assert label in route_labels(record[name]), route_labels(record[name])


def weights_reading_cosines(stats):
    return 1 + stats.cosines


def weights_reading_dots_first(stats):
    stats.dots_with_mean  # the Gram matrix is formed here, before any norm
    return 1 + stats.cosines


READ_FIRST = {
    "norms": lambda stats: stats.norms,
    "dots_with_mean": lambda stats: stats.dots_with_mean,
    "mean_grad_sq_norm": lambda stats: stats.mean_grad_sq_norm,
    "cosines": lambda stats: stats.cosines,
    "grad_sq_sum": lambda stats: stats.grad_sq_sum,
}


@pytest.mark.parametrize("first", sorted(READ_FIRST) + ["weights reading cosines", "weights reading dots first"])
def test_every_read_order_on_the_gram_route(first):
    """On the seed MLP at B = 16 (its 40x256 and 256x256 layers take the Gram route), every
    statistic matches the torch.func reference whichever is read first, including from inside a
    weights callable (which runs before p.grad is written)."""
    torch.manual_seed(5)
    model, B = seed_mlp(), 16
    x, y = classification_batch(40)(B, torch.Generator().manual_seed(5))
    grads = reference_gradients(model, x, y, cross_entropy)
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    mean = flat.mean(0)
    cosines = torch.nn.functional.cosine_similarity(flat, mean.expand_as(flat), dim=1)
    engine, record = recording_engine(model)
    weights = {"weights reading cosines": weights_reading_cosines,
               "weights reading dots first": weights_reading_dots_first}.get(first)
    stats = engine.backward(cross_entropy(model(x), y), weights=weights)
    assert record["0.weight"][0].uses_gram() and record["2.weight"][0].uses_gram()
    if weights is None:
        READ_FIRST[first](stats)
    close(stats.sq_norms, flat.square().sum(1))
    close(stats.norms, flat.norm(dim=1))
    close(stats.dots_with_mean, flat @ mean)
    close(stats.mean_grad_sq_norm, mean.square().sum())
    close(stats.cosines, cosines, rtol=1e-3)
    expected_w = torch.ones(B) if weights is None else 1 + cosines
    close(stats.weights, expected_w, rtol=1e-3)
    for name, p in model.named_parameters():
        close(stats.grad_sq_sum[name], grads[name].square().sum(0))
        close(stats.mean_grad[name], grads[name].mean(0))
        close(p.grad, torch.tensordot(expected_w, grads[name], dims=1) / B, rtol=1e-3)


def test_materialised_route_in_several_chunks(monkeypatch):
    """The materialised route (the narrow Linear over tokens of shared_embedding_tokens) gives the
    same statistics when it builds the per-sample gradients a few samples at a time, the last
    chunk shorter."""
    from gradalign.engine.representations import Factored
    monkeypatch.setattr("gradalign.engine.representations.factored.CHUNK_ELEMENTS", 50)   # narrow: 24 numbers a sample
    chunks = []
    real = Factored._materialised_chunks

    def counted(self):
        for start, g in real(self):
            chunks.append(g.shape[0])
            yield start, g
    monkeypatch.setattr(Factored, "_materialised_chunks", counted)
    torch.manual_seed(6)
    model, make_batch, loss_fn = ARCHITECTURES["shared_embedding_tokens"]()
    compare_all(model, make_batch, loss_fn, B=7, seed=6)
    assert chunks[:4] == [2, 2, 2, 1]                 # 7 samples in chunks of 2: the last one shorter


def test_embedding_frozen_after_the_engine_was_created():
    """An Embedding frozen after the engine was created contributes nothing (its output needs no
    gradient, so its call is not recorded); the rest matches the reference with it frozen."""
    torch.manual_seed(7)
    model, make_batch, loss_fn = ARCHITECTURES["shared_embedding_tokens"]()
    engine = PerSampleGradients(model)
    model.embed.weight.requires_grad_(False)
    x, y = make_batch(5, torch.Generator().manual_seed(7))
    stats = engine.backward(loss_fn(model(x), y))
    assert "embed.weight" not in stats.grad_sq_sum and model.embed.weight.grad is None
    ref = reference_statistics(model, x, y, loss_fn)
    close(stats.norms, ref["norms"])
    close(stats.cosines, ref["cosines"], rtol=1e-3)


@pytest.mark.parametrize("n_in,n_out", [(3, 5), (5, 3), (4, 4)])
@pytest.mark.parametrize("stored", ["bt", "tb", "mixed"])
def test_weighted_sums_over_positions_in_either_row_order(stored, n_in, n_out):
    """Factored.weighted_sums takes the rows in the order the factors are stored in ((B, T) or
    attention's (T, B)): sum_i w_i sum_t d_it a_it^T, and the bias sum_i w_i sum_t d_it, the same
    whichever layout A and D come in (checked against an einsum)."""
    from gradalign.engine.representations import Factored
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    A, D, w = torch.randn(B, T, n_in, generator=g), torch.randn(B, T, n_out, generator=g), torch.rand(B, generator=g)

    def laid_out(X, tb):  # the same (B, T, n) numbers, stored (T, B, n) when tb
        return X.transpose(0, 1).contiguous().transpose(0, 1) if tb else X
    a = laid_out(A, stored != "bt")
    d = laid_out(D, stored == "tb")
    rep = Factored(a.unsqueeze(1), d.unsqueeze(1), torch.Size((n_out, n_in)))
    for weights in (w, None):
        ww = torch.ones(B) if weights is None else weights
        W, b = rep.weighted_sums(weights, bias=True)
        torch.testing.assert_close(W, torch.einsum("b,bto,bti->oi", ww, D, A))
        torch.testing.assert_close(b, torch.einsum("b,bto->o", ww, D))
