"""The engine's error paths and hook hygiene."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga
from tests.support.engine_models import ARCHITECTURES
from gradalign.engine import PerSampleGradients
from gradalign.engine.representations import Factored


def test_batchnorm_in_training_mode_lists_every_offender():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ga.UnsupportedModuleError) as err:
        PerSampleGradients(model)
    message = str(err.value)
    assert "1 (BatchNorm1d)" in message and "3 (BatchNorm1d)" in message
    assert "GroupNorm" in message and "eval" in message


def test_batchnorm_switched_back_to_training_is_refused_at_forward():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4).eval())
    engine = PerSampleGradients(model)
    model.train()
    with pytest.raises(ga.UnsupportedModuleError, match="BatchNorm"):
        model(torch.randn(3, 4))
    engine.remove()


def test_frozen_batchnorm_is_ignored():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4).requires_grad_(False), nn.Linear(4, 2))
    model[1].eval()
    stats = PerSampleGradients(model).backward(F.cross_entropy(model(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long), reduction="none"))
    assert stats.norms.shape == (5,)
    assert all(n.startswith(("0.", "2.")) for n in stats.grad_sq_sum)


def test_parameter_frozen_after_creation_is_left_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    engine = PerSampleGradients(model)
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    stats = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert model[0].weight.grad is None and "0.weight" not in stats.grad_sq_sum
    ref = ga.reference_statistics(model, x, y,
                                  lambda out, t: F.cross_entropy(out, t, reduction="none"))
    torch.testing.assert_close(stats.norms, ref["norms"])


def test_validate_lists_every_problem_without_hooking():
    embed = nn.Embedding(10, 4, sparse=True)
    out = nn.Linear(4, 10, bias=False)
    out.weight = embed.weight  # tied: supported, not a problem
    model = nn.Sequential(embed, nn.BatchNorm1d(4), out)
    problems = ga.validate(model)
    assert len(problems) == 2, problems
    assert any("sparse" in p for p in problems) and any("BatchNorm" in p for p in problems)
    assert all(not m._forward_hooks for m in model.modules())      # nothing was hooked
    assert ga.validate(nn.Sequential(nn.Linear(3, 2))) == []
    with pytest.raises(ga.UnsupportedModuleError) as err:             # the engine refuses with the same list
        PerSampleGradients(model)
    assert all(p in str(err.value) for p in problems)


def test_check_model_is_a_deprecated_alias_of_compare_with_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    errors = ga.compare_with_reference(model, x, y, loss)
    assert max(errors.values()) < 1e-5
    with pytest.warns(DeprecationWarning, match="compare_with_reference"):
        assert ga.check_model(model, x, y, loss) == errors


def test_parameter_used_outside_its_module_is_refused():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return F.linear(x, self.b.weight)  # b's forward never runs

    model = Sneaky()
    engine = PerSampleGradients(model)
    losses = model(torch.randn(4, 3)).sum(1)
    with pytest.raises(ga.UnsupportedModuleError, match="outside"):
        engine.backward(losses)


@pytest.mark.parametrize("verify", [False, True])
def test_partial_use_outside_the_module_is_refused(verify):
    """Used to be caught by verify=True only; the census of the first backward's graph sees it."""
    class HalfSneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + F.linear(x, self.lin.weight)

    model = HalfSneaky()
    engine = PerSampleGradients(model, verify=verify)
    with pytest.raises(ga.UnsupportedModuleError, match=r"lin.weight are used outside the forward of lin \(Linear\)"):
        engine.backward(model(torch.randn(4, 3)).sum(1))


