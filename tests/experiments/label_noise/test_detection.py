"""Mislabel detection on hand-checkable inputs: forgetting events, AUM, precision at k, ranking
directions, dropping; and the signals step that records them during training."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradalign.experiments.label_noise import detection
from gradalign.experiments.label_noise import DropRule as Rule, drop_rules as rules, dropped
from gradalign.experiments.config import parse_config
from gradalign.experiments.data import make_mnist1d
from gradalign.experiments.label_noise import (SIGNALS, detect, forgetting_events, most_suspect, precision_at_k,
                                             scores)
from gradalign.experiments.stats import auroc
from gradalign.experiments.method_table.recording import dense, margins
from gradalign.experiments.training import train_run


def test_forgetting_events_by_hand():
    correct = np.array([
        [1, 0, 1, 0],      # learned, forgotten twice
        [0, 0, 0, 0],      # never learned: passes + 1 = 5
        [1, 1, 1, 1],      # learned, never forgotten
        [0, 1, 1, 0],      # learned at pass 1, forgotten once at the end
        [1, -1, 0, -1],    # a missed pass: correct -> (missed) -> incorrect is one event
        [-1, 0, 1, 1],     # not visited at first, learned at pass 2
    ])
    f = forgetting_events(correct)
    assert f[:, -1].tolist() == [2, 5, 0, 1, 1, 0]
    assert f[0].tolist() == [0, 1, 1, 2]
    assert f[1].tolist() == [2, 3, 4, 5]                    # not yet learned by pass t: t + 2 > any count
    assert f[5].tolist() == [1, 2, 0, 0]                    # 1 = (0 passes seen) + 1, then (1 seen) + 1


def test_margins_and_aum_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    assert margins(logits, y).tolist() == [1.5, -3.0, 0.0]
    margin = np.array([[1.0, 3.0], [-2.0, 0.0], [np.nan, 4.0]])     # a missed pass is left out of the mean
    _, aum = scores("aum", {"margin": margin})
    assert aum.tolist() == [-2.0, 1.0, -4.0]                         # suspicion = -AUM (low AUM = suspect)


def test_precision_at_k_with_ties():
    s = np.array([3.0, 2.0, 2.0, 1.0])
    assert precision_at_k(s, [1, 1, 0, 0]) == 0.75                  # one slot for two tied samples, one flipped
    assert precision_at_k(s, [1, 0, 0, 1]) == 0.5
    assert precision_at_k(s, [1, 0, 0, 0]) == 1.0
    assert precision_at_k(np.zeros(4), [1, 0, 0, 0]) == 0.25        # all tied: the base rate
    assert precision_at_k(s, [0, 0, 0, 1], k=4) == 0.25
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(s, [0, 0, 0, 0])


def _records(n=40, e=3, seed=0):
    """Records in which every signal separates the flipped samples (the first quarter) by its direction."""
    rng = np.random.default_rng(seed)
    flipped = np.arange(n) < n // 4
    sign = np.where(flipped, 1.0, -1.0)[:, None]
    noise = lambda: 0.1 * rng.standard_normal((n, e))  # noqa: E731
    return {"sample_id": np.arange(n) + 100, "flipped": flipped,
            "loss": 1 + sign + noise(), "grad_norm": 1 + sign + noise(), "cosine": -sign + noise(),
            "cosine_loo": -sign + noise(),
            "margin": -sign + noise(), "gwa": -0.1 * sign + 0.01 * noise(),
            "correct": np.where(flipped[:, None], np.array([[1, 0, 0]]), np.array([[1, 1, 1]]))[:, :e].astype(np.int8)}


def test_ranking_directions():
    """One table says which raw values are suspect; each signal's score ranks the flipped first."""
    assert {n: s.suspect for n, s in SIGNALS.items()} == {
        "loss": "high", "grad_norm": "high", "cosine": "low", "cosine_loo": "low", "aum": "low", "forgetting": "high",
        "gwa": "low"}
    rec = _records()
    found = detect(rec)
    for name in SIGNALS:
        per_epoch, overall = scores(name, rec)
        assert auroc(overall, rec["flipped"]) == 1.0, name
        assert found[name]["auroc"] == 1.0 and found[name]["precision"] == 1.0, name
        assert found[name]["auroc_best"] == max(found[name]["auroc_epochs"])
    # forgetting: flipped samples are forgotten from pass 1 on; at pass 0 nothing separates them
    assert found["forgetting"]["auroc_epochs"][0] == 0.5 and found["forgetting"]["auroc_best_epoch"] == 1
    assert detect({**rec, "flipped": np.zeros(40, bool)}) == {}
    older = {k: v for k, v in rec.items() if k != "cosine_loo"}               # records made before a signal existed
    assert set(detect(older)) == set(SIGNALS) - {"cosine_loo"}


