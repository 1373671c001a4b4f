"""nn.LSTM, nn.GRU and nn.RNN: every statistic and p.grad (plain and weighted) against a per-sample
autograd loop (packed sequences, dropout and sequence-first layouts are outside torch.func's reach;
the batch-first architectures lstm_lm and bag_gru are also compared with torch.func in
test_engine.py), at B = 1 and 7, and B = T for the sequence-first declaration."""
import pytest
import torch
from torch import nn

import gradalign as ga
from gradalign.engine.representations import Factored
from tests.support.batches import cross_entropy
from tests.support.compare import compare_all, loop_reference
from tests.support.recurrent_models import (RecurrentNet, SequenceFirstLM, sequence_first_token_losses,
                                            sequence_first_tokens, sequences)
from tests.support.routes import recording_engine

# (kind, options, batch_first, packed, initial states given)
CONFIGS = {
    "lstm 2 layers bidirectional packed h0 c0": ("LSTM", dict(num_layers=2, bidirectional=True), True, True, True),
    "lstm proj_size seq-first h0 c0": ("LSTM", dict(proj_size=3), False, False, True),
    "lstm proj bidirectional dropout packed": ("LSTM", dict(proj_size=2, num_layers=2, bidirectional=True,
                                                            dropout=0.5), True, True, True),
    "lstm no bias seq-first packed": ("LSTM", dict(bias=False), False, True, False),
    "gru 3 layers dropout bidirectional seq-first packed h0": ("GRU", dict(num_layers=3, dropout=0.5,
                                                                           bidirectional=True), False, True, True),
    "gru no bias": ("GRU", dict(bias=False), True, False, False),
    "rnn tanh bidirectional packed": ("RNN", dict(num_layers=2, bidirectional=True), True, True, False),
    "rnn relu dropout seq-first h0": ("RNN", dict(num_layers=2, dropout=0.3, nonlinearity="relu"), False, False,
                                      True),
}


def build(config: str):
    kind, options, batch_first, packed, given = CONFIGS[config]
    torch.manual_seed(0)
    return RecurrentNet(getattr(nn, kind)(5, 4, batch_first=batch_first, **options), packed, given), batch_first


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_recurrent_layers_match_a_per_sample_loop(config, B):
    model, batch_first = build(config)
    compare_all(model, sequences(batch_first), cross_entropy, B, seed=B, reference=loop_reference(3), forward_seed=3,
                batch_first=batch_first)


def test_weights_are_factored_over_time_steps_and_the_route_is_the_rule():
    model, _ = build("lstm proj bidirectional dropout packed")
    engine, record = recording_engine(model)
    x, y = sequences(True)(7, torch.Generator().manual_seed(0))
    engine.backward(cross_entropy(model(x), y))
    for name in ("weight_ih_l1", "weight_hh_l0_reverse", "weight_hr_l1_reverse"):
        grads, = record[f"rnn.{name}"]
        assert isinstance(grads, Factored) and grads.A.shape[2] == 5, name  # one position per time step
    assert engine.routes() == {"inp": "rule", "rnn": "rule", "head": "rule", "init": "rule", "cell_init": "rule"}


@pytest.mark.parametrize("B", [1, 5, 7])
def test_sequence_first_model_with_t_equal_to_b(B):
    """batch_first=False: Embedding, LayerNorm and Linear on (T, B, ...) and a Linear on (B, H); exact
    at B = T = 5 too, where only the declaration tells the dims apart."""
    torch.manual_seed(1)
    compare_all(SequenceFirstLM(), sequence_first_tokens(T=5), sequence_first_token_losses, B, seed=B,
                reference=loop_reference(0), batch_first=False)


def test_sequence_first_model_undeclared_is_refused_with_the_declaration_as_fix():
    torch.manual_seed(1)
    model = SequenceFirstLM()
    ids, y = sequence_first_tokens(T=5)(3, torch.Generator().manual_seed(0))
    engine = ga.PerSampleGradients(model)
    with pytest.raises(ValueError, match=r"has 5 entries on dim 0.*losses has 3 entries.*batch_first=False"):
        engine.backward(sequence_first_token_losses(model(ids), y))


def test_unbatched_input_is_refused_with_the_fix():
    model = nn.GRU(3, 4)
    ga.PerSampleGradients(model)
    with pytest.raises(ga.UnsupportedModuleError, match=r"unbatched 2-D input .*x\.unsqueeze\(1\)"):
        model(torch.randn(5, 3))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["DPLSTM", "DPGRU", "DPRNN"])
def test_opacus_dp_layers_keep_working(kind, batch_first):
    """Opacus's DPLSTM/DPGRU/DPRNN are built from nn.Linear cells called once per step on (B, in):
    the Linear rule serves them, sequence-first ones with the declaration."""
    layers = pytest.importorskip("opacus.layers")
    torch.manual_seed(2)
    model = RecurrentNet(getattr(layers, kind)(5, 4, num_layers=2, bidirectional=True, batch_first=batch_first))
    for B in (1, 7):
        compare_all(model, sequences(batch_first), cross_entropy, B, reference=loop_reference(0), batch_first=batch_first)