def test_raw_parameter_in_an_unfollowed_op_of_a_module_with_a_cache_is_refused_with_the_fix():
    class Cache:  # state the module changes: the torch.func fallback cannot run it again
        def __init__(self):
            self.seen = []

    class WithCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x, cache=None):
            cache.seen.append(x)
            return F.prelu(x, self.w)  # not an operation the watch follows

    model = nn.Sequential()
    model.add_module("block", WithCache())
    engine = PerSampleGradients(model.block)
    with pytest.raises(ga.UnsupportedModuleError) as err:
        model.block(torch.randn(2, 3), cache=Cache())
    message = str(err.value)
    for part in ("(WithCache)", "parameter w", "prelu", "Cache among its arguments", "use_cache=False", "Fix:",
                 "register a rule", "freeze"):
        assert part in message, (part, message)
    assert isinstance(model.block.w, nn.Parameter)  # the parameter is back in place after the error
    engine.remove()


def test_raw_parameter_in_an_unfollowed_op_of_a_module_with_keywords_and_several_tensors():
    class Gated(nn.Module):  # two tensors, a keyword mask shared by all samples, a tuple out
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.rand(3) + 0.5)
            self.v = nn.Parameter(torch.randn(3))

        def forward(self, x, gate, *, mask=None, scale=1.0):
            h = torch.clamp(x, min=self.w - 1) * torch.sigmoid(gate) * mask  # clamp: not followed
            return h * scale, torch.einsum("btd,d->bt", gate, self.v)  # einsum: not followed either

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.gated, self.head = nn.Linear(3, 3), Gated(), nn.Linear(3, 2)

        def forward(self, x):  # (B, T, 3)
            mask = torch.ones(1, x.shape[1], 1)
            mask[:, 0] = 0.5
            h, g = self.gated(torch.tanh(self.inp(x)), x.flip(-1), mask=mask, scale=2.0)
            return self.head(h.mean(1)) + g.mean(1, keepdim=True)

    torch.manual_seed(0)
    model = Net()
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    for B in (1, 7):
        x, y = torch.randn(B, 4, 3), torch.randint(0, 2, (B,))
        errors = ga.compare_with_reference(model, x, y, loss)
        assert max(errors.values()) < 1e-5, errors


def test_raw_parameter_meeting_the_batch_in_an_unfollowed_op_falls_back_to_torch_func():
    class PReLUish(nn.Module):  # one tensor in, one out: the torch.func fallback serves it exactly
        def __init__(self):
            super().__init__()
            self.slope = nn.Parameter(torch.rand(4))
            self.gain = nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x):
            return F.prelu(x, self.slope) * self.gain

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), PReLUish(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    errors = ga.compare_with_reference(model, x, y, loss)
    assert max(errors.values()) < 1e-5, errors


def test_raw_parameter_with_the_batch_size_on_its_own_batch_dim_is_refused():
    class PerRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(4, 3))

        def forward(self, x, y):  # (4, 3) meets a batch of 4: is dim 0 the batch or the table's rows?
            return x * self.table + y

    model = PerRow()
    PerSampleGradients(model)
    with pytest.raises(ga.UnsupportedModuleError, match="own dim there has the batch size"):
        model(torch.randn(4, 3), torch.randn(4, 3))


def test_registry_without_fallback_refuses_unknown_modules():
    registry = ga.default_registry()
    registry.fallback = None
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU())
    with pytest.raises(ga.UnsupportedModuleError, match=r"1 \(PReLU\): no rule"):
        PerSampleGradients(model, registry=registry)


def test_embedding_options_that_mix_samples_are_refused():
    with pytest.raises(ga.UnsupportedModuleError, match="scale_grad_by_freq"):
        PerSampleGradients(nn.Embedding(5, 2, scale_grad_by_freq=True))


@pytest.mark.parametrize("bad", [torch.zeros(()), torch.zeros(4, 1)])
def test_losses_must_be_one_dimensional(bad):
    model = nn.Linear(3, 1)
    engine = PerSampleGradients(model)
    losses = bad + model.weight.sum()
    with pytest.raises(ValueError, match=r"1-D tensor of shape \(B,\)"):
        engine.backward(losses)


