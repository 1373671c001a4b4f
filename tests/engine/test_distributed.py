"""Data parallel with 2 gloo processes on CPU: every statistic and p.grad against one process
on the concatenated batch (GASW, GDSW, plain, a DDP-wrapped model, GAGA, GWA), and GVR under
DDP against the mean of each shard's single-process gradient. Each rank ends its gloo group
for good before it exits (tests/support/gloo.py: a group alive at the interpreter's exit aborts
the process now and then), and checks that no gloo thread outlives it."""
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradalign as ga
import tests.support.dist_scenarios as sc
from tests.support.gloo import end_process_group, gloo_threads

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every scenario once on 2 ranks; [rank 0 results, rank 1 results]."""
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(sc.run_rank, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def close(a, b):
    torch.testing.assert_close(a, b, **TOL)


PER_SAMPLE = ("norms", "cosines", "weights", "sq_norms", "dots_with_sum", "dots_with_mean")
GLOBAL = ("sum_sq_norm", "mean_grad_norm", "mean_grad_sq_norm")
PARAMETER_SIZED = ("grad", "grad_sum", "mean_grad", "grad_sq_sum")


@pytest.mark.parametrize("scale", sc.LOSS_SCALES, ids=lambda s: f"loss_x{s:g}")
@pytest.mark.parametrize("model", list(sc.MODELS))
@pytest.mark.parametrize("kind", ["plain", "gasw", "gdsw_loo"])
def test_engine_is_one_process_on_the_concatenated_batch(ranks, model, kind, scale):
    """Every statistic (engine_step lists them; divided by the loss scale) of each rank against one
    process on the concatenated batch, with losses x1, x1e20 and x1e-30: S reduced over the ranks
    must be divided by the rank's scale before <g_i, S> and |S|^2 are formed, and gbar is S over
    the global B (13), not the rank's (7 or 6)."""
    x, y = sc.batch()
    ref = sc.engine_step(sc.MODELS[model](), x, y, sc.weighting(kind), loss_scale=scale)
    assert ref["global_batch_size"] == sc.B and (ref["norms"] > 0).all() and (ref["cosines"] != 0).all()
    for rank, res in enumerate(ranks):
        got = res[f"{model}/{kind}/{scale:g}"]
        assert got["global_batch_size"] == sc.B
        assert set(got) == set(ref)
        for key in PER_SAMPLE:                               # each rank: its own samples
            if key in ref:
                close(got[key], sc.shard(ref[key], rank, WORLD))
        for key in GLOBAL:                                   # the same on every rank
            if key in ref:
                close(got[key], ref[key])
        for key in PARAMETER_SIZED:
            for name, g in ref.get(key, {}).items():
                close(got[key][name], g)
    if kind != "plain":                                      # weights normalised over the global batch
        total = sum(res[f"{model}/{kind}/{scale:g}"]["weights"].sum() for res in ranks)
        assert float(total) == pytest.approx(sc.B)


@pytest.mark.parametrize("kind", ["plain", "gasw"])
def test_a_rank_with_an_empty_batch_takes_part(ranks, kind):
    """Rank 1 has no sample: rank 0's statistics and both ranks' p.grad are one process's on rank 0's batch."""
    x, y = sc.batch()
    ref = sc.engine_step(sc.mlp(), x, y, sc.weighting(kind))
    for key in ("norms", "cosines", "weights"):
        close(ranks[0][f"empty/{kind}"][key], ref[key])
        assert ranks[1][f"empty/{kind}"][key].shape == (0,)
    for res in ranks:  # |gbar|^2 global on the empty rank too
        close(res[f"empty/{kind}"]["mean_grad_sq_norm"], ref["mean_grad_sq_norm"])
        for name, g in ref["grad"].items():
            close(res[f"empty/{kind}"]["grad"][name], g)