def test_most_suspect_and_drop_rules():
    s = np.array([0.5, 3.0, np.nan, 3.0, 1.0, 0.0, 3.0, 2.0, -1.0, 0.2])
    top = most_suspect(s, 0.2, seed=0)
    assert len(top) == 2 and set(top) <= {1, 3, 6}                  # the tied top three, in a seeded order
    assert np.array_equal(top, most_suspect(s, 0.2, seed=0))
    assert set(np.concatenate([most_suspect(s, 0.2, seed=k) for k in range(20)])) == {1, 3, 6}
    assert most_suspect(s, 1.0, seed=0)[-1] == 2                     # nan ranks last
    rec = _records()
    assert np.array_equal(dropped(Rule("oracle", None, None), rec, 0), np.arange(10) + 100)
    assert np.array_equal(dropped(Rule("loss-0.25", "loss", 0.25), rec, 0), np.arange(10) + 100)
    rand = dropped(Rule("random-0.25", "random", 0.25), rec, 0)
    assert len(rand) == 10 and np.array_equal(rand, np.sort(rand))
    cfg = {"drop_fractions": [0.1, 0.2], "drop_signals": ["aum", "random"], "oracle": True}
    assert [r.name for r in rules(cfg)] == ["aum-0.1", "aum-0.2", "random-0.1", "random-0.2", "oracle"]
    assert rules({**cfg, "drop_fractions": []}) == []


def test_dense_records_from_visits():
    ids = np.array([5, 3, 3, 5, 9])                                   # 9 seen once, in its first pass
    uniq, m = dense(ids, {"v": np.array([1.0, 2.0, 3.0, 4.0, 5.0])}, {"v": np.nan})
    assert uniq.tolist() == [3, 5, 9]
    assert np.array_equal(m["v"], np.array([[2.0, 3.0], [1.0, 4.0], [5.0, np.nan]]), equal_nan=True)


def test_signals_step_records_and_updates_like_the_baseline():
    splits = make_mnist1d(num_samples=200, seed=42, label_noise=0.2, noise_seed=1)
    cfg = parse_config({"name": "t", "data": {"num_samples": 200}, "train": {"epochs": 3, "batch_size": 16},
                        "arms": [{"name": "s", "method": "signals", "params": {"lr": 3e-3}}]})
    arm = cfg.arm("s")
    run = train_run(cfg, arm, None, 0, splits)
    plain = train_run(cfg, replace(arm, method="baseline"), None, 0, splits)
    assert [r["train_loss"] for r in run.rows] == pytest.approx([r["train_loss"] for r in plain.rows], rel=1e-5)
    assert plain.records == {}
    rec = run.records
    n = len(splits.train_full)
    assert rec["sample_id"].tolist() == list(range(n))
    for key in ("loss", "grad_norm", "cosine", "cosine_loo", "margin", "gwa", "correct"):
        assert rec[key].shape == (n, 3) and np.isfinite(rec[key]).all(), key
    assert np.array_equal(rec["label"], splits.train_full.y.numpy())
    assert rec["flipped"].sum() == len(splits.flipped_ids) and np.array_equal(np.flatnonzero(rec["flipped"]),
                                                                              splits.flipped_ids.numpy())
    assert np.array_equal(rec["clean_label"][rec["flipped"]], splits.flipped_clean.numpy())
    assert np.array_equal(rec["correct"] == 1, rec["margin"] > 0)
    assert (rec["loss"] > 0).all() and (rec["grad_norm"] > 0).all() and (np.abs(rec["cosine"]) <= 1 + 1e-5).all()
    # the first pass of each sample: loss and margin of the initial model's forward agree
    assert np.corrcoef(rec["loss"][:, 0], -rec["margin"][:, 0])[0, 1] > 0.8
    assert run.summary["noise"] == {"kind": "symmetric", "rate": 0.2, "flipped": len(splits.flipped_ids)}
    assert set(run.summary["memorisation"]) == {"flipped_acc_noisy", "flipped_acc_clean", "clean_train_acc"}


def test_signals_records_match_the_engine_and_the_loss():
    """Loss, norm and cosine of one recorded batch against a direct computation at the same weights."""
    import gradalign as ga
    from gradalign.experiments.models import build_model
    from gradalign.experiments.method_table import RecordingStep as SignalStep
    from gradalign.experiments.training import Optimizer

    torch.manual_seed(0)
    model = build_model("mlp", hidden=16)
    ref = build_model("mlp", hidden=16)
    ref.load_state_dict(model.state_dict())
    x, y, ids = torch.randn(8, 40), torch.randint(0, 10, (8,)), torch.arange(8)
    p = {"lr": 1e-3, "weight_decay": 0.0, "momentum": 0.0, "batch_size": 8, "augment": False}
    monitor = ga.GWAMonitor(model.head)
    step = SignalStep(model, Optimizer(model, "adam", "none", p, 8), monitor, p, {})
    step(x, y, ids, 8)
    monitor.end_epoch()
    rec = step.records()
    step.close()
    monitor.remove()
    losses = F.cross_entropy(ref(x), y, reduction="none")
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(l, list(ref.parameters()), retain_graph=True)])
             for l in losses]
    g = torch.stack(grads)
    mean = g.mean(0)
    assert np.allclose(rec["loss"][:, 0], losses.detach().numpy(), atol=1e-6)
    assert np.allclose(rec["grad_norm"][:, 0], g.norm(dim=1).numpy(), rtol=1e-4)
    assert np.allclose(rec["cosine"][:, 0], (F.cosine_similarity(g, mean[None], dim=1)).numpy(), atol=1e-4)
    others = (8 * mean[None] - g) / 7                                       # the mean of the other samples
    assert np.allclose(rec["cosine_loo"][:, 0], (F.cosine_similarity(g, others, dim=1)).numpy(), atol=1e-4)
    assert detection.SIGNALS["cosine"].record == "cosine"