def test_losses_must_have_one_entry_per_sample():
    model = nn.Linear(3, 2)
    engine = PerSampleGradients(model)
    out = model(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"input has 4 entries on dim 0.*losses has 8 entries.*one loss per sample"):
        engine.backward(out.reshape(-1))


def test_losses_without_grad_are_refused():
    engine = PerSampleGradients(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="does not require grad"):
        engine.backward(torch.zeros(4))


@pytest.mark.parametrize("weights,match", [(torch.ones(3), r"shape \(4,\)"),
                                           (torch.tensor([1.0, float("nan"), 1.0, 1.0]), "NaN")])
def test_bad_weights(weights, match):
    model = nn.Linear(3, 2)
    engine = PerSampleGradients(model)
    losses = model(torch.randn(4, 3)).sum(1)
    with pytest.raises(ValueError, match=match):
        engine.backward(losses, weights=weights)


@pytest.mark.parametrize("arch", ["shared_bn_fallback", "vit_cls_pos", "transformer_seq_first", "raw_parameters"])
def test_remove_leaves_the_model_as_it_was(arch):
    model, make_batch, loss_fn = ARCHITECTURES[arch]()

    def state(m):
        return (dict(m._forward_hooks), dict(m._forward_hooks_with_kwargs), dict(m._forward_pre_hooks),
                dict(m._forward_hooks_always_called), set(m.__dict__), dict(m._parameters))
    before = {n: state(m) for n, m in model.named_modules()}
    engine = PerSampleGradients(model)
    x, y = make_batch(4, torch.Generator().manual_seed(0))
    engine.backward(loss_fn(model(x), y))
    engine.remove()
    for n, m in model.named_modules():
        assert state(m) == before[n], n
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_materialised_route_is_chunked(monkeypatch):
    monkeypatch.setattr("gradalign.engine.representations.factored.CHUNK_ELEMENTS", 7)
    A, D = torch.randn(5, 1, 9, 2), torch.randn(5, 1, 9, 3)
    grads = Factored(A, D, torch.Size([3, 2]))
    full = torch.einsum("bgto,bgti->boi", D, A)
    torch.testing.assert_close(grads.sq_norms(), full.flatten(1).square().sum(1))
    torch.testing.assert_close(grads.sq_sum(), full.square().sum(0))


def test_a_shared_value_meeting_the_batch_in_an_unfollowed_op_is_refused_with_the_fix():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.head = nn.Embedding(5, 3), nn.Linear(3, 2)

        def forward(self, x):  # (B, T, 3); positions (1, T): shared by all samples
            shared = self.pos(torch.arange(x.shape[1]).unsqueeze(0))
            return self.head(torch.einsum("btd,otd->bd", x, shared))  # einsum: not followed

    model = Net()
    PerSampleGradients(model)
    with pytest.raises(ga.UnsupportedModuleError) as err:
        model(torch.randn(4, 3, 3))
    message = str(err.value)
    for part in ("pos (Embedding)", "shared by all samples", "einsum", "1 on its batch dim", "Fix:",
                 "position_ids.expand(B, -1)"):
        assert part in message, (part, message)


def test_a_shared_value_fed_to_a_module_with_a_rule_is_refused_with_the_fix():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.norm, self.head = nn.Embedding(5, 3), nn.LayerNorm(3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x + self.norm(self.pos(torch.arange(x.shape[1]).unsqueeze(0))))

    model = Net()
    PerSampleGradients(model)
    with pytest.raises(ga.UnsupportedModuleError, match=r"norm \(LayerNorm\): its input is the output of pos"):
        model(torch.randn(4, 3, 3))


@pytest.mark.parametrize("group", ["gloo", "nccl", 0])
def test_a_process_group_given_as_a_backend_name_is_refused(group):
    """process_group="gloo" used to be accepted and fail inside torch at the first backward."""
    with pytest.raises(ValueError, match="process_group must be a torch.distributed process group"):
        ga.PerSampleGradients(nn.Sequential(nn.Linear(3, 2)), process_group=group)