def test_ddp_wrapped_model_is_reduced_once(ranks):
    model = sc.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = sc.batch()
    gasw = sc.ga.GASW(gamma=2.0)
    engine = sc.ga.PerSampleGradients(model)
    for step in range(2):
        engine.backward(sc.cross_entropy(model(x), y), weights=gasw)
        for res in ranks:
            for name, p in model.named_parameters():
                close(res["ddp/gasw"][step][name], p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_gaga_sums_over_ranks(ranks):
    ref = sc.gaga_run(sc.mlp())
    assert ref["samples"] and len(ref["means"]) >= 2
    for res in ranks:
        got = res["gaga"]
        assert got["samples"] == ref["samples"]
        np.testing.assert_allclose(got["snr"], ref["snr"], rtol=1e-4)  # float32 sums, a difference
        for m_got, m_ref in zip(got["means"], ref["means"]):
            for name in m_ref:
                close(m_got[name], m_ref[name])


def test_gwa_gathers_the_whole_epoch(ranks):
    ref = sc.gwa_run(sc.HeadNet())
    for res in ranks:
        got = res["gwa"]
        # float32 training differs in summation order; GWA_T = mean / (kurt + 1.2) amplifies it
        # where kurt + 1.2 is small (epoch 0 here: GWA_T ~ -135)
        np.testing.assert_allclose(got["epoch_scores"], ref["epoch_scores"], rtol=1e-3)
        np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-6)
        assert got["best"] == ref["best"]
        for table in (got["sample_scores"], ref["sample_scores"]):
            assert len(table["sample_id"]) == 2 * 3 * sc.B
        order_g = np.lexsort((got["sample_scores"]["sample_id"], got["sample_scores"]["epoch"]))
        order_r = np.lexsort((ref["sample_scores"]["sample_id"], ref["sample_scores"]["epoch"]))
        for key in ("sample_id", "epoch"):
            np.testing.assert_array_equal(got["sample_scores"][key][order_g], ref["sample_scores"][key][order_r])
        np.testing.assert_allclose(got["sample_scores"]["score"][order_g], ref["sample_scores"]["score"][order_r],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["closed_form", "autograd"])
def test_gvr_under_ddp_averages_each_ranks_penalty(ranks, mode):
    x1, x2, y = sc.gvr_views()
    per_rank = []
    for rank in range(WORLD):
        model = sc.HeadNet()
        sc.gvr_loss_backward(model, model, *(sc.shard(t, rank, WORLD) for t in (x1, x2, y)), mode)
        per_rank.append(sc.grads(model))
    for res in ranks:
        for name in per_rank[0]:
            close(res[f"gvr/{mode}"][name], (per_rank[0][name] + per_rank[1][name]) / WORLD)


def test_engine_statistics_and_monitor_never_keep_a_destroyed_group_alive(tmp_path):
    """They hold the group by weak reference (engine/distributed.WeakGroup): after
    destroy_process_group it is freed and its gloo threads end although they are still referenced
    (a group kept alive runs its threads into the interpreter's shutdown: gloo.py); reading it
    afterwards raises GradAlignError, as does a global statistic that was not read before."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    before = gloo_threads()  # an earlier test's group may still run (e.g. a docs example's FSDP model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        model = sc.mlp()
        engine = ga.PerSampleGradients(model, process_group=group)
        x, y = sc.batch(n=4)
        stats = engine.backward(sc.cross_entropy(model(x), y), weights=ga.GASW(gamma=2.0))
        monitor = ga.GWAMonitor(model[2], process_group=group)
        assert engine.process_group is group and stats.process_group is group and monitor.process_group is group
        alive = weakref.ref(group)
        del group
    except BaseException:
        dist.destroy_process_group()
        raise
    end_process_group("this test", before)   # raises if anything still held the group
    assert alive() is None
    for holder in (engine, stats, monitor):
        with pytest.raises(ga.GradAlignError, match="no longer exists"):
            holder.process_group  # noqa: B018
    with pytest.raises(ga.GradAlignError, match="no longer exists"):
        stats.grad_sq_sum  # noqa: B018
    engine.remove()
    monitor.remove()
