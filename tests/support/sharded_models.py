"""Models for the sharded (FSDP2) and activation-checkpointing tests: a small transformer with
every kind of parameter the engine serves (an embedding, a raw position parameter and a
layer-scale gamma, both watched, nn.MultiheadAttention whose rule reads its weights, LayerNorm,
Linear), a tiny Hugging Face GPT-2 from a config (no download), and their batches and losses.

`build(kind, shard=..., mp=..., reshard=..., checkpoint=...)` gives the same initial weights
whether sharded or not, so one process on the whole batch is the reference of every rank.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_function

import gradalign as ga

V, T, D, C = 17, 6, 16, 5    # vocabulary, tokens, width, classes
B = 13                       # the global batch: shards of 7 and 6 on two ranks


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.gamma = nn.Parameter(torch.full((D,), 0.5))  # layer scale: a raw parameter, watched

    def forward(self, x):
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.gamma * self.fc2(F.gelu(self.fc1(self.n2(x))))


class TinyTransformer(nn.Module):
    """Token ids (B, T) -> class logits (B, C); `checkpoint_blocks`: each block's forward inside
    torch.utils.checkpoint (non-reentrant)."""

    def __init__(self, checkpoint_blocks: bool = False):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(1, T, D) * 0.1)  # a raw parameter of the root, watched
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, C)
        self.checkpoint_blocks = checkpoint_blocks

    def forward(self, ids):
        x = self.emb(ids) + self.pos
        for block in self.blocks:
            x = checkpoint_function(block, x, use_reentrant=False) if self.checkpoint_blocks else block(x)
        return self.head(self.norm(x).mean(1))


def gpt2(checkpoint: bool = False):
    """A 2-layer GPT-2 (tied embeddings, Conv1D, eager attention) from a config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=V + 43, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config)
    if checkpoint:  # transformers >= 4.35: non-reentrant by default
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def build(kind: str = "transformer", *, shard: bool = False, mp: bool = False, reshard: bool = True,
          checkpoint: str | None = None) -> nn.Module:
    """The model with seeded weights; `shard`: fully_shard each block, then the root (mp: bf16
    parameters, float32 reduction). checkpoint: None, "function" (torch.utils.checkpoint in the
    forward), "wrapper" (FSDP's checkpoint_wrapper around each block) or "hf" (GPT-2's own)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        model, blocks = gpt2(checkpoint == "hf"), None
        blocks = model.transformer.h
    else:
        model = TinyTransformer(checkpoint_blocks=checkpoint == "function")
        if checkpoint == "wrapper":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            model.blocks = nn.ModuleList([checkpoint_wrapper(b) for b in model.blocks])
        blocks = model.blocks
    if shard:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else \
            MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=policy)
    return model


def batch(kind: str = "transformer", n: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind == "gpt2":
        ids = torch.randint(1, V + 43, (n, T), generator=g)
        return ids, ids
    return torch.randint(0, V, (n, T), generator=g), torch.randint(0, C, (n,), generator=g)


def losses(kind: str, model: nn.Module, x, y):
    if kind == "gpt2":
        return ga.token_losses(model(input_ids=x).logits, y, shift=True)
    return F.cross_entropy(model(x), y, reduction="none")


class HeadNet(nn.Module):
    """A body of two units and an nn.Linear head, for GWA and GVR."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Sequential(nn.Linear(12, 16), nn.Tanh()),
                                  nn.Sequential(nn.Linear(16, 8), nn.Tanh()))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.body(x))


def shard_head_net(model: HeadNet) -> HeadNet:
    """Each body stage, the head and the root a unit of its own (the head resharded after its forward)."""
    from torch.distributed.fsdp import fully_shard
    for stage in model.body:
        fully_shard(stage)
    fully_shard(model.head, reshard_after_forward=True)
    fully_shard(model)
    return model


def full(t):
    """A tensor as one process holds it: a DTensor gathered, anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
