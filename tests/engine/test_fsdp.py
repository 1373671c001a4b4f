"""Sharded models (FSDP2, fully_shard) on 2 gloo CPU processes against one process on the
concatenated batch: every statistic, p.grad gathered from its shards and the parameters after
two Adam steps, for a small transformer (MHA, watched raw parameters) and a tiny Hugging Face
GPT-2, with and without mixed precision (bf16 parameters, float32 reduction), activation
checkpointing (FSDP's checkpoint_wrapper, torch.utils.checkpoint, GPT-2's own) and
reshard_after_forward=False; GAGA, GWA with a sharded head, GVR (closed form and autograd);
and the models the engine refuses.
"""
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (torch >= 2.6)")
from torch.distributed.fsdp import FSDPModule  # noqa: E402,F401

import tests.support.fsdp_scenarios as sc  # noqa: E402
from tests.support.sharded_models import B  # noqa: E402

WORLD = 2
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario once on 2 ranks: [rank 0 results, rank 1 results]."""
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(sc.run_rank, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def gathered(ranks, name, step, key):
    """A per-sample statistic of the whole batch: each rank's samples, in rank order."""
    return torch.cat([r[name]["steps"][step][key] for r in ranks])


@pytest.mark.parametrize("name", list(sc.ENGINE))
def test_sharded_engine_is_one_process_on_the_concatenated_batch(ranks, name):
    if name not in ranks[0]:
        pytest.skip("needs transformers")
    ref = sc.engine_reference(name)
    mixed = sc.ENGINE[name][2].get("mp", False)
    tol = dict(rtol=1e-4, atol=1e-5) if mixed else {}  # bf16 forwards: the same per-sample values, other sums
    for step, expected in enumerate(ref["steps"]):
        for key in ("norms", "weights"):
            close(gathered(ranks, name, step, key), expected[key], **tol)
        if "cosines" in ranks[0][name]["steps"][step] and "cosines" in expected:
            close(gathered(ranks, name, step, "cosines"), expected["cosines"], rtol=1e-4, atol=1e-5)
        for r in ranks:  # p.grad gathered from the shards: (1/B) sum_i w_i g_i over the GLOBAL batch
            got = r[name]["steps"][step]
            for n, g in expected["grad"].items():
                close(got["grad"][n], g, **tol)
            for key in ("grad_sq_sum", "mean_grad"):  # parameter-sized statistics, gathered
                for n, g in expected.get(key, {}).items():
                    close(got[key][n], g)
            if "mean_sq" in expected:
                close(got["mean_sq"], expected["mean_sq"])
        if "dots" in expected:
            close(gathered(ranks, name, step, "dots"), expected["dots"])
    for r in ranks:  # the parameters after two Adam steps on the shards
        for n, p in ref["params"].items():
            close(r[name]["params"][n], p, **tol)
    if sc.ENGINE[name][1] != "plain":  # weights normalised over the global batch
        assert float(gathered(ranks, name, 0, "weights").sum()) == pytest.approx(B)


@pytest.mark.parametrize("name", ["transformer/gasw", "transformer/gasw-mp", "transformer/plain"])
def test_p_grad_is_a_shard_like_fsdps_own(ranks, name):
    """p.grad is a DTensor with its parameter's placements, dtype (float32 master weights under
    mixed precision) and local shape: this rank's part only, never the full gradient."""
    for r in ranks:
        for n, (param, grad) in r[name]["steps"][0]["layout"].items():
            assert param[0] == grad[0] == "DTensor", (n, param, grad)
            assert grad[1:] == param[1:] and param[1] == ("Shard(dim=0)",), (n, param, grad)
    weight = "blocks.0.fc1.weight"  # (32, 16) on 2 ranks: 16 rows each
    assert [r[name]["steps"][0]["layout"][weight][1][3] for r in ranks] == [(16, 16), (16, 16)]
    pos = "pos"                     # (1, 6, 16): one row, so rank 1 holds none of it
    assert [r[name]["steps"][0]["layout"][pos][1][3] for r in ranks] == [(1, 6, 16), (0, 6, 16)]


def test_gaga_accumulates_shards(ranks):
    ref = sc.gaga_run(False)
    assert ref["samples"] and len(ref["means"]) >= 2
    for r in ranks:
        got = r["gaga"]
        assert got["samples"] == ref["samples"]
        np.testing.assert_allclose(got["snr"], ref["snr"], rtol=1e-4)
        for m_got, m_ref in zip(got["means"], ref["means"]):
            for n in m_ref:
                close(m_got[n], m_ref[n])


def test_gwa_with_a_sharded_head(ranks):
    ref = sc.gwa_run(False)
    for r in ranks:
        got = r["gwa"]
        np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-5)
        np.testing.assert_allclose(got["epoch_scores"], ref["epoch_scores"], rtol=1e-3)
        order_g = np.lexsort((got["sample_scores"]["sample_id"], got["sample_scores"]["epoch"]))
        order_r = np.lexsort((ref["sample_scores"]["sample_id"], ref["sample_scores"]["epoch"]))
        np.testing.assert_array_equal(got["sample_scores"]["sample_id"][order_g],
                                      ref["sample_scores"]["sample_id"][order_r])
        np.testing.assert_allclose(got["sample_scores"]["score"][order_g], ref["sample_scores"]["score"][order_r],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["closed_form", "autograd"])
def test_gvr_under_fsdp_averages_each_ranks_penalty(ranks, mode):
    """As under DDP: FSDP's reduce-scatter averages each rank's gradient of its own total (for
    autograd, through the double backward, whose parameters must outlive the first backward)."""
    per_rank = [sc.gvr_run(mode, False, rank, WORLD) for rank in range(WORLD)]  # one process per part
    for r in ranks:
        for n in per_rank[0]:
            close(r[f"gvr/{mode}"][n], (per_rank[0][n] + per_rank[1][n]) / WORLD)


@pytest.mark.parametrize("case, words", [
    ("tensor_parallel", ["no fully_shard module owns", "tensor parallel", "not supported yet"]),
    ("hsdp", ["2-D mesh", "HSDP", "not supported yet"]),
    ("other_group", ["process_group has ranks [0]", "mesh of ranks [0, 1]"]),
    ("late", ["sharded (fully_shard) after this engine was created", "after fully_shard"]),
])
def test_refused_models_say_why(ranks, case, words):
    message = ranks[0]["refusals"][case]
    assert message is not None and message.startswith("ShardingError"), message
    for word in words:
        assert word in message, message
