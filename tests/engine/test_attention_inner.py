"""nn.MultiheadAttention without a recompute (rules/attention.py `attention_inner`): for
self-attention the in-projection's output gradient is taken in the engine's own backward and
out_proj's input read from the forward's saved tensor. Which configurations take that path,
that they match torch.func (and a per-sample loop with dropout, whose masks are now the
forward's own), and that the others, or saved-tensor hooks, fall back to the recompute."""
import pytest
import torch
from torch import nn

import gradalign as ga
from gradalign.engine.rules import attention as attention_module
from tests.support.compare import compare_all, loop_reference
from tests.support.engine_models import MHA_CONFIGS, Attention, Encoder, cross_entropy, sequence_batch

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")
FAST = {"self", "self_seq_first", "no_bias", "bool_mask", "float_mask_padding", "float_mask_padding_weights",
        "causal_padding", "causal", "causal_weights"}


@pytest.fixture
def fast_calls(monkeypatch):
    calls = []
    original = attention_module.projections_from_backward

    def spy(*args):
        calls.append(1)
        return original(*args)
    monkeypatch.setattr(attention_module, "projections_from_backward", spy)
    return calls


@pytest.mark.parametrize("config", sorted(MHA_CONFIGS))
def test_which_configurations_skip_the_recompute(config, fast_calls):
    torch.manual_seed(0)
    cfg = MHA_CONFIGS[config]
    compare_all(Attention(**cfg), sequence_batch(5 + (3 if cfg.get("cross") else 0), 8), cross_entropy, B=6)
    assert bool(fast_calls) == (config in FAST)


def test_dropout_inside_attention_uses_the_forwards_masks(fast_calls):
    torch.manual_seed(0)
    model = Encoder(dropout=0.3)
    compare_all(model, sequence_batch(5, 8), cross_entropy, B=6, reference=loop_reference(7), forward_seed=7)
    assert fast_calls


def test_saved_tensor_hooks_fall_back_to_the_recompute(fast_calls):
    torch.manual_seed(0)
    model, x = Attention(), torch.randn(6, 5, 8)
    y = torch.randint(0, 3, (6,))
    reference = ga.reference_statistics(model, x, y, cross_entropy)
    engine = ga.PerSampleGradients(model)
    with torch.autograd.graph.save_on_cpu():
        losses = cross_entropy(model(x), y)
    stats = engine.backward(losses)
    assert not fast_calls
    torch.testing.assert_close(stats.norms, reference["norms"], rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("memory", ["default", "low"])
def test_a_frozen_projection_and_low_memory(memory, fast_calls):
    torch.manual_seed(0)
    for frozen in (False, True):
        model = Attention()
        model.att.in_proj_weight.requires_grad_(not frozen)
        x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
        reference = ga.reference_statistics(model, x, y, cross_entropy)
        engine = ga.PerSampleGradients(model)
        stats = engine.backward(cross_entropy(model(x), y), memory=memory)
        torch.testing.assert_close(stats.norms, reference["norms"], rtol=2e-4, atol=1e-6)
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, reference["mean_grad"][name], rtol=2e-4, atol=1e-6)
        assert len(fast_calls) == 1  # only the trainable one
        engine.remove()


def test_an_encoder_layer_called_twice(fast_calls):
    """One layer applied twice: two calls, each with its own nodes and saved input."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layer(self.layer(x)).mean(1))
    compare_all(Twice(), sequence_batch(5, 8), cross_entropy, B=5)
    assert len(fast_calls) >= 2
