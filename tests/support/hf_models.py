"""Tiny Hugging Face models built from configs (no downloads), their data, and references for
tests/integrations/test_transformers.py: per-sample gradients from the model's OWN loss on one
sample at a time (`labels=` on a batch of one), and the GASW weighted gradient formed from them.

Run as a script under torchrun (2 processes) it trains the same model with PerSampleTrainer
(GASW + GWACallback, then GAGA) and rank 0 saves what the test compares with one process.
"""
from __future__ import annotations

import sys

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, TrainerCallback,
                          TrainingArguments)

N, T, CLASSES, VOCAB = 16, 8, 3, 50


def bert(seed: int = 0, head: type = BertForSequenceClassification):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=CLASSES, max_position_embeddings=T,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return head(config)


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=T,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def classification_data(n: int = N) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    labels = ids[:, 0] % CLASSES                       # learnable: GWA's scores are not all alike
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::3, 5:] = 0                                  # padded samples
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def lm_data(n: int = N, masked: bool = False) -> list[dict]:
    """Token ids with padding; labels -100 where padded (and, masked, where not predicted)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        mask[i, T - i % 4:] = 0                        # 0 to 3 padded positions
    labels = ids.masked_fill(mask == 0, -100)
    if masked:
        hidden = torch.rand(n, T, generator=g) < 0.5
        hidden[:, 0] = False                           # every sample keeps a predicted token
        labels = labels.masked_fill(hidden, -100)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def arguments(out, **kw) -> TrainingArguments:
    """CPU, no reporting or saving, the data in order, plain SGD at a constant rate."""
    base = dict(output_dir=str(out), per_device_train_batch_size=8, report_to="none", use_cpu=True,
                save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", optim="sgd",
                learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, seed=0)
    return TrainingArguments(**{**base, **kw})


def per_sample_grads(model, rows: list[dict]) -> torch.Tensor:
    """(B, P) gradients of the model's own loss on each sample alone (zeros where unused)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for row in rows:
        loss = model(**{k: v.unsqueeze(0) for k, v in row.items()}).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)]))
    return torch.stack(out)


def gasw_weights(G: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """(B,) w_i = max(0, cos(g_i, gbar))^gamma normalised to sum to B, from (B, P) gradients."""
    gbar = G.mean(0)
    cos = G @ gbar / (G.norm(dim=1) * gbar.norm())
    raw = cos.clamp(0, 1) ** gamma
    return raw * len(raw) / raw.sum()


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                      for p in model.parameters() if p.requires_grad])


class GradRecorder(TrainerCallback):
    """The flattened p.grad the optimizer is about to use (after clipping), per Trainer step."""

    def __init__(self):
        self.grads: list[torch.Tensor | None] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        has = any(p.grad is not None for p in model.parameters())
        self.grads.append(flat_grad(model).clone() if has else None)


def data_parallel_runs(out: str, per_device: int) -> None:
    """GASW + GWA (2 epochs of 2 steps) and GAGA (4 increments of 8 samples, a step every 2)
    with `per_device` samples per process; rank 0 saves the results to out/result.pt."""
    import gradalign as ga
    from gradalign.integrations.transformers import GWACallback, PerSampleTrainer
    torch.set_num_threads(1)
    results = {}
    model = bert()
    gwa = GWACallback(model.classifier, restore_best=False)
    trainer = PerSampleTrainer(model=model, args=arguments(f"{out}/gasw", per_device_train_batch_size=per_device,
                                                           num_train_epochs=2, max_grad_norm=0.5),
                               train_dataset=classification_data(), weighting=ga.GASW(2.0), callbacks=[gwa])
    trainer.train()
    results["gasw"] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                       "log": trainer.state.log_history, "gwa": gwa.monitor.epoch_scores,
                       "world": trainer.args.world_size}
    model = gpt2()
    gaga = ga.GSNRAccumulator(tau=float("inf"), increment=8, max_samples=16)  # 8 samples a Trainer step
    trainer = PerSampleTrainer(model=model, args=arguments(f"{out}/gaga", per_device_train_batch_size=per_device,
                                                           max_steps=4), train_dataset=lm_data(), accumulation=gaga)
    trainer.train()
    results["gaga"] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                       "samples": gaga.samples_per_step}
    if trainer.args.process_index == 0:
        torch.save(results, f"{out}/result.pt")


if __name__ == "__main__":
    import torch.distributed as dist

    from tests.support.gloo import end_process_group  # imports torch.distributed.nn before the Trainer's init
    data_parallel_runs(sys.argv[1], int(sys.argv[2]))
    if dist.is_initialized():  # the Trainer's group ended while the interpreter runs (gloo.py: SIGABRT at exit)
        end_process_group("the Hugging Face Trainer script")
