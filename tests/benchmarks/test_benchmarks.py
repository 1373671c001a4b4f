"""The benchmark scripts' measuring parts: the CPU peak-memory count (the README's memory
columns), the wall-clock phase split of profile_engine --phases, and the comparison's check of
each library's clipped update against the float64 reference (compare.py)."""
import contextlib
import importlib.util

import pytest
import torch
from torch import nn

import gradalign as ga
from benchmarks import clip_check, clip_methods, compare, profile_engine, timing
from benchmarks.models import LinearViT, batch, build_model, per_sample_losses
from gradalign.engine.phases import PHASES

OPACUS = pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="opacus is not installed")


def test_peak_memory_counts_new_storages_not_views_of_existing_ones():
    weight = torch.randn(512, 512)  # 1 MiB that exists before the step
    x = torch.randn(256, 512)

    def step():
        y = x @ weight.t()          # a view of the weight (not new), then a new (256, 512): 0.5 MiB
        z = y.relu_()               # in place: not new
        del y, z
        tmp = torch.empty(1024, 1024)  # 4 MiB, freed before the next one
        del tmp
        torch.empty(256, 1024)      # 1 MiB

    peak = timing.peak_memory_mb(step, torch.device("cpu"), lambda: None)
    assert peak == pytest.approx(4.0, abs=1e-6)  # the 4 MiB alone; the 0.5 MiB freed before it


def test_profile_engine_phases_cover_the_step():
    table = profile_engine.phases("mlp", 8, "gasw", steps=3)
    phases = [k for k in table if k not in ("step", "plain step", "forward and the rest")]
    assert set(PHASES) <= set(phases)
    assert all(v > 0 for v in table.values())


def test_profile_engine_diff_sets_each_operator_beside_the_plain_steps():
    rows = profile_engine.op_diff("mlp", 8, "clip", steps=2)
    deltas = [r[0] for r in rows]
    assert deltas == sorted(deltas, reverse=True)
    assert all(abs(delta - (mine - plain)) < 1e-6 for delta, mine, plain, _, _ in rows)
    # the engine's own operators have no plain counterpart: the norms, the clipping weights' scaling
    own = {op for delta, mine, plain, op, _ in rows if plain == 0 and mine > 0}
    assert {"aten::linalg_vector_norm", "aten::mul"} <= own
    # the plain step's weight-gradient products are there too, on both sides
    assert any(op == "aten::mm" and plain > 0 and mine > 0 for _, mine, plain, op, _ in rows)


def test_trace_sees_every_phase_in_order_and_every_unit_statistic():
    """The engine's `trace` hook: the phases of a GASW backward in their order, and each unit's
    statistics nested inside them, labelled with the parameters and the route."""
    seen, depth = [], [0]

    @contextlib.contextmanager
    def trace(name):
        seen.append((depth[0], name))
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = ga.PerSampleGradients(model, trace=trace)
    losses = nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,)), reduction="none")
    engine.backward(losses, weights=ga.GASW(2.0))
    assert [name for d, name in seen if d == 0] == list(PHASES)
    units = [name for d, name in seen if d == 1]
    assert "unit 2.weight+2.bias [Factored T=1 + bias, factors]: weighted" in units
    assert any(name.startswith("unit 0.weight+0.bias [Factored T=1 + bias, ") and name.endswith(": add_gram")
               for name in units), units


def mlp_loss(out, targets):
    return per_sample_losses("mlp", out, targets)


@pytest.fixture(scope="module")
def tiny():
    """The seed MLP (40-256-256-10) on 8 samples and its float64 clipped reference (C the median norm)."""
    torch.manual_seed(0)
    model = build_model("mlp")
    x, y = batch("mlp", 8)
    return model, x, y, clip_check.reference(model, mlp_loss, x, y, chunk=3)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus's hooks on a model whose input needs no grad
@pytest.mark.parametrize("name", ["gradalign", "gradalign_low", "vmap", pytest.param("opacus", marks=OPACUS),
                                  pytest.param("opacus_ghost", marks=OPACUS)])
