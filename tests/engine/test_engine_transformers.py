"""nn.MultiheadAttention, the transformers built on it and raw parameters, against references.

The torch.func reference (vmap over grad) where it runs; with dropout, whose masks vmap
cannot reproduce, a per-sample loop: one forward of the batch, then one backward per sample.
"""
import pytest
import torch
from torch import nn

import gradalign as ga
from tests.support.engine_models import MHA_CONFIGS, Attention, Encoder, TinyViT, classification_batch, cross_entropy, sequence_batch
from gradalign.engine import PerSampleGradients
from tests.support.compare import compare_all, loop_reference

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def attention(config: str):
    torch.manual_seed(0)
    cfg = MHA_CONFIGS[config]
    return Attention(**cfg), sequence_batch(5 + (3 if cfg.get("cross") else 0), 8), cross_entropy


@pytest.mark.parametrize("config", sorted(MHA_CONFIGS))
def test_attention_matches_torch_func(config):
    compare_all(*attention(config), B=7)


@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("config", ["self", "cross_seq_first", "bias_kv_zero_attn", "weights_in_loss", "kdim_vdim"])
def test_attention_matches_torch_func_at_batch_sizes(config, B):
    compare_all(*attention(config), B=B)


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("make", [
    lambda: (Attention(dropout=0.3, need_weights=True), sequence_batch(5, 8), cross_entropy),
    lambda: (Attention(dropout=0.3, cross=True, batch_first=False, add_bias_kv=True), sequence_batch(8, 8),
             cross_entropy),
    lambda: (Encoder(dropout=0.2, batch_first=False, norm_first=True), sequence_batch(5, 8), cross_entropy),
    lambda: (TinyViT(dropout=0.2), classification_batch(3, 4, 4, classes=3), cross_entropy),
], ids=["mha_weights", "mha_seq_first_bias_kv", "encoder", "vit"])
def test_dropout_matches_a_per_sample_loop(make, B):
    torch.manual_seed(0)
    model, make_batch, loss_fn = make()
    compare_all(model, make_batch, loss_fn, B=B, reference=loop_reference(11), forward_seed=11)


def test_dropout_recompute_leaves_the_rng_stream_alone():
    torch.manual_seed(0)
    model, make_batch, loss_fn = Attention(dropout=0.5), sequence_batch(5, 8), cross_entropy
    x, y = make_batch(4, torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    loss_fn(model(x), y).mean().backward()
    expected = torch.rand(5)
    engine = PerSampleGradients(model)
    torch.manual_seed(3)
    engine.backward(loss_fn(model(x), y)).norms
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_transformers_validate_and_out_proj_is_served_by_its_attention():
    model = nn.Transformer(8, 2, 1, 1, 12, batch_first=True)
    assert ga.validate(model) == []
    engine = PerSampleGradients(model)
    hooked = set(engine._hooked)
    assert "encoder.layers.0.self_attn" in hooked and not any(p.endswith("out_proj") for p in hooked)
    assert "encoder.layers.0.self_attn.out_proj.weight" in engine._params
    engine.remove()


def test_vit_raw_parameters_are_watched_not_vmapped(monkeypatch):
    def no_vmap(*args, **kwargs):
        raise AssertionError("the torch.func fallback ran")

    monkeypatch.setattr("gradalign.engine.rules.fallback_rule", no_vmap)
    torch.manual_seed(0)
    compare_all(TinyViT(), classification_batch(3, 4, 4, classes=3), cross_entropy, B=5)


def test_unbatched_attention_is_refused():
    model = nn.MultiheadAttention(4, 2)
    PerSampleGradients(model)
    x = torch.randn(3, 4)
    with pytest.raises(ga.UnsupportedModuleError, match="batched inputs"):
        model(x, x, x)


def test_raw_parameter_inside_a_sequence_first_transformer_layer():
    class ScaledLayer(nn.TransformerEncoderLayer):  # a raw gamma used on (T, B, E)
        def __init__(self):
            super().__init__(8, 2, 12, dropout=0.0, batch_first=False)
            self.gamma = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, src, *args, **kwargs):
            return super().forward(src, *args, **kwargs) * self.gamma

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = ScaledLayer(), nn.Linear(8, 3)

        def forward(self, x):  # batch first at the model's input, sequence first inside
            return self.head(self.layer(x.transpose(0, 1)).mean(0))

    torch.manual_seed(0)
    for B in (1, 5):
        compare_all(Net(), sequence_batch(4, 8), cross_entropy, B=B)


def test_a_tensor_computed_from_a_raw_parameter_may_leave_its_module():
    class PositionTable(nn.Module):  # called with an int; its output meets the batch in the parent
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 8))

        def forward(self, T):
            return self.table[:T]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.head = PositionTable(), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.tanh(x + self.pos(x.shape[1])).mean(1))

    torch.manual_seed(0)
    for B in (1, 7):
        compare_all(Net(), sequence_batch(4, 8), cross_entropy, B=B)


def test_verify_accepts_watched_and_attention_modules():
    torch.manual_seed(0)
    model = TinyViT()
    x, y = classification_batch(3, 4, 4, classes=3)(6, torch.Generator().manual_seed(0))
    engine = PerSampleGradients(model, verify=True)
    assert engine.backward(cross_entropy(model(x), y)).norms.shape == (6,)
