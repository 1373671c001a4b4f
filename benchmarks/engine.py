"""Engine cost against a plain forward+backward of the mean loss, and against materialising routes.

    python benchmarks/engine.py                 # full table (several minutes on 2 CPU cores)
    python benchmarks/engine.py --quick         # fewer rounds, no memory column
    python benchmarks/engine.py --models vit_plain vit --variants norms gasw --interleave --threads 1

Models: the seed MLP and the Conv1d net of experiments.models on mnist1d-shaped inputs, and a
small ViT on 3x16x16 images (4x4 patches: 16 tokens, D=64, 4 nn.TransformerEncoder layers of 4
heads, MLP 256, pre-norm): `vit` with a cls token and a position embedding owned by its root
module (raw parameters, watched at their point of use), `vit_plain` the same without them
(mean-pooled), and `vit_embedding` the same 17 tokens from nn.Embedding children, to price the
raw parameters and the extra token apart. `--interleave` times the models' variants together,
round by round, and adds each variant's ratio to the same variant of the first model.
    python benchmarks/engine.py --models resnet_gn   # a small ResNet with GroupNorm, B = 32
    python benchmarks/engine.py --models gpt2 --variants norms gasw --threads 1   # needs transformers

`gpt2` is a Hugging Face GPT2LMHeadModel from a small config (4 layers, d = 128, 4 heads, vocab
1000, 64 tokens, input and output embeddings tied, SDPA attention), B = 16, with per-sample
losses averaged over each sample's next-token predictions (ga.token_losses); skipped, with a
message, where transformers is not installed.

Variants, each on its own copy of the model (same weights, same batch):
  plain        forward, mean cross-entropy, backward
  norms        engine.backward(losses); stats.norms
  clip         engine.backward(losses, weights=w, release=True) with w_i = min(1, C/|g_i|):
               per-sample norms and the clipped p.grad in one backward (the per-sample clipping
               workload), each layer's factors freed once its part of p.grad is written
  gasw         engine.backward(losses, weights=GASW(2), release=True): norms, cosines, weighted p.grad
  clip kept, gasw kept   the same without release (the statistics keep every layer's factors)
  gaga         engine.backward(losses); stats.grad_sq_sum
  vmap gasw    torch.func vmap(grad) per-sample gradients, then the GASW statistics and p.grad
  opacus gasw  Opacus GradSampleModule grad_sample, then the same (when opacus is installed)
  backpack gasw BackPACK BatchGrad, then the same (when backpack is installed)
Memory: extra peak memory of one step in a fresh process, above the memory held once the previous
step's gradients are freed (CPU: the largest total size of the tensor storages the step's operators
create and hold at once, counted by a dispatch mode; CUDA: max_memory_allocated), as a ratio to
the plain step.
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import sys
from pathlib import Path

import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from timing import memory_in_subprocess, peak_memory_mb, print_table, time_variants  # noqa: E402

import gradalign as ga  # noqa: E402
from gradalign.experiments.models import build_model  # noqa: E402

MODELS = {"mlp": "seed MLP 40-256-256-10", "conv1d": "Conv1d net (experiments.models)",
          "wide_mlp": "MLP 784-1024-1024-10 (arithmetic-bound)",
          "vit_linear": "ViT-style, attention from nn.Linear: 4 blocks, D=64, T=16 patch tokens, 4 heads, MLP 256",
          "gpt2": "Hugging Face GPT2LMHeadModel: 4 layers, d=128, 4 heads, vocab 1000, T=64, tied embeddings, SDPA",
          "vit": "ViT D=64, 4 layers, 16 patches, cls token + position embedding",
          "vit_plain": "the same ViT without cls token and position embedding",
          "vit_embedding": "the same ViT, cls token and positions from nn.Embedding children",
          "resnet_gn": "ResNet with GroupNorm: 3 stages of one basic block, 16-32-64 channels, 32x32 RGB"}
BATCHES = {"mlp": (32, 128, 512), "conv1d": (32, 128, 512), "wide_mlp": (256,), "vit_linear": (64,), "vit": (64,),
           "vit_plain": (64,), "vit_embedding": (64,), "resnet_gn": (32,), "gpt2": (16,)}
GPT2_T = 64


class ViT(torch.nn.Module):
    """Patch embedding, a cls token and a position embedding, nn.TransformerEncoder, LayerNorm,
    linear head. tokens="raw": cls and positions are nn.Parameters of this root module (watched
    at their point of use); "embedding": the same numbers looked up from nn.Embedding children
    (the Embedding rule); None: neither (16 tokens, mean-pooled)."""

    def __init__(self, dim=64, depth=4, heads=4, patch=4, image=16, classes=10, tokens="raw"):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.tokens, n = tokens, (image // patch) ** 2 + 1
        if tokens == "raw":
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = torch.nn.Parameter(torch.randn(1, n, dim) * 0.02)
        elif tokens == "embedding":
            self.cls_embed, self.pos_embed = torch.nn.Embedding(1, dim), torch.nn.Embedding(n, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, dim)
        B, T = x.shape[0], x.shape[1] + 1
        if self.tokens == "raw":
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        elif self.tokens == "embedding":
            index = torch.arange(T, device=x.device).expand(B, T)
            x = torch.cat([self.cls_embed(index[:, :1] * 0), x], dim=1) + self.pos_embed(index)
        x = self.norm(self.encoder(x))
        return self.head(x.mean(1) if self.tokens is None else x[:, 0])


class LinearAttentionBlock(nn.Module):
    """Pre-norm transformer block whose attention is written out from nn.Linear layers (qkv and
    output projections) and tensor ops, so every parameter is an nn.Linear or nn.LayerNorm."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) * (D // self.heads) ** -0.5).softmax(-1)  # (B, H, T, T)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class LinearViT(nn.Module):
    """Patches of 3x16x16 images (4x4: T = 16 tokens of 48 numbers) embedded by nn.Linear, 4
    LinearAttentionBlocks (D = 64, 4 heads, MLP 256), LayerNorm, mean over tokens, linear head."""

    def __init__(self, dim=64, depth=4, heads=4, patch=4, classes=10):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.blocks = nn.Sequential(*(LinearAttentionBlock(dim, heads, 4 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # (B, 3, 16, 16)
        B, C, H, W = x.shape
        p = self.patch
        tokens = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        return self.head(self.norm(self.blocks(self.embed(tokens))).mean(1))


class BasicBlock(nn.Module):
    """conv3x3-GN-ReLU-conv3x3-GN plus the shortcut (1x1 conv + GN where the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(8, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(8, c_out))

    def forward(self, x):
        h = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(h)) + self.shortcut(x))


class ResNetGN(nn.Module):
    """A small CIFAR-style ResNet with GroupNorm (what ga.replace_batchnorm makes of a BatchNorm one)."""

    def __init__(self, classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.GroupNorm(8, widths[0]),
                                  nn.ReLU())
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(c_in, width, stride=1 if i == 0 else 2))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x):  # (B, 3, 32, 32)
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class GPT2Logits(nn.Module):
    """A tiny-config GPT-2 language model from transformers (no download), ids -> logits."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=GPT2_T, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        self.lm = GPT2LMHeadModel(config)

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def per_sample_losses(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,): cross-entropy; for the language model, averaged over each sample's next-token predictions."""
    if kind == "gpt2":
        return ga.token_losses(out, y, shift=True)
    return F.cross_entropy(out, y, reduction="none")


def build(kind: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """(model, shape of one input sample)."""
    if kind == "gpt2":
        return GPT2Logits(), (GPT2_T,)
    if kind == "resnet_gn":
        return ResNetGN(), (3, 32, 32)
    if kind == "wide_mlp":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10)), (784,)
    if kind == "vit_linear":
        return LinearViT(), (3, 16, 16)
    if kind.startswith("vit"):
        return ViT(tokens={"vit": "raw", "vit_embedding": "embedding", "vit_plain": None}[kind]), (3, 16, 16)
    return build_model(kind), (40,)


def gasw_from_materialised(grads: dict, params: dict, gamma: float = 2.0) -> None:
    """GASW statistics and p.grad from materialised per-sample gradients {name: (B, ...)}."""
    B = next(iter(grads.values())).shape[0]
    mean = {n: g.mean(0) for n, g in grads.items()}
    sq_norms = sum(g.flatten(1).square().sum(1) for g in grads.values())
    dots = sum(g.flatten(1) @ mean[n].flatten() for n, g in grads.items())
    cos = dots / (sq_norms.sqrt() * sum(m.square().sum() for m in mean.values()).sqrt())
    raw = cos.clamp_min(0).pow(gamma)
    w = raw * B / raw.sum()
    for n, p in params.items():
        p.grad = torch.tensordot(w, grads[n], dims=1) / B


def clip_weights(stats, clip: float = 1.0):
    """Per-sample clipping (the DP-SGD workload): w_i = min(1, C / |g_i|), from the norms alone."""
    return (clip / stats.norms).clamp(max=1.0)


def make_variants(kind: str, B: int, device: torch.device, only: str | None = None,
                  names: list[str] | None = None) -> dict:
    """The variants' step functions; `only` builds just that one (for memory measurement),
    `names` just those."""
    torch.manual_seed(0)
    base, sample_shape = build(kind)
    base = base.to(device)
    if kind == "gpt2":  # token ids, the targets the same ids (shifted inside the loss)
        x = torch.randint(0, 1000, (B, *sample_shape), device=device)
        y = x
    else:
        x = torch.randn(B, *sample_shape, device=device)
        y = torch.randint(0, 10, (B,), device=device)
    variants = {}

    plain = copy.deepcopy(base)

    def plain_step():
        plain.zero_grad(set_to_none=True)
        per_sample_losses(kind, plain(x), y).mean().backward()
    plain_step.params = list(plain.parameters())
    variants["plain"] = plain_step

    def engine_step(statistic):
        model = copy.deepcopy(base)
        engine = ga.PerSampleGradients(model)

        def step():
            model.zero_grad(set_to_none=True)
            losses = per_sample_losses(kind, model(x), y)
            statistic(engine, losses)
        step.params = list(model.parameters())
        return step

    variants["norms"] = engine_step(lambda e, l: e.backward(l).norms)
    variants["clip"] = engine_step(lambda e, l: e.backward(l, weights=clip_weights, release=True))
    variants["gasw"] = engine_step(lambda e, l: e.backward(l, weights=ga.GASW(2.0), release=True))
    variants["clip kept"] = engine_step(lambda e, l: e.backward(l, weights=clip_weights))
    variants["gasw kept"] = engine_step(lambda e, l: e.backward(l, weights=ga.GASW(2.0)))
    variants["gaga"] = engine_step(lambda e, l: e.backward(l).grad_sq_sum)

    vmap_model = copy.deepcopy(base)
    vmap_params = dict(vmap_model.named_parameters())
    loss = functools.partial(per_sample_losses, kind)
    def vmap_step():
        gasw_from_materialised(ga.per_sample_gradients(vmap_model, x, y, loss), vmap_params)
    vmap_step.params = list(vmap_params.values())
    variants["vmap gasw"] = vmap_step

    if importlib.util.find_spec("opacus"):
        from opacus import GradSampleModule
        op_model = GradSampleModule(copy.deepcopy(base), loss_reduction="sum")
        op_params = {n: p for n, p in op_model.named_parameters()}

        def opacus_step():
            op_model.zero_grad(set_to_none=True)
            F.cross_entropy(op_model(x), y, reduction="sum").backward()
            gasw_from_materialised({n: p.grad_sample for n, p in op_params.items()}, op_params)
            for p in op_params.values():
                p.grad_sample = None
        opacus_step.params = list(op_params.values())
        variants["opacus gasw"] = opacus_step

    if importlib.util.find_spec("backpack"):
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
        bp_model = extend(copy.deepcopy(base), use_converter=True)
        bp_loss = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
        bp_params = dict(bp_model.named_parameters())

        def backpack_step():
            bp_model.zero_grad(set_to_none=True)
            with backpack(BatchGrad()):
                bp_loss(bp_model(x), y).backward()
            gasw_from_materialised({n: p.grad_batch for n, p in bp_params.items()}, bp_params)
        backpack_step.params = list(bp_params.values())
        variants["backpack gasw"] = backpack_step
    if only is not None:
        return {only: variants[only]}
    if names is not None:
        variants = {n: v for n, v in variants.items() if n in names}
    for name in ("opacus gasw", "backpack gasw"):  # optional libraries may not support the model
        try:
            variants.get(name, lambda: None)()
        except Exception as err:  # noqa: BLE001 - report and leave the variant out
            print(f"  {name} left out for {kind}: {type(err).__name__}: {err}", file=sys.stderr)
            variants.pop(name)
    return variants


def measure_memory(kind: str, B: int, name: str, device: torch.device) -> float:
    """Peak extra memory of one variant's steps, in a process that ran nothing else.

    Two steps on a batch of 2 first, so that one-time initialisation (lazy imports, caches)
    is not counted; their own peak is negligible.
    """
    warm = make_variants(kind, 2, device, only=name)[name]
    warm(), warm()
    step = make_variants(kind, B, device, only=name)[name]
    return peak_memory_mb(step, device, lambda: [p.__setattr__("grad", None) for p in step.params])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds, no memory measurement")
    parser.add_argument("--rounds", type=int, default=21, help="timing rounds per variant (median over rounds)")
    parser.add_argument("--batches", type=int, nargs="+", help="default: 32 128 512, the ViTs 64, the ResNet 32")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", help="only these variants (plain is always timed)")
    parser.add_argument("--interleave", action="store_true",
                        help="time every model's variants together (same B) and compare them to the first model's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measure-memory", nargs=3, metavar=("MODEL", "B", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="backpack|opacus|torch")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        kind, B, name = args.measure_memory
        print(json.dumps(measure_memory(kind, int(B), name, device)))
        return
    if "gpt2" in args.models and importlib.util.find_spec("transformers") is None:
        print("gpt2 skipped: transformers is not installed (pip install -e '.[test]')", file=sys.stderr)
        args.models = [m for m in args.models if m != "gpt2"]
    rounds = 5 if args.quick else args.rounds
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{rounds} rounds; median ms per step and ratio to plain\n")
    rows = []
    names = None if args.variants is None else ["plain", *args.variants]
    groups = ([[(kind, B)] for kind in args.models for B in args.batches or BATCHES[kind]] if not args.interleave
              else [[(kind, B) for kind in args.models] for B in args.batches or BATCHES[args.models[0]]])
    for group in groups:
        variants = {(kind, B, name): step for kind, B in group
                    for name, step in make_variants(kind, B, device, names=names).items()}
        medians = time_variants(variants, rounds=rounds)
        memory = {}  # {(kind, B, name): peak MB}, each in a fresh process
        if not args.quick and not args.interleave:
            memory = {key: memory_in_subprocess(__file__, [str(v) for v in key] + ["--device", args.device])
                      for key in variants}
        for (kind, B, name), seconds in medians.items():
            row = {"model": kind, "B": B, "variant": name, "ms": seconds * 1e3,
                   "x plain": seconds / medians[(kind, B, "plain")]}
            if args.interleave and (group[0][0], B, name) in medians:
                row["x first model"] = seconds / medians[(group[0][0], B, name)]
            if memory:
                row["peak MB"] = memory[(kind, B, name)]
                row["mem x plain"] = memory[(kind, B, name)] / max(memory[(kind, B, "plain")], 1e-3)
            rows.append(row)
        print(f"  done {', '.join(f'{kind} B={B}' for kind, B in group)}", file=sys.stderr)
    columns = (["model", "B", "variant", "ms", "x plain"] + (["x first model"] if args.interleave else [])
               + ([] if args.quick or args.interleave else ["peak MB", "mem x plain"]))
    print_table(rows, columns)


if __name__ == "__main__":
    main()