def test_installed_methods_pass_the_clipping_check(tiny, name):
    model, x, y, ref = tiny
    assert (ref.norms > ref.clip).sum() == 4  # C the median of 8 norms (the lower middle one): 4 clipped
    method = clip_methods.build(name, "mlp", model, x, y, ref.clip)
    method.step()
    method.step()  # what a step leaves does not leak into the next
    assert clip_check.check(method.gradient(), ref) is None
    assert clip_check.relative_error(method.gradient(), ref) < 1e-5


def test_check_flags_wrong_updates(tiny):
    model, x, y, ref = tiny
    method = clip_methods.build("gradalign", "mlp", model, x, y, ref.clip)
    method.step()
    good = {n: g.clone() for n, g in method.gradient().items()}
    assert clip_check.check(good, ref) is None
    unclipped = clip_methods.build("plain", "mlp", model, x, y, ref.clip)  # the plain mean gradient
    unclipped.step()
    assert clip_check.check(unclipped.gradient(), ref).startswith("relative error")
    name = next(iter(good))
    nudged = {**good, name: good[name] * (1 + 1e-3)}  # one parameter 0.1 % off
    assert clip_check.check(nudged, ref).startswith("relative error")
    assert clip_check.check({**good, name: good[name] * float("nan")}, ref).startswith("relative error")
    assert clip_check.check({**good, name: None}, ref) == f"no gradient for 1 of {len(good)} parameters ({name})"
    assert clip_check.check({**good, name: good[name].flatten()}, ref) == f"wrong shape for {name}"


def test_reference_without_clipping_is_the_mean_gradient(tiny):
    model, x, y, _ = tiny
    ref = clip_check.reference(model, mlp_loss, x, y, clip=1e30, chunk=5)
    model64 = model.double()
    try:
        mean = torch.autograd.grad(mlp_loss(model64(x.double()), y).mean(), list(model64.parameters()))
    finally:
        model.float()
    for (name, r), g in zip(ref.grad.items(), mean):
        torch.testing.assert_close(r, g, rtol=1e-12, atol=1e-15, msg=name)


class Float32Kink(nn.Module):
    """ReLU in float32, identity in float64: every sample with a negative input takes another
    branch in the two precisions, as a sample at a ReLU kink does through rounding."""

    def forward(self, z):
        return z.relu() if z.dtype == torch.float32 else z


def test_reference_refuses_a_batch_at_a_kink():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1), Float32Kink(), nn.Linear(1, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    negative = (model[0](x)[:, 0] < 0).nonzero().flatten().tolist()
    assert 0 < len(negative) < 6
    with pytest.raises(clip_check.AtKink) as raised:
        clip_check.reference(model, mlp_loss, x, y, chunk=4)
    assert raised.value.samples == negative and raised.value.deviation > 0.1


def test_compare_prints_the_table_and_marks_what_failed(capsys, monkeypatch):
    """End to end on the seed MLP, no memory: the table, and a method whose update is wrong marked."""
    real = clip_methods.build

    def build(name, kind, model, x, y, clip, fastdp_path=None):
        if name == "vmap":  # a clip threshold twice too large: a wrong update
            return real(name, kind, model, x, y, 2 * clip)
        return real(name, kind, model, x, y, clip, fastdp_path)
    monkeypatch.setattr(clip_methods, "build", build)
    threads = torch.get_num_threads()
    try:
        compare.main(["--quick", "--no-memory", "--models", "mlp", "--batch", "8", "--methods", "gradalign", "vmap",
                      "fastdp"])
    finally:
        torch.set_num_threads(threads)  # main sets 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| mlp, B 8 |"))
    gradalign_cell, vmap_cell, fastdp_cell = row.strip("| ").split(" | ")[1:]
    assert gradalign_cell.endswith("x") and "*" not in gradalign_cell
    assert "**wrong** [1]" in vmap_cell and fastdp_cell == "not run [2]"
    assert "[1] torch.func vmap on mlp: relative error" in out and "--fastdp PATH" in out


def test_compare_draws_another_batch_at_a_kink(monkeypatch):
    real, batches = clip_check.reference, []

    def reference(model, loss_fn, x, y, **options):
        batches.append(x)
        if len(batches) == 1:
            raise clip_check.AtKink([2], 0.03)
        return real(model, loss_fn, x, y, **options)
    monkeypatch.setattr(clip_check, "reference", reference)
    model, x, y, ref, seed, redrawn = compare.referenced_batch("mlp", 8, torch.device("cpu"))
    assert seed == 1 and redrawn == ["batch seed 0: sample(s) [2] at a kink: float32 per-sample gradient 3.0e-02 "
                                     "(relative) away from float64"]
    assert torch.equal(x, batches[1]) and not torch.equal(batches[0], batches[1])
    first_model = compare.setup("mlp", 8, torch.device("cpu"), seed=0)[0]  # the model stays seed 0's
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), first_model.parameters()))


