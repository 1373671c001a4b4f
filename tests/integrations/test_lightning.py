"""gradalign.integrations.lightning with a real lightning.Trainer on CPU: the GWA callback and
GASW through PerSampleTraining against plain loops, on one device and under strategy="ddp"
with 2 processes."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

pytest.importorskip("lightning")
import gradalign as ga  # noqa: E402
import tests.support.lightning_modules as lm  # noqa: E402
from gradalign.integrations.lightning import GWAEarlyStopping  # noqa: E402


def reference(gasw: bool, shards: int = 1):
    """A plain loop over the global batches Lightning forms: with `shards` ranks, the global
    batch k is every rank's k-th batch from the DistributedSampler Lightning puts in (shuffled
    with seed 0 and the epoch, as Lightning's training loop sets it)."""
    body, head = lm.net()
    model = torch.nn.Sequential(body, head)
    x, y, ids = lm.data()
    samplers = [DistributedSampler(range(lm.N), num_replicas=shards, rank=r, shuffle=True, seed=0)
                for r in range(shards)]
    opt = torch.optim.SGD(model.parameters(), lr=lm.LR)
    monitor = ga.GWAMonitor(head)
    engine = ga.PerSampleGradients(model) if gasw else None
    weighting = ga.GASW(gamma=2.0)
    states = []
    for epoch in range(lm.EPOCHS):
        order = [torch.arange(lm.N)] if shards == 1 else []
        for sampler in samplers if shards > 1 else []:
            sampler.set_epoch(epoch)
            order.append(torch.tensor(list(sampler)))
        for k in range(lm.N // shards // lm.BATCH):
            idx = torch.cat([o[k * lm.BATCH:(k + 1) * lm.BATCH] for o in order])
            logits = model(x[idx])
            if gasw:
                engine.backward(F.cross_entropy(logits, y[idx], reduction="none"), weights=weighting)
            else:
                F.cross_entropy(logits, y[idx]).backward()
            monitor.update(logits.detach(), y[idx], ids[idx])
            opt.step()
            opt.zero_grad()
        monitor.end_epoch()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, monitor, states


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_gwa_callback_matches_a_plain_loop_and_restores_the_selected_epoch():
    module, callback = lm.Plain(), GWAEarlyStopping("head", mode="finetune", restore_best=True)
    lm.trainer([callback], devices=1).fit(module, lm.loader())
    _, monitor, states = reference(gasw=False)
    np.testing.assert_allclose(callback.monitor.epoch_scores, monitor.epoch_scores, rtol=1e-6)
    assert callback.best_epoch == monitor.best_epoch("finetune")
    best = states[callback.best_epoch]
    torch.testing.assert_close(params(module), torch.cat([best[k].flatten() for k in best]))


def test_gwa_callback_stops_by_patience():
    module, callback = lm.Plain(), GWAEarlyStopping("head", patience=1, skip_epochs=0, restore_best=False)
    trainer = lm.trainer([callback], max_epochs=20, devices=1)
    trainer.fit(module, lm.loader())
    scores = callback.monitor.epoch_scores
    assert callback.stopped_epoch == len(scores) - 1 < 19 and trainer.current_epoch == len(scores)
    assert scores[-1] <= max(scores[:-1])                     # the last epoch did not improve


def test_gasw_in_a_lightning_module_matches_the_engine_loop():
    module = lm.WithGASW()
    lm.trainer([], devices=1).fit(module, lm.loader())
    model, _, _ = reference(gasw=True)
    torch.testing.assert_close(params(module), params(model))
    assert module.gasw.steps == lm.EPOCHS * lm.N // lm.BATCH


def test_ddp_strategy_two_processes(tmp_path):
    out = tmp_path / "rank0.pt"
    script = Path(lm.__file__)
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    model, monitor, _ = reference(gasw=True, shards=2)
    lightning_names = {"0.0.": "body.0.", "1.": "head."}            # Sequential(body, head) -> the module's
    for name, value in model.state_dict().items():                  # GASW over the global batch of 16
        prefix = next(p for p in lightning_names if name.startswith(p))
        torch.testing.assert_close(got["state"][lightning_names[prefix] + name[len(prefix):]], value,
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["scores"], monitor.epoch_scores, rtol=1e-4)    # gathered over ranks
    assert sorted(got["sample_scores"]["sample_id"][got["sample_scores"]["epoch"] == 0]) == list(range(lm.N))
