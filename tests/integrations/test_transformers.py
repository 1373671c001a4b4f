"""gradalign.integrations.transformers with real transformers.Trainer runs on tiny models built
from configs (no downloads): PerSampleTrainer's steps against gradients of the model's own loss
on one sample at a time, GAGA, gradient accumulation, bf16 autocast, fp16's GradScaler, the
GWA callback, resuming from a checkpoint, and 2 processes (torchrun, gloo) against one."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import BertForMaskedLM, Trainer  # noqa: E402

import gradalign as ga  # noqa: E402
import tests.support.hf_models as hf  # noqa: E402
from gradalign.integrations.transformers import GWACallback, PerSampleTrainer  # noqa: E402
from gradalign.integrations.transformers.gwa import GWA_FILE  # noqa: E402
from gradalign.integrations.transformers.trainer import STATE_FILE  # noqa: E402


def weighted_grad(G, weights, max_norm=0.0):
    g = (weights[:, None] * G).mean(0)
    if max_norm:
        g = g * min(1.0, max_norm / (float(g.norm()) + 1e-6))     # torch's clip_grad_norm_
    return g


def entropy(w):
    p = w.double() / w.sum()
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum() / math.log(len(w)))


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_gasw_step_on_bert_equals_the_hand_computed_weighted_step(tmp_path, max_norm):
    model, ref, rows = hf.bert(), hf.bert(), hf.classification_data()[:8]
    grads, gasw = hf.GradRecorder(), ga.GASW(2.0)
    trainer = PerSampleTrainer(model=model, args=hf.arguments(tmp_path, max_steps=1, max_grad_norm=max_norm),
                               train_dataset=rows, weighting=gasw, callbacks=[grads])
    trainer.train()
    G = hf.per_sample_grads(ref, rows)
    w = hf.gasw_weights(G)
    assert (w == 0).any() and not torch.allclose(w, torch.ones(8))              # the weighting matters here
    expected = weighted_grad(G, w, max_norm)
    torch.testing.assert_close(grads.grads[0], expected, rtol=1e-4, atol=1e-7)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)                             # the same optimizer, by hand
    start = 0
    for p in ref.parameters():
        p.grad = expected[start:start + p.numel()].view_as(p).clone()
        start += p.numel()
    opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    log = trainer.state.log_history[0]
    assert log["gasw_weight_entropy"] == pytest.approx(entropy(w), rel=1e-4)
    assert log["gasw_zero_weight_fraction"] == float((w == 0).float().mean()) and log["gasw_fallbacks"] == 0
    assert gasw.steps == 1


def test_gasw_on_gpt2_language_model_with_padding(tmp_path):
    """Causal LM: token losses averaged per sample, -100 (padding) left out, labels shifted."""
    model, ref, rows = hf.gpt2(), hf.gpt2(), hf.lm_data()[:8]
    grads = hf.GradRecorder()
    PerSampleTrainer(model=model, args=hf.arguments(tmp_path, max_steps=1), train_dataset=rows,
                     weighting=ga.GASW(2.0), callbacks=[grads]).train()
    G = hf.per_sample_grads(ref, rows)             # GPT-2's own loss on each sample alone
    torch.testing.assert_close(grads.grads[0], weighted_grad(G, hf.gasw_weights(G)), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["none", "gdsw", "callable"])
def test_other_weightings_on_bert(tmp_path, kind):
    """None: the plain mean gradient; GDSW; a callable GradientStats -> (B,) weights."""
    model, ref, rows = hf.bert(), hf.bert(), hf.classification_data()[:8]
    weighting = {"none": None, "gdsw": ga.GDSW(2.0), "callable": lambda stats: 1.0 / stats.norms}[kind]
    grads = hf.GradRecorder()
    PerSampleTrainer(model=model, args=hf.arguments(tmp_path, max_steps=1), train_dataset=rows,
                     weighting=weighting, callbacks=[grads]).train()
    G = hf.per_sample_grads(ref, rows)
    if kind == "none":
        w = torch.ones(8)
    elif kind == "gdsw":
        gbar = G.mean(0)
        raw = (1 - G @ gbar / (G.norm(dim=1) * gbar.norm())) ** 2
        w = raw * 8 / raw.sum()
    else:
        w = 1.0 / G.norm(dim=1)
    torch.testing.assert_close(grads.grads[0], weighted_grad(G, w), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("task", ["masked_lm", "regression", "multi_label"])
def test_per_sample_losses_are_the_models_own_loss_on_each_sample(tmp_path, task):
    if task == "masked_lm":
        model, rows = hf.bert(head=BertForMaskedLM), hf.lm_data(masked=True)[:6]
    else:
        model = hf.bert()
        model.config.problem_type = "regression" if task == "regression" else "multi_label_classification"
        rows = hf.classification_data()[:6]
        g = torch.Generator().manual_seed(3)
        for r in rows:
            r["labels"] = (torch.randn(hf.CLASSES, generator=g) if task == "regression"
                           else (torch.rand(hf.CLASSES, generator=g) > 0.5).float())
    trainer = PerSampleTrainer(model=model, args=hf.arguments(tmp_path), train_dataset=rows)
    with torch.no_grad():
        losses = trainer.compute_per_sample_losses(model, hf.collate(rows))
        own = torch.stack([model(**{k: v[None] for k, v in r.items()}).loss for r in rows])
    torch.testing.assert_close(losses, own)


def test_gradient_accumulation_weights_each_micro_batch(tmp_path):
    """2 micro-batches of 4: each is weighted over itself, and adds half its weighted mean."""
    model, ref, rows = hf.bert(), hf.bert(), hf.classification_data()[:8]
    grads = hf.GradRecorder()
    PerSampleTrainer(model=model, args=hf.arguments(tmp_path, max_steps=1, per_device_train_batch_size=4,
                                                    gradient_accumulation_steps=2),
                     train_dataset=rows, weighting=ga.GASW(2.0), callbacks=[grads]).train()
    G = hf.per_sample_grads(ref, rows)
    halves = [weighted_grad(G[k:k + 4], hf.gasw_weights(G[k:k + 4])) for k in (0, 4)]
    torch.testing.assert_close(grads.grads[0], (halves[0] + halves[1]) / 2, rtol=1e-4, atol=1e-7)
    whole = weighted_grad(G, hf.gasw_weights(G))                       # not the choice made
    assert not torch.allclose(grads.grads[0], whole, rtol=1e-2, atol=1e-4)


def test_gaga_steps_only_when_the_accumulation_closes(tmp_path):
    model, ref, rows = hf.gpt2(), hf.gpt2(), hf.lm_data()
    grads = hf.GradRecorder()
    gaga = ga.GSNRAccumulator(tau=float("inf"), increment=4, max_samples=8)    # the cap: every 2 increments
    trainer = PerSampleTrainer(model=model, args=hf.arguments(tmp_path, max_steps=2, per_device_train_batch_size=4),
                               train_dataset=rows, accumulation=gaga, callbacks=[grads])
    trainer.train()
    assert grads.grads[0] is None and grads.grads[1] is not None               # increment 1: nothing to step on
    G = hf.per_sample_grads(ref, rows[:8])
    torch.testing.assert_close(grads.grads[1], G.mean(0), rtol=1e-4, atol=1e-7)
    assert gaga.samples_per_step == [8]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["gaga_optimizer_steps"] for entry in logged] == [0, 1]
    assert logged[1]["gaga_samples_per_step"] == 8 and logged[1]["gaga_snr"] == pytest.approx(gaga.snr_per_step[0])


def test_bf16_autocast_on_cpu(tmp_path):
    model, ref, rows = hf.bert(), hf.bert(), hf.classification_data()[:8]
    dtypes, grads = [], hf.GradRecorder()
    model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer = PerSampleTrainer(model=model, args=hf.arguments(tmp_path, max_steps=2, bf16=True),
                               train_dataset=hf.classification_data(), weighting=ga.GASW(2.0), callbacks=[grads])
    trainer.train()
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    G = hf.per_sample_grads(ref, rows)
    expected = weighted_grad(G, hf.gasw_weights(G))
    assert float(torch.nn.functional.cosine_similarity(grads.grads[0], expected, dim=0)) > 0.99
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_grad_scaler_gets_scaled_gradients_and_unscales_them(tmp_path):
    """fp16 on a GPU brings a GradScaler: the engine's p.grad must be as scaled as the scaler
    expects. Here a CPU GradScaler stands in for it (accelerate installs none on the CPU): the
    optimizer sees p.grad x 4096 and its step (the scaler unscales) is the hand-computed one."""
    model, ref, rows = hf.bert(), hf.bert(), hf.classification_data()[:8]
    grads = hf.GradRecorder()
    trainer = PerSampleTrainer(model=model, args=hf.arguments(tmp_path, max_steps=1), train_dataset=rows,
                               weighting=ga.GASW(2.0), callbacks=[grads])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)   # before train() prepares
    trainer.train()
    G = hf.per_sample_grads(ref, rows)
    expected = weighted_grad(G, hf.gasw_weights(G))
    torch.testing.assert_close(grads.grads[0], expected * 2.0 ** 12, rtol=1e-4, atol=1e-4)
    start = 0
    for p, q in zip(model.parameters(), ref.parameters()):
        step = expected[start:start + q.numel()].view_as(q)
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * step, rtol=1e-5, atol=1e-7)
        start += q.numel()


def test_gwa_callback_with_a_plain_trainer_matches_the_monitor_and_restores_the_best_epoch(tmp_path):
    model, ref, rows = hf.bert(), hf.bert(), hf.classification_data()
    callback = GWACallback(model.classifier, mode="scratch")
    trainer = Trainer(model=model, args=hf.arguments(tmp_path, num_train_epochs=4, eval_strategy="epoch"),
                      train_dataset=rows, eval_dataset=rows[:4], callbacks=[callback])
    callback.bind(trainer)                                  # the GWA numbers through trainer.log
    trainer.train()
    monitor, opt, states = ga.GWAMonitor(ref.classifier), torch.optim.SGD(ref.parameters(), lr=0.1), []
    for epoch in range(4):
        for k in (0, 8):
            batch = hf.collate(rows[k:k + 8])
            out = ref(**batch)
            out.loss.backward()
            monitor.update(out.logits, batch["labels"], torch.arange(8))
            opt.step()
            opt.zero_grad()
        monitor.end_epoch()
        states.append([p.detach().clone() for p in ref.parameters()])
    np.testing.assert_allclose(callback.monitor.epoch_scores, monitor.epoch_scores, rtol=1e-5)
    logged = [entry for entry in trainer.state.log_history if "gwa" in entry]
    assert [entry["epoch"] for entry in logged] == [1, 2, 3, 4]
    np.testing.assert_allclose([entry["gwa"] for entry in logged], monitor.epoch_scores, rtol=1e-5)
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 4          # evaluation still runs
    assert callback.best_epoch == monitor.best_epoch("scratch") == logged[-1]["gwa_best_epoch"] != 3
    for p, q in zip(model.parameters(), states[callback.best_epoch]):                     # the selected weights
        torch.testing.assert_close(p.detach(), q)


def test_gwa_callback_stops_by_patience(tmp_path):
    model = hf.bert()
    callback = GWACallback("classifier", patience=1, skip_epochs=0, restore_best=False)
    rows = hf.classification_data()
    trainer = PerSampleTrainer(model=model, args=hf.arguments(tmp_path, num_train_epochs=20, learning_rate=0.5,
                                                              eval_strategy="epoch"),
                               train_dataset=rows, eval_dataset=rows[:4], callbacks=[callback])
    trainer.train()
    scores = callback.monitor.epoch_scores
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == len(scores)
    assert callback.stopped_epoch == len(scores) - 1 < 19 and trainer.state.epoch == len(scores)
    assert scores[-1] <= max(scores[:-1])                   # the last epoch did not improve
    assert [e["gwa"] for e in trainer.state.log_history if "gwa" in e] == pytest.approx(scores)


@pytest.mark.parametrize("method", ["gasw", "gaga"])
def test_resumed_checkpoint_equals_an_uninterrupted_run(tmp_path, method):
    """Checkpoints every 3 steps (mid-epoch: 2 steps per epoch; mid-accumulation for GAGA);
    resuming from step 3 of 5 ends where the uninterrupted run ends, GWA included."""
    def run(out, resume=None):
        model = hf.bert()
        kw = {"weighting": ga.GASW(2.0)} if method == "gasw" else {
            "accumulation": ga.GSNRAccumulator(tau=float("inf"), increment=8, max_samples=16)}
        gwa = GWACallback(model.classifier, skip_epochs=0)
        trainer = PerSampleTrainer(model=model, args=hf.arguments(out, max_steps=5, save_strategy="steps",
                                                                  save_steps=3, optim="adamw_torch",
                                                                  learning_rate=0.01, lr_scheduler_type="linear"),
                                   train_dataset=hf.classification_data(), callbacks=[gwa], **kw)
        trainer.train(resume_from_checkpoint=resume)
        return model, gwa, kw
    model, gwa, kw = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / STATE_FILE).exists() and (checkpoint / GWA_FILE).exists()
    resumed, gwa2, kw2 = run(tmp_path / "b", resume=str(checkpoint))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    np.testing.assert_allclose(gwa2.monitor.epoch_scores, gwa.monitor.epoch_scores, rtol=1e-6)
    assert gwa2.best_epoch == gwa.best_epoch
    if method == "gasw":
        assert kw2["weighting"].steps == kw["weighting"].steps == 5
    else:
        assert kw2["accumulation"].samples_per_step == kw["accumulation"].samples_per_step == [16, 16]
        assert kw2["accumulation"].n == kw["accumulation"].n == 8


def test_two_processes_give_the_numbers_of_one(tmp_path):
    """torchrun, 2 processes x 4 samples (gloo, DDP) against one process x 8: GASW with the
    GWA callback, and GAGA on GPT-2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           hf.__file__, str(tmp_path / "ddp"), "4"], capture_output=True, text=True, timeout=240,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    hf.data_parallel_runs(str(tmp_path / "one"), 8)
    two, one = (torch.load(tmp_path / d / "result.pt", weights_only=False) for d in ("ddp", "one"))
    assert two["gasw"]["world"] == 2 and one["gasw"]["world"] == 1
    for run in ("gasw", "gaga"):
        for name, value in one[run]["params"].items():
            torch.testing.assert_close(two[run]["params"][name], value, rtol=1e-5, atol=1e-6, msg=f"{run} {name}")
    np.testing.assert_allclose(two["gasw"]["gwa"], one["gasw"]["gwa"], rtol=1e-5)
    keys = ("loss", "gasw_weight_entropy", "gasw_zero_weight_fraction", "gwa")
    for a, b in zip(two["gasw"]["log"], one["gasw"]["log"]):
        for key in keys:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
    assert two["gaga"]["samples"] == one["gaga"]["samples"] == [16, 16]