def test_floor_norm_kernels_compute_the_engines_norms():
    """benchmarks/floor.py times these formulations as the best kernel for the norms: each must give
    the engine's (B,) |g_i|^2 of the weight (over positions and for one position), and norm_macs
    counts the cheaper route by hand."""
    from benchmarks import floor
    from gradalign.engine.representations import Factored
    g = torch.Generator().manual_seed(0)
    for T, n_in, n_out in ((5, 3, 4), (1, 6, 2)):
        rep = Factored(torch.randn(7, 1, T, n_in, generator=g), torch.randn(7, 1, T, n_out, generator=g),
                       torch.Size((n_out, n_in)))
        expected = torch.einsum("bto,bti->boi", rep.D[:, 0], rep.A[:, 0]).square().sum((1, 2))
        torch.testing.assert_close(rep.sq_norms(), expected)
        for name, kernel in floor.norm_kernels(rep).items():
            torch.testing.assert_close(kernel(), expected, msg=name)
    assert floor.norm_macs(rep) == 7 * (6 + 2)  # one position: |a|^2 |d|^2
    wide = Factored(torch.randn(2, 1, 10, 3), torch.randn(2, 1, 10, 4), torch.Size((4, 3)))
    assert floor.norm_macs(wide) == 2 * min(10 * 10 * 7, 10 * 3 * 4)  # the formed route is cheaper here


@pytest.mark.parametrize("weighting", ["clip", "gasw"])
@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)),
                                  lambda: nn.Sequential(nn.Linear(6, 2), nn.Tanh(), nn.Linear(2, 3)),
                                  lambda: LinearViT(dim=8, depth=1, heads=2)])
def test_the_minimal_steps_write_the_weighted_mean_gradient(make, weighting):
    """benchmarks/minimal.py's hand-written steps (the floors they stand for must be correct steps): p.grad =
    (1/B) sum_i w_i g_i, clipping or GASW(2) weights, of materialised per-sample gradients in float64; the
    middle model takes GASW's S route on its layers (no Gram matrix), the first the Gram route."""
    from benchmarks.minimal import MinimalStep
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64) if isinstance(model, LinearViT) else torch.randn(5, 6).double()
    y = torch.randint(0, 3, (5,))
    loss = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
    stats = ga.reference_statistics(model, x, y, loss)
    clip = float(stats["norms"].median())
    if weighting == "clip":
        w = (clip / stats["norms"]).clamp(max=1.0)
    else:
        raw = stats["cosines"].clamp(min=0) ** 2
        w = raw * 5 / raw.sum()
    ref = ga.reference_statistics(model, x, y, loss, weights=w)["weighted_grad"]
    for check_scale in (False, True):
        MinimalStep(model, weighting, clip=clip, check_scale=check_scale).step(x, y, loss)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-10, atol=1e-12)


def test_the_minimal_step_refuses_what_it_does_not_serve():
    from benchmarks.minimal import MinimalStep
    model, x, y = nn.Sequential(nn.Linear(6, 3)), torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="need the loss scale"):     # squares out of float32's range
        MinimalStep(model, check_scale=True).step(x, y, lambda out, t: 1e30 * out.logsumexp(1))
    with pytest.raises(ValueError, match=r"nn.Linear and nn.LayerNorm only, not 0 \(Conv1d\)"):
        MinimalStep(nn.Sequential(nn.Conv1d(2, 2, 3)))


def test_the_minimal_benchmark_times_one_variant_alone(capsys):
    """`benchmarks.minimal --processes` runs each variant in its own process through `--one`."""
    from benchmarks import minimal
    minimal.main(["--one", "mlp", "4", "by hand gasw + check", "2"])
    assert float(capsys.readouterr().out.strip()) > 0
    assert set(minimal.VARIANTS) >= {"plain", "clip", "gasw", "by hand clip + check"}
