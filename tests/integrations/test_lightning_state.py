"""The Lightning callback's state across checkpoints and fits, sample ids without given ids, and
the misuses that used to fail deep inside Lightning or torch."""
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

import gradalign as ga  # noqa: E402
import tests.support.lightning_modules as lm  # noqa: E402
from gradalign.integrations.lightning import GWAEarlyStopping, PerSampleTraining  # noqa: E402


def checkpointing_trainer(callbacks, folder, max_epochs):
    last = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=-1, every_n_epochs=1)
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[*callbacks, last], devices=1)


class Interrupt(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_resumed_fit_restores_history_patience_and_best_epoch(tmp_path):
    """fit(ckpt_path=...) used to restart the callback's history: best_epoch 1 instead of 3."""
    whole = GWAEarlyStopping("head", mode="finetune", patience=3, skip_epochs=0)
    module = lm.Plain()
    checkpointing_trainer([whole], tmp_path / "whole", 6).fit(module, lm.loader())
    expected = {k: v.clone() for k, v in module.state_dict().items()}

    first = GWAEarlyStopping("head", mode="finetune", patience=3, skip_epochs=0)
    with pytest.raises(RuntimeError, match="interrupted"):               # killed at the start of epoch 3
        checkpointing_trainer([first, Interrupt(3)], tmp_path / "part", 6).fit(lm.Plain(), lm.loader())
    assert len(first.monitor.epoch_scores) == 3
    resumed, module = GWAEarlyStopping("head", mode="finetune", patience=3, skip_epochs=0), lm.Plain()
    checkpointing_trainer([resumed], tmp_path / "part", 6).fit(module, lm.loader(),
                                                               ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    np.testing.assert_allclose(resumed.monitor.epoch_scores, whole.monitor.epoch_scores, rtol=1e-6)
    assert (resumed.best_epoch, resumed.stopped_epoch) == (whole.best_epoch, whole.stopped_epoch)
    for key, values in whole.monitor.sample_scores().items():
        np.testing.assert_allclose(resumed.monitor.sample_scores()[key], values, rtol=1e-6)
    for k, v in module.state_dict().items():                          # the selected epoch's weights restored
        torch.testing.assert_close(v, expected[k])


def test_callback_state_loads_with_weights_only(tmp_path):
    callback = GWAEarlyStopping("head")
    lm.trainer([callback], devices=1).fit(lm.Plain(), lm.loader())
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["monitor"]["epoch_scores"] == pytest.approx(callback.monitor.epoch_scores, nan_ok=True)


def test_second_fit_continues_or_starts_afresh_explicitly():
    """A second fit with the same callback used to drop the first fit's epochs silently."""
    callback = GWAEarlyStopping("head", restore_best=False)
    trainer, module = lm.trainer([callback], devices=1), lm.Plain()
    trainer.fit(module, lm.loader())
    first = list(callback.monitor.epoch_scores)
    trainer.fit_loop.max_epochs = lm.EPOCHS + 2                        # the same trainer goes on: one history
    trainer.fit(module, lm.loader())
    assert len(callback.monitor.epoch_scores) == lm.EPOCHS + 2 and callback.monitor.epoch_scores[:lm.EPOCHS] == first
    assert callback.previous_fits == []
    with pytest.warns(RuntimeWarning, match="starts a new history"):  # a new trainer from epoch 0: a new one
        lm.trainer([callback], devices=1).fit(lm.Plain(), lm.loader())
    assert len(callback.monitor.epoch_scores) == lm.EPOCHS
    assert len(callback.previous_fits) == 1 and len(callback.previous_fits[0]["epoch_scores"]) == lm.EPOCHS + 2
    assert callback.previous_fits[0]["epoch_scores"][:lm.EPOCHS] == first


def test_sample_ids_without_given_ids_are_positions_in_each_epoch():
    """Without ids the running count went on across epochs (ids 32..63 in the second epoch)."""
    x, y, _ = lm.data()
    callback = GWAEarlyStopping("head", restore_best=False)
    lm.trainer([callback], devices=1).fit(lm.Plain(), DataLoader(TensorDataset(x, y), batch_size=lm.BATCH))
    table = callback.monitor.sample_scores()
    for epoch in range(lm.EPOCHS):
        assert table["sample_id"][table["epoch"] == epoch].tolist() == list(range(lm.N))


def test_head_by_a_name_the_module_does_not_have_lists_the_linear_modules():
    with pytest.raises(ga.GradAlignError, match=r"no submodule 'classifier'.*\['body.0', 'head'\]"):
        lm.trainer([GWAEarlyStopping("classifier")], devices=1).fit(lm.Plain(), lm.loader())


def test_per_sample_training_under_automatic_optimisation_is_refused():
    """It used to fail with "backward through the graph a second time", or never train."""
    class Automatic(lm.Plain):
        def on_fit_start(self):
            self.per_sample = PerSampleTraining(self)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ga.GradAlignError, match="manual optimisation.*automatic_optimization = False"):
            lm.trainer([], devices=1).fit(Automatic(), lm.loader())
