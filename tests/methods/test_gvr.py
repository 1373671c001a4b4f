"""GVR: both modes against a reference built from separate subset forwards (the authors'
route), gradients of the total wrt every parameter, the alpha = 0 control, and error paths."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradalign.errors import GradAlignError
from gradalign.methods.gvr import GVR


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x))


def views(B, soft=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(B, 6, generator=g), torch.randn(B, 6, generator=g)
    y = torch.softmax(torch.randn(B, 4, generator=g), 1) if soft else torch.randint(0, 4, (B,), generator=g)
    return x1, x2, y


def reference(net, layers, x1, x2, y, alpha, subset, seed):
    """Penalty and parameter gradients from separate forwards on the subset, create_graph=True."""
    B = x1.shape[0]
    idx = torch.randperm(B, generator=torch.Generator().manual_seed(seed))[:subset] if B > subset \
        else torch.arange(B)
    params = [p for m in layers for p in m.parameters()]
    g1 = torch.autograd.grad(F.cross_entropy(net(x1[idx]), y[idx]), params, create_graph=True)
    g2 = torch.autograd.grad(F.cross_entropy(net(x2[idx]), y[idx]), params, create_graph=True)
    penalty = sum(((a - b) ** 2).sum() for a, b in zip(g1, g2))
    total = F.cross_entropy(net(x1), y) + F.cross_entropy(net(x2), y) + alpha * penalty
    return penalty.item(), torch.autograd.grad(total, list(net.parameters()))


def gvr_grads(net, gvr, x1, x2, y):
    net.zero_grad()
    total, info = gvr.loss(net, x1, x2, y)
    total.backward()
    return total, info, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("B,soft", [(12, False), (5, False), (12, True), (1, False)])
def test_closed_form_and_autograd_match_reference(B, soft):
    net, (x1, x2, y) = Net(), views(B, soft)
    ref_penalty, ref_grads = reference(net, [net.head], x1, x2, y, alpha=5.0, subset=8, seed=3)
    for mode in ("autograd", "closed_form"):
        gvr = GVR(5.0, layers=net.head, subset=8, mode=mode, generator=torch.Generator().manual_seed(3))
        total, info, grads = gvr_grads(net, gvr, x1, x2, y)
        assert info["penalty"] == pytest.approx(ref_penalty, rel=1e-5, abs=1e-9)
        assert total.item() == pytest.approx(info["loss1"] + info["loss2"] + 5.0 * info["penalty"], rel=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert ref_penalty > 0 and any(g.abs().sum() > 0 for g in ref_grads[:4])   # penalty reaches the body


def test_autograd_mode_over_several_layers_matches_reference():
    net, (x1, x2, y) = Net(), views(16)
    layers = [net.body[2], net.head]
    ref_penalty, ref_grads = reference(net, layers, x1, x2, y, alpha=2.0, subset=8, seed=7)
    gvr = GVR(2.0, layers=layers, subset=8, generator=torch.Generator().manual_seed(7))
    assert gvr.mode == "autograd"
    _, info, grads = gvr_grads(net, gvr, x1, x2, y)
    assert info["penalty"] == pytest.approx(ref_penalty, rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["autograd", "closed_form"])
def test_alpha_zero_is_the_plain_two_view_loss(mode):
    net, (x1, x2, y) = Net(), views(12)
    total, info, grads = gvr_grads(net, GVR(0.0, layers=net.head, mode=mode), x1, x2, y)
    plain = F.cross_entropy(net(x1), y) + F.cross_entropy(net(x2), y)
    assert total.item() == plain.item()
    assert info["penalty"] > 0                                 # still reported, for the control arm
    for g, r in zip(grads, torch.autograd.grad(plain, list(net.parameters()))):
        torch.testing.assert_close(g, r)
    assert info["logits1"].shape == (12, 4) and not info["logits1"].requires_grad


def test_auto_mode_and_frozen_bias():
    net = Net()
    assert GVR(layers=net.head).mode == "closed_form"
    assert GVR(layers=[net.head]).mode == "closed_form"
    assert GVR(layers=net.body).mode == "autograd"
    net.head.bias.requires_grad_(False)                       # only W's gradient enters the penalty
    x1, x2, y = views(6)
    penalties = [GVR(1.0, layers=net.head, mode=m).loss(net, x1, x2, y)[1]["penalty"]
                 for m in ("autograd", "closed_form")]
    assert penalties[0] == pytest.approx(penalties[1], rel=1e-5)


def test_option_errors():
    net = Net()
    with pytest.raises(ValueError, match="alpha"):
        GVR(-0.1, layers=net.head)
    with pytest.raises(ValueError, match="alpha"):
        GVR(float("nan"), layers=net.head)
    with pytest.raises(ValueError, match="subset"):
        GVR(layers=net.head, subset=0)
    with pytest.raises(ValueError, match="mode"):
        GVR(layers=net.head, mode="fast")
    with pytest.raises(ValueError, match="closed_form"):
        GVR(layers=net.body, mode="closed_form")
    with pytest.raises(ValueError, match="closed_form"):
        GVR(layers=[net.body[0], net.head], mode="closed_form")
    with pytest.raises(ValueError, match="no trainable parameters"):
        GVR(layers=nn.Tanh())
    with pytest.raises(ValueError, match="layers"):
        GVR(layers=[])
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GVR(layers=frozen)


def test_input_errors():
    net = Net()
    gvr = GVR(layers=net.head)
    x1, x2, y = views(6)
    with pytest.raises(ValueError, match="same shape"):
        gvr.loss(net, x1, x2[:5], y)
    with pytest.raises(ValueError, match="one label per sample"):
        gvr.loss(net, x1, x2, y[:5])
    with pytest.raises(GradAlignError, match="ran 0 times"):
        GVR(layers=nn.Linear(8, 4)).loss(net, x1, x2, y)      # a Linear that is not in the model
    with pytest.raises(GradAlignError, match="take part"):
        GVR(layers=nn.Linear(8, 4), mode="autograd").loss(net, x1, x2, y)


def test_auto_uses_the_closed_form_only_for_the_layer_that_gives_the_logits():
    """A hidden nn.Linear passed as `layers` used to get the head's closed form: a wrong penalty."""
    net, (x1, x2, y) = Net(), views(12)
    hidden = net.body[2]                                               # Linear(10, 8), not the head
    ref_penalty, ref_grads = reference(net, [hidden], x1, x2, y, alpha=5.0, subset=8, seed=3)
    gvr = GVR(5.0, layers=hidden, subset=8, generator=torch.Generator().manual_seed(3))
    assert gvr.mode == "closed_form"                                   # all it can tell before a forward
    with pytest.warns(RuntimeWarning, match="not the model's logits"):
        total, info, grads = gvr_grads(net, gvr, x1, x2, y)
    assert gvr.mode == "autograd"
    assert info["penalty"] == pytest.approx(ref_penalty, rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    explicit = GVR(5.0, layers=hidden, subset=8, mode="closed_form")
    with pytest.raises(GradAlignError, match="not the model's logits|output is not"):
        explicit.loss(net, x1, x2, y)


# ---------------------------------------------------------------- subset_forward="separate"

class BNNet(nn.Module):
    """A small train-mode BatchNorm net: the subset's own batch statistics enter its logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 8),
                                  nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x))


def bn_state(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("mode", ["autograd", "closed_form"])
@pytest.mark.parametrize("make", [Net, BNNet])
def test_separate_forwards_match_the_authors_step(mode, make):
    """Penalty and gradients equal separate subset forwards (the reference); BatchNorm's
    running statistics move exactly once per step, by the first view's full batch."""
    net, (x1, x2, y) = make(), views(16)
    layers = [net.head] if mode == "closed_form" else [net.body[-3] if make is BNNet else net.body[2], net.head]
    before = bn_state(net)
    with torch.no_grad():                      # the reference's own forwards must not move the statistics
        expected_state = None
        if make is BNNet:
            probe = BNNet()
            probe.load_state_dict(net.state_dict())
            probe(x1)                                   # one train-mode forward of view 1
            expected_state = bn_state(probe)
    from gradalign.methods.gvr import frozen_batchnorm_stats
    with frozen_batchnorm_stats(net):
        ref_penalty, ref_grads = reference(net, layers, x1, x2, y, alpha=3.0, subset=8, seed=5)
    assert bn_state(net).keys() == before.keys() and all(torch.equal(bn_state(net)[k], v) for k, v in before.items())
    gvr = GVR(3.0, layers=layers, subset=8, mode=mode, generator=torch.Generator().manual_seed(5),
              subset_forward="separate")
    _, info, grads = gvr_grads(net, gvr, x1, x2, y)
    assert info["penalty"] == pytest.approx(ref_penalty, rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    expected_idx = torch.randperm(16, generator=torch.Generator().manual_seed(5))[:8]
    assert torch.equal(info["subset"], expected_idx)
    if expected_state is not None:
        for k, v in bn_state(net).items():
            torch.testing.assert_close(v, expected_state[k], rtol=0, atol=0)


def test_shared_and_separate_differ_only_with_batchnorm():
    for make, differ in ((Net, False), (BNNet, True)):
        x1, x2, y = views(16)
        penalties = []
        for route in ("shared", "separate"):
            net = make()
            gvr = GVR(1.0, layers=net.head, subset=8, generator=torch.Generator().manual_seed(2), subset_forward=route)
            total, info = gvr.loss(net, x1, x2, y)
            penalties.append(info["penalty"])
            assert info["subset"].shape == (8,)
        assert (abs(penalties[0] - penalties[1]) > 1e-4 * penalties[0]) == differ, (make.__name__, penalties)


def test_separate_mode_leaves_the_full_view2_forward_last_for_a_monitor():
    import gradalign as ga
    net, (x1, x2, y) = BNNet(), views(16)
    monitor = ga.GWAMonitor(net.head)
    gvr = GVR(1.0, layers=net.head, subset=8, subset_forward="separate")
    _, info = gvr.loss(net, x1, x2, y)
    monitor.update(info["logits2"], y, torch.arange(16))        # the latest head input is the full view 2
    assert monitor.last_scores().shape == (16,)
    with pytest.raises(ValueError, match="subset_forward"):
        GVR(layers=net.head, subset_forward="both")
