"""Where the batch is: the sequence-first declaration (batch_first=False) on every kind of route,
exact at B = T too; per-module overrides through the registry; and the refusals of the
undeclared layout, each naming the declaration as its fix."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import gradalign as ga
from tests.support.batches import cross_entropy
from tests.support.compare import compare_all, loop_reference
from tests.support.recurrent_models import (SequenceFirstLM, sequence_first_token_losses, sequence_first_tokens,
                                            sequences)


class SequenceFirstNet(nn.Module):
    """(T, B, 4) -> (B, 3): a Linear and a LayerNorm on (T, B, D), a raw position parameter (T, 1, D)
    (watched), an Embedding of (T, 1) position ids (shared by all samples), a head on the pooled (B, D)."""

    def __init__(self, T=5, D=6):
        super().__init__()
        self.inp, self.norm = nn.Linear(4, D), nn.LayerNorm(D)
        self.pos = nn.Parameter(torch.randn(T, 1, D) * 0.1)
        self.where = nn.Embedding(T, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        T = x.shape[0]
        h = self.norm(torch.tanh(self.inp(x)) + self.pos[:T]) + self.where(torch.arange(T).unsqueeze(1))
        return self.head(h.mean(0))


@pytest.mark.parametrize("B", [1, 5, 7])
def test_sequence_first_declaration_on_every_route(B):
    torch.manual_seed(0)
    compare_all(SequenceFirstNet(), sequences(batch_first=False), cross_entropy, B, seed=B,
                reference=loop_reference(0), batch_first=False)


class BatchFirstBlock(nn.Module):
    """A block that works batch-first inside a sequence-first model: (T, B, D) -> (T, B, D)."""

    def __init__(self, D=6):
        super().__init__()
        self.lin, self.gain = nn.Linear(D, D), nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        return (self.lin(x.transpose(0, 1)) * self.gain).transpose(0, 1)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(4, 6), BatchFirstBlock(), nn.Linear(6, 3)

    def forward(self, x):  # (T, B, 4)
        return self.head(self.block(self.inp(x)).mean(0))


def test_a_batch_first_block_in_a_sequence_first_model_is_declared_through_the_registry():
    """At T == B only a declaration tells the block's dims apart: with the model declared sequence-first,
    the block declared batch-first (registry.register_layout) is exact; without it verify refuses."""
    torch.manual_seed(1)
    registry = ga.default_registry()
    registry.register_layout(BatchFirstBlock, lambda m: 0)
    for B in (1, 5, 7):
        compare_all(Mixed(), sequences(batch_first=False), cross_entropy, B, seed=B, reference=loop_reference(0),
                    batch_first=False, registry=registry)
    model = Mixed()
    x, y = sequences(batch_first=False)(5, torch.Generator().manual_seed(0))
    engine = ga.PerSampleGradients(model, batch_first=False, verify=True)
    with pytest.raises(ga.UnsupportedModuleError, match="register_layout"):
        engine.backward(cross_entropy(model(x), y))


def test_t_equal_to_b_undeclared_is_refused_with_the_layout_declaration():
    """T == B and no declaration: verify=True names batch_first=False and register_layout (not only
    register_shared); a raw parameter meeting the ambiguous batch names the declaration too."""
    torch.manual_seed(2)
    model = SequenceFirstLM()
    ids, y = sequence_first_tokens(T=5)(5, torch.Generator().manual_seed(0))
    engine = ga.PerSampleGradients(model, verify=True)
    with pytest.raises(ga.UnsupportedModuleError, match=r"batch_first=False.*register_layout"):
        engine.backward(sequence_first_token_losses(model(ids), y))
    model = SequenceFirstNet()
    ga.PerSampleGradients(model)
    with pytest.raises(ga.UnsupportedModuleError, match=r"pos meets the batch.*batch_first=False"):
        model(torch.randn(5, 5, 4))


class UserSequenceBias(nn.Module):
    """Appends a learned step to a (T, B, D) sequence, as Opacus's SequenceBias does."""

    def __init__(self, D=4):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return torch.cat([x, self.bias.repeat(1, x.shape[1], 1)])


class WithBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.append, self.head = nn.Linear(4, 4), UserSequenceBias(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.append(self.lin(x)).mean(0))


def test_an_undeclared_sequence_first_bias_is_refused_with_the_declaration_and_exact_with_it():
    torch.manual_seed(3)
    model = WithBias()
    ga.PerSampleGradients(model)
    with pytest.raises(ga.UnsupportedModuleError, match=r"read the batch, 5, from its dim 0; declare "
                                                        r"ga.PerSampleGradients\(model, batch_first=False\)"):
        model(torch.randn(5, 7, 4))
    for B in (1, 7):
        compare_all(WithBias(), sequences(batch_first=False), cross_entropy, B, reference=loop_reference(0),
                    batch_first=False)


def test_opacus_sequence_bias_and_attention_bias_kv():
    """Opacus's SequenceBias carries its own layout (the registry knows it by name): exact as the
    model itself and inside DPMultiheadAttention(add_bias_kv=True) either way round."""
    layers = pytest.importorskip("opacus.layers")
    torch.manual_seed(4)
    for B in (1, 7):
        compare_all(layers.SequenceBias(4), sequences(False), lambda out, y: out.square().sum((0, 2)), B,
                    reference=loop_reference(0))
    for batch_first in (True, False):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = layers.DPMultiheadAttention(4, 2, add_bias_kv=True, batch_first=batch_first)
                self.head = nn.Linear(4, 3)

            def forward(self, x):
                return self.head(self.attn(x, x, x)[0].mean(1 if batch_first else 0))
        for B in (1, 7):
            compare_all(Net(), sequences(batch_first), cross_entropy, B, reference=loop_reference(0),
                        batch_first=batch_first)


def test_dp_lstm_on_a_packed_sequence_is_refused_with_torchs_lstm_as_the_fix():
    layers = pytest.importorskip("opacus.layers")
    model = layers.DPLSTM(3, 4)
    ga.PerSampleGradients(model, batch_first=False)
    packed = pack_sequence([torch.randn(5, 3), torch.randn(2, 3), torch.randn(3, 3)], enforce_sorted=False)
    with pytest.raises(ga.UnsupportedModuleError, match=r"part of the batch.*nn.LSTM"):
        model(packed)


def test_a_model_called_on_a_packed_sequence_reads_the_batch_from_it():
    """The batch of a model whose first argument is a PackedSequence is its number of sequences."""
    torch.manual_seed(5)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 5), nn.Linear(5, 3)

        def forward(self, packed):
            return self.head(self.rnn(packed)[1][0])

    def make(B, gen):
        lengths = [5, 2, 4, 1, 3, 5, 2][:B]
        x = pack_sequence([torch.randn(n, 4, generator=gen) for n in lengths], enforce_sorted=False)
        return x, torch.randint(0, 3, (B,), generator=gen)
    for B in (1, 7):
        compare_all(Packed(), make, cross_entropy, B, reference=loop_reference(0))


def test_a_parameter_of_a_bypassed_forward_names_its_module():
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b.forward(self.a(x))  # b's hooks never run

    model = Bypass()
    engine = ga.PerSampleGradients(model)
    with pytest.raises(ga.UnsupportedModuleError, match=r"b \(Linear\), which owns it.*m.forward\(x\) instead of m\(x\)"):
        engine.backward(F.cross_entropy(model(torch.randn(4, 3)), torch.zeros(4, dtype=torch.long), reduction="none"))


def test_an_undeclared_sequence_first_dp_lstm_is_refused_with_the_declaration():
    """Opacus's DPLSTM (batch_first=False) in a model whose layout is undeclared: B is read as T, and
    the cells' (B, in) inputs look like values shared by all samples; the message names the declaration."""
    layers = pytest.importorskip("opacus.layers")
    model = layers.DPLSTM(3, 4)
    ga.PerSampleGradients(model)
    with pytest.raises(ga.UnsupportedModuleError, match=r"read the batch, 5, from its dim 0; declare "
                                                        r"ga.PerSampleGradients\(model, batch_first=False\)"):
        model(torch.randn(5, 7, 3))
