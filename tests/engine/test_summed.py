"""Tied parameters: contributions of different kinds summed, every statistic against the
materialised per-sample gradients (cross terms included)."""
import pytest
import torch

from gradalign.engine.representations import Dense, Factored, IndexedRows, RowBlocks
from gradalign.engine.representations.summed import Summed, combine, materialise

B, V, D = 5, 11, 4
SHAPE = torch.Size([V, D])


def rows(T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, V, (B, T), generator=g)
    index[:, 1] = index[:, 0]  # repeated tokens within a sample
    return IndexedRows(index, torch.randn(B, T, D, generator=g), V)


def factored(T=3, seed=1, groups=1):
    g = torch.Generator().manual_seed(seed)
    return Factored(torch.randn(B, groups, T, D, generator=g), torch.randn(B, groups, T, V // groups, generator=g),
                    torch.Size([V // groups * groups, D]))


def dense(seed=2):
    return Dense(torch.randn(B, V, D, generator=torch.Generator().manual_seed(seed)))


def row_blocks(seed=3):
    g = torch.Generator().manual_seed(seed)
    return RowBlocks([Dense(torch.randn(B, 5, D, generator=g)), Dense(torch.randn(B, 6, D, generator=g))], [5, 6], SHAPE)


def check(grads, expected):
    """Every statistic of `grads` against per-sample gradients `expected` (B, V, D)."""
    flat = expected.reshape(B, -1)
    S = expected.sum(0)
    R = torch.randn(expected.shape[1:])
    w = torch.rand(B)
    torch.testing.assert_close(grads.sq_norms(), flat.square().sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads.dots(R), flat @ R.reshape(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads.dots_with_sum(lambda: S), flat @ S.reshape(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads.sum_sq_norm(lambda: S), S.square().sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads.weighted_sum(w), torch.tensordot(w, expected, dims=1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads.weighted_sum(None), S, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads.sq_sum(), expected.square().sum(0), rtol=1e-5, atol=1e-4)


PAIRS = {
    "rows+factored": (rows, factored),
    "rows+dense": (rows, dense),
    "factored+dense": (factored, dense),
    "factored+grouped_factored": (factored, lambda: factored(groups=V, T=2)),
    "row_blocks+rows": (row_blocks, rows),
    "row_blocks+factored": (row_blocks, factored),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_two_kinds_sum_exactly(pair):
    a, b = (make() for make in PAIRS[pair])
    grads = combine(a, b)
    assert isinstance(grads, Summed) and len(grads.parts) == 2
    check(grads, materialise(a) + materialise(b))
    check(combine(b, a), materialise(a) + materialise(b))


def test_same_kinds_merge_and_three_kinds_pair_up():
    parts = [rows(seed=0), factored(seed=1), rows(T=2, seed=4), dense(seed=2), factored(T=1, seed=5)]
    grads = parts[0]
    for p in parts[1:]:
        grads = combine(grads, p)
    assert isinstance(grads, Summed) and len(grads.parts) == 3  # one IndexedRows, one Factored, one Dense
    check(grads, sum(materialise(p) for p in parts))
    check(grads.dense(), sum(materialise(p) for p in parts))


def test_factored_cross_term_does_not_materialise(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("materialised")
    monkeypatch.setattr("gradalign.engine.representations.summed.materialise", refuse)
    a, b = rows(), factored()
    grads = combine(a, b)
    grads.sq_norms(), grads.sq_sum(), grads.dots_with_sum(lambda: torch.randn(V, D))


@pytest.mark.parametrize("T", [3, 40])  # 40 > 4 dim: (sample, row) sums first instead of the T x T match
def test_indexed_rows_norms_on_both_routes(T):
    grads = rows(T=T)
    expected = materialise(grads)
    torch.testing.assert_close(grads.sq_norms(), expected.reshape(B, -1).square().sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads.sq_sum(), expected.square().sum(0), rtol=1e-5, atol=1e-4)


def test_tied_parameter_used_by_one_of_its_modules_only():
    """An LM fed embeddings directly: the tied matrix is seen through the output layer alone."""
    import torch.nn.functional as F
    from torch import nn

    import gradalign as ga

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, x):  # (B, T, D) embeddings, not ids
            return self.out(torch.tanh(x)).mean(1)

    torch.manual_seed(0)
    x, y = torch.randn(4, 3, D), torch.randint(0, V, (4,))
    errors = ga.compare_with_reference(LM(), x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"))
    assert max(errors.values()) < 1e-5, errors