def test_bad_settings_are_refused(tmp_path):
    model, rows = hf.bert(), hf.classification_data()
    gaga = ga.GSNRAccumulator(increment=8, max_samples=16)
    with pytest.raises(ValueError, match="not both"):
        PerSampleTrainer(model=model, args=hf.arguments(tmp_path), train_dataset=rows,
                         weighting=ga.GASW(), accumulation=gaga)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        PerSampleTrainer(model=model, args=hf.arguments(tmp_path, gradient_accumulation_steps=2),
                         train_dataset=rows, accumulation=gaga)
    with pytest.raises(ValueError, match="increment=8"):
        PerSampleTrainer(model=model, args=hf.arguments(tmp_path, per_device_train_batch_size=4),
                         train_dataset=rows, accumulation=gaga)
    with pytest.raises(ga.GradAlignError, match="label_smoothing_factor"):
        PerSampleTrainer(model=model, args=hf.arguments(tmp_path, label_smoothing_factor=0.1), train_dataset=rows)
    trainer = PerSampleTrainer(model=model, args=hf.arguments(tmp_path), train_dataset=rows, weighting=ga.GASW())
    with pytest.raises(ga.GradAlignError, match=STATE_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    trainer = PerSampleTrainer(model=model, args=hf.arguments(tmp_path, max_steps=2), train_dataset=rows,
                               callbacks=[GWACallback(model.classifier, label_key="targets")])
    with pytest.raises(ga.GradAlignError, match="'targets' keyword"):
        trainer.train()
