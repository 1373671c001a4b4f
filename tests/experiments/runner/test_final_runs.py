"""The one final-run function: final runs and clean-and-retrain runs are trained the same way, on
the experiment's device and with a checkpoint (the retrain used to run on the CPU without one)."""
import torch

import gradalign.experiments.runner.final_runs as final_runs
from gradalign.experiments.runner import reproduce

OVERRIDES = {"data.num_samples": 200, "train.epochs": 1, "experiment.noise_levels": [0.4],
             "noise.drop_signals": ["loss"], "noise.drop_fractions": [0.2]}


def test_final_and_retrain_runs_share_device_and_checkpoints(tmp_path, monkeypatch):
    calls = []
    real = final_runs.train_run

    def spy(config, arm, params, seed, splits, **kw):
        calls.append((arm.method, len(getattr(splits, arm.train_split)), kw["device"], kw["checkpoint"]))
        return real(config, arm, params, seed, splits, **kw)

    monkeypatch.setattr(final_runs, "train_run", spy)
    old = torch.get_num_threads()
    out = tmp_path / "run"
    reproduce("noise", out, quick=True, trials=0, seeds=1, overrides=OVERRIDES, progress=False, report=False,
              device="cpu")
    torch.set_num_threads(old)
    retrains = [c for c in calls if c[1] < 160]            # trained without the dropped samples
    assert len(retrains) == 2 and len(calls) > len(retrains)  # loss-0.2 and the oracle, after the final runs
    assert all(device == torch.device("cpu") for _, _, device, _ in calls)
    assert all(ckpt is not None for *_, ckpt in calls)
    folders = {str(ckpt.folder.relative_to(out)) for *_, ckpt in retrains}
    assert folders == {"checkpoints/clean/noise0.4/loss-0.2/seed0", "checkpoints/clean/noise0.4/oracle/seed0"}
    assert not (out / "checkpoints").exists()              # every checkpoint removed once its run was written
