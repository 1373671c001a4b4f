"""Activation checkpointing without sharding: the engine's statistics and p.grad on a model whose
blocks recompute their forward in the backward (torch.utils.checkpoint non-reentrant, FSDP's
checkpoint_wrapper, Hugging Face's gradient_checkpointing_enable) equal those of the same
model without checkpointing (per-sample gradients by torch.func), and each call is recorded
once, by the original forward (the recomputation records nothing, yet watches the raw
parameters it uses as the forward did, so it saves the same tensors). A reentrant checkpoint,
whose region runs without gradients and gets its gradients from a backward of its own, is
refused with the fix.
"""
import pytest
import torch
import torch.nn.functional as F

import gradalign as ga
from gradalign.engine.reference import reference_statistics
from tests.support.compare import close
from tests.support.fsdp_scenarios import plain
from tests.support.sharded_models import TinyTransformer, batch, build, gpt2

pytestmark = pytest.mark.filterwarnings("ignore")


def counted_engine(model):
    """An engine and the number of calls its recorder keeps."""
    engine = ga.PerSampleGradients(model)
    count = [0]
    append = engine._recorder._append

    def counting(hooked, call):
        count[0] += 1
        return append(hooked, call)
    engine._recorder._append = counting
    return engine, count


def step(model, x, y, loss_fn, weights):
    engine, count = counted_engine(model)
    stats = engine.backward(loss_fn(model, x, y), weights=weights)
    grads = {plain(n): p.grad.clone() for n, p in model.named_parameters()}
    engine.remove()
    return stats, grads, count[0]


def classify(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def lm(model, x, y):
    return ga.token_losses(model(input_ids=x).logits, y, shift=True)


@pytest.mark.parametrize("how", ["function", "wrapper"])
def test_checkpointed_transformer_is_exact_and_recorded_once(how):
    x, y = batch(n=7)
    weights = torch.rand(7, generator=torch.Generator().manual_seed(2)) * 2
    ref = reference_statistics(build(), x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"),
                               weights=weights)
    _, _, calls = step(build(), x, y, classify, None)            # without checkpointing
    stats, grads, recorded = step(build(checkpoint=how), x, y, classify, weights)
    assert recorded == calls == 2 + 2 * 6 + 2  # emb, pos; per block n1, attn, n2, fc1, fc2, gamma; norm, head
    close(stats.norms, ref["norms"])
    close(stats.cosines, ref["cosines"], rtol=1e-3)
    for n, g in ref["weighted_grad"].items():
        close(grads[n], g)


def test_hugging_face_gradient_checkpointing_is_exact():
    pytest.importorskip("transformers")
    x, y = batch("gpt2", n=5)
    weights = torch.rand(5, generator=torch.Generator().manual_seed(3)) * 2
    plain_stats, plain_grads, calls = step(build("gpt2"), x, y, lm, weights)
    model = build("gpt2", checkpoint="hf")
    assert model.is_gradient_checkpointing
    stats, grads, recorded = step(model, x, y, lm, weights)
    assert recorded == calls
    close(stats.norms, plain_stats.norms, rtol=1e-5)
    close(stats.weights, plain_stats.weights, rtol=1e-5)
    for n, g in plain_grads.items():
        close(grads[n], g, rtol=1e-5)


class Reentrant(TinyTransformer):
    """Blocks in reentrant checkpoints; `first`: the embedding too, so that no recorded layer
    lies before the region (no gradient reaches it through an output the engine asks for)."""

    def __init__(self, first: bool):
        super().__init__()
        self.first = first

    def embed_and_blocks(self, ids):
        x = self.emb(ids) + self.pos
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, ids):
        if self.first:
            x = torch.utils.checkpoint.checkpoint(self.embed_and_blocks, ids, use_reentrant=True)
        else:
            x = self.emb(ids) + self.pos
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)
        return self.head(self.norm(x).mean(1))


@pytest.mark.parametrize("first", [True, False])
def test_reentrant_checkpoint_is_refused_with_the_fix(first):
    """The engine's own refusal, naming the modules left without a record, whether or not a
    recorded output lies before the region (torch's own error, where one does, used to come first:
    the first backward's census sees the checkpoint in the graph)."""
    torch.manual_seed(0)
    model = Reentrant(first)
    x, y = batch(n=5)
    engine = ga.PerSampleGradients(model)
    with pytest.raises(ga.UnsupportedModuleError, match="use_reentrant=False") as info:
        engine.backward(classify(model, x, y))
    assert "blocks.0.attn" in str(info.value)


def test_hugging_face_reentrant_checkpointing_is_refused():
    pytest.importorskip("transformers")
    model = gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    x, y = batch("gpt2", n=3)
    engine = ga.PerSampleGradients(model)
    with pytest.raises((ga.UnsupportedModuleError, RuntimeError), match="use_reentrant=False"):
        engine.backward(lm(model, x, y))
