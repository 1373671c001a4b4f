"""Hugging Face transformers: GASW/GDSW and GAGA in the Trainer, GWA as a callback.

`pip install "gradalign[transformers]"` (transformers and accelerate). Both work in one
process and under data parallel (`torchrun` or `accelerate launch --num_processes N`, DDP,
gloo on CPU), with the statistics of the global batch: the same numbers as one process on the
whole batch.

    from gradalign.integrations.transformers import GWACallback, PerSampleTrainer

    trainer = PerSampleTrainer(
        model=model, args=TrainingArguments(output_dir="out", report_to="none"),
        train_dataset=train,
        weighting=ga.GASW(gamma=2.0),              # or ga.GDSW(...), a callable, None
        # accumulation=ga.GSNRAccumulator(tau=0.1, increment=32, max_samples=512),   # GAGA
        callbacks=[GWACallback(head=model.classifier, mode="finetune", patience=3)],
    )
    trainer.train()

`PerSampleTrainer` (trainer.py): the training step forms p.grad through `ga.PerSampleGradients`
from per-sample losses (losses.py: sequence classification; causal/masked language modelling
and token classification through `ga.token_losses`, -100 labels left out); everything else is
the Trainer's. The method's numbers go to the Trainer's log (diagnostics.py); its state is
saved in every checkpoint and restored on resume. `GWACallback` (gwa.py): GWA_T per epoch in the
log, early stopping and epoch selection without a validation set.
"""
from gradalign.integrations.transformers.gwa import GWACallback
from gradalign.integrations.transformers.losses import per_sample_losses
from gradalign.integrations.transformers.trainer import PerSampleTrainer

__all__ = ["GWACallback", "PerSampleTrainer", "per_sample_losses"]
