"""PerSampleTrainer: a transformers.Trainer whose training step forms p.grad through the engine.

One training step (one micro-batch) does:

    losses = compute_per_sample_losses(model, inputs)           # (B,), the model called as the Trainer does
    weighting:    engine.backward(losses, weighting)            # p.grad += (1/B) sum_i w_i g_i / n_micro
    accumulation: engine.backward(losses, write_grad=False)     # statistics only
                  if GAGA closes: engine.set_grad(mean over the accumulation)

and everything after it is the Trainer's own: `max_grad_norm` clips the weighted gradient, the
optimizer and scheduler step, checkpoints, evaluation and logging run as usual.

`gradient_accumulation_steps` = n > 1: the weights are formed over each MICRO-batch (its own
cosines to its own mean gradient, normalised to sum to its own B), and each micro-batch adds
1/n of its weighted mean gradient, as the Trainer scales each micro-batch's loss by 1/n. Over
the whole accumulated batch would need every micro-batch's per-sample factors at once, the
memory accumulation exists to avoid. GAGA is itself gradient accumulation and refuses n > 1;
under GAGA a Trainer step is one increment: `global_step`, `max_steps` and the scheduler
count increments (samples seen), and the optimizer moves only when GAGA closes an
accumulation (otherwise p.grad stays None, which every torch optimizer skips).

Trainer internals used (transformers 5.x), each in one place: `_prepare_inputs` (moving the
batch to the device), `current_gradient_accumulation_steps` (the micro-batches of the current
step, set by the Trainer's loop), and `_save_checkpoint` / `_get_output_dir` (the checkpoint
folder the method's state is written into).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

import gradalign as ga
from gradalign.engine.distributed import active_group
from gradalign.errors import GradAlignError
from gradalign.integrations.transformers.diagnostics import MethodLog
from gradalign.integrations.transformers.gwa import GWACallback
from gradalign.integrations.transformers.losses import is_causal_lm, per_sample_losses, problem_type

STATE_FILE = "gradalign_state.pt"   # the method's state inside each checkpoint folder


class MicroBatchShare:
    """`weights(stats) / n`: each of n micro-batches adds 1/n of its weighted mean gradient.
    Declares what the wrapped weighting reads (`needs`), so the engine prepares the same."""

    def __init__(self, weights: Callable[[ga.GradientStats], Tensor], n: int):
        self.weights, self.n = weights, n
        self.needs = getattr(weights, "needs", frozenset())
        self.finite_weights = getattr(weights, "finite_weights", False)

    def __call__(self, stats: ga.GradientStats) -> Tensor:
        return self.weights(stats) / self.n


class PerSampleTrainer(Trainer):
    """A `transformers.Trainer` whose training step forms p.grad through the engine.

    It takes every argument of `transformers.Trainer`, and the ones below. Each micro-batch:
    per-sample losses (`compute_per_sample_losses`), then `engine.backward(losses, weighting)`
    (p.grad += (1/B) sum_i w_i g_i / n for n micro-batches per step: weights over each
    micro-batch), or with `accumulation` the statistics only, and GAGA's accumulated mean
    written when it closes. Under GAGA a Trainer step is one increment (global_step and the
    scheduler count increments) and the optimizer moves only when GAGA closes an
    accumulation. The rest (clipping, optimizer, scheduler, evaluation, checkpoints with the
    method's state, logs with the method's numbers) is the Trainer's.

    Args:
        weighting: None (the plain mean gradient, through the engine), ga.GASW(...),
            ga.GDSW(...) or any callable GradientStats -> (B,) weights.
        accumulation: a ga.GSNRAccumulator (GAGA); its `increment` must equal the samples of
            one Trainer step (per_device_train_batch_size x processes).
        release: free each layer's per-sample factors once its part of p.grad is written
            (the step's memory then peaks as a plain backward's); not with accumulation.
        causal_lm: shift token labels (position t predicts token t + 1); default: the
            Trainer's own test (the model class is one of transformers' causal LMs).
        engine_options: keywords for ga.PerSampleGradients (registry, verify, ...).

    Attributes:
        engine: the ga.PerSampleGradients of the current train() call (None outside it).

    Data parallel (torchrun / `accelerate launch`): the engine gets the process group, so the
    cosines, weights and p.grad are those of the global batch, the same on every rank; the
    forward runs on the unwrapped model and DDP's reducer never runs (nothing is reduced twice).
    """

    def __init__(self, *args, weighting: Callable[[ga.GradientStats], Tensor] | None = None,
                 accumulation: ga.GSNRAccumulator | None = None, release: bool = True,
                 causal_lm: bool | None = None, engine_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weighting, self.accumulation = weighting, accumulation
        self.release, self.causal_lm = release and accumulation is None, causal_lm
        self.engine_options = dict(engine_options or {})
        self.engine: ga.PerSampleGradients | None = None
        self._check_setup()
        self.method_log = MethodLog(weighting, accumulation)

    def _check_setup(self) -> None:
        """Refuse, with the fix, every setting the per-sample step cannot honour."""
        args = self.args
        if self.weighting is not None and self.accumulation is not None:
            raise ValueError("give weighting or accumulation, not both (GAGA accumulates plain per-sample gradients)")
        if self.weighting is not None and not callable(self.weighting):
            raise ValueError(f"weighting must be None, ga.GASW(...), ga.GDSW(...) or a callable GradientStats -> "
                             f"(B,) weights, got {type(self.weighting).__name__}")
        if args.n_gpu > 1:
            raise GradAlignError("nn.DataParallel (several GPUs in one process) replicates the model, which the "
                                 "engine cannot hook: launch one process per GPU (torchrun / accelerate launch)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise GradAlignError("PerSampleTrainer runs under DDP (torchrun / accelerate launch), not under the "
                                 "Trainer's DeepSpeed or FSDP (the engine serves FSDP2-sharded models in your own "
                                 "loop: see the sharded-models guide)")
        if args.label_smoothing_factor or self.compute_loss_func is not None:
            raise GradAlignError("label_smoothing_factor and compute_loss_func shape the Trainer's batch loss; "
                                 "PerSampleTrainer forms per-sample losses: override compute_per_sample_losses")
        if self.accumulation is None:
            return
        if not isinstance(self.accumulation, ga.GSNRAccumulator):
            raise ValueError(f"accumulation must be a ga.GSNRAccumulator, got {type(self.accumulation).__name__}")
        if args.gradient_accumulation_steps != 1:
            raise ValueError("GAGA is itself gradient accumulation: set gradient_accumulation_steps=1 and let "
                             "GSNRAccumulator(max_samples=...) bound the accumulated batch")
        if self.accelerator.scaler is not None:
            raise GradAlignError("fp16 with a GradScaler changes the loss scale between GAGA's increments: "
                                 "use bf16=True (or fp32) with accumulation")
        step = args.per_device_train_batch_size * max(1, args.world_size)
        if self.accumulation.increment != step:
            raise ValueError(f"GSNRAccumulator(increment={self.accumulation.increment}) but one Trainer step feeds "
                             f"{step} samples (per_device_train_batch_size {args.per_device_train_batch_size} x "
                             f"{max(1, args.world_size)} processes): make them equal")

    # ------------------------------------------------------------------ the training step

    def compute_per_sample_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """(B,) per-sample losses of one batch; override for other tasks.

        The model is called as the Trainer calls it (`model(**inputs)`, labels included, so
        its own loss is computed and left unused: a forward-only cost); the losses come from
        `outputs.logits` and `inputs["labels"]` (losses.per_sample_losses)."""
        outputs = model(**inputs)
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if logits is None:
            raise GradAlignError(f"{type(model).__name__} returned no 'logits': override "
                                 "PerSampleTrainer.compute_per_sample_losses(model, inputs) -> (B,) losses")
        labels = inputs.get("labels")
        shift = self.causal_lm if self.causal_lm is not None else is_causal_lm(model)
        problem = problem_type(model, logits, labels) if logits.dim() == 2 and labels is not None else None
        return per_sample_losses(logits, labels, shift=shift, problem=problem)

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """Forward, per-sample losses, p.grad through the engine; returns the batch's mean loss
        / n_micro for the Trainer's running loss (num_items_in_batch is not used: every sample
        has weight 1/B whatever its length, `ga.token_losses`)."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        module = self._engine_module(model)
        inputs = self._prepare_inputs(inputs)   # Trainer internal: the batch on the device
        with self.compute_loss_context_manager():
            losses = self.compute_per_sample_losses(module, inputs)
        del inputs
        # Trainer internal, set by its loop for every optimizer step: the micro-batches in this one
        n = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if self.accumulation is not None:
            self._accumulate(losses)
        else:
            self._weighted(losses, n)
        return losses.detach().mean() / n

    def _weighted(self, losses: Tensor, n: int) -> None:
        if n == 1:
            weights = self.weighting
        elif self.weighting is None:
            weights = torch.full(losses.shape, 1.0 / n, device=losses.device)
        else:
            weights = MicroBatchShare(self.weighting, n)
        scaler = self.accelerator.scaler          # fp16: p.grad as scaled as the GradScaler expects
        scaled = scaler.scale(losses) if scaler is not None else losses
        stats = self.engine.backward(scaled, weights, release=self.release)
        self.method_log.weighted_step(stats)

    def _accumulate(self, losses: Tensor) -> None:
        if self.accumulation.update(self.engine.backward(losses, write_grad=False)):
            self.engine.set_grad(self.accumulation.mean_grad())
        self.method_log.accumulation_step()

    def _engine_module(self, model: nn.Module) -> nn.Module:
        """The unwrapped model (its forward keeps accelerate's autocast), hooked by the engine,
        with the DDP process group when there is one."""
        module = self.accelerator.unwrap_model(model)
        if self.engine is None or self.engine.model is not module:
            if self.engine is not None:
                self.engine.remove()
            group = model.process_group if isinstance(model, nn.parallel.DistributedDataParallel) else active_group()
            self.engine = ga.PerSampleGradients(module, process_group=group, **self.engine_options)
        return module

    # ------------------------------------------------------------------ logs, checkpoints, train()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log; a training log ("loss", or the final "train_loss") also gets the
        method's numbers since the previous one (diagnostics.py). Every rank logs these at the
        same steps, so the one all-reduce they need is collective."""
        if "loss" in logs or "train_loss" in logs:
            group = self.engine.process_group if self.engine is not None else None
            logs.update(self.method_log.flush(group))
        super().log(logs, start_time)

    def method_state(self) -> dict:
        """What resuming needs of the method: the weighting's and the accumulator's state."""
        state = {}
        if hasattr(self.weighting, "state_dict"):
            state["weighting"] = self.weighting.state_dict()
        if self.accumulation is not None:
            state["accumulation"] = self.accumulation.state_dict()
        return state

    def load_method_state(self, checkpoint: str) -> None:
        """Restore method_state() from a checkpoint folder written by a PerSampleTrainer."""
        path = os.path.join(checkpoint, STATE_FILE)
        wanted = self.method_state()
        if not wanted:
            return
        if not os.path.isfile(path):
            raise GradAlignError(f"{checkpoint} has no {STATE_FILE}: it was not written by a PerSampleTrainer with "
                                 f"this method, so the method's state ({', '.join(wanted)}) cannot be restored")
        state = torch.load(path, map_location=self.args.device, weights_only=True)
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise GradAlignError(f"{path} holds no {', '.join(missing)} state: it was written for another method")
        if "weighting" in wanted:
            self.weighting.load_state_dict(state["weighting"])
        if "accumulation" in wanted:
            self.accumulation.load_state_dict(state["accumulation"])
        self.method_log = MethodLog(self.weighting, self.accumulation)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Trainer internal (transformers 5.x): the one method that writes a checkpoint folder, named
        # as it names it; the method's state is written first, so a folder the Trainer completed has it
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.method_state(), os.path.join(folder, STATE_FILE))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs):
        """Trainer.train; resuming also restores the method's state and every GWACallback's from
        the same checkpoint. The engine hooks the model for this call and is removed after it."""
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if checkpoint is not None:
            self.load_method_state(checkpoint)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GWACallback):
                callback.bind(self, checkpoint)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            if self.engine is not None:
                self.engine.remove()
                self.engine = None
