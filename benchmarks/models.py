"""The models of the benchmarks (engine.py, profile_engine.py, compare.py), built here so that the
benchmarks depend on the library alone: `build_model(kind)`, `batch(kind, B)` -> (inputs, targets),
`per_sample_losses(kind, output, targets)` -> (B,), `clip_weights` (the per-sample clipping
workload)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga

MODELS = {"mlp": "seed MLP 40-256-256-10", "conv1d": "Conv1d net (2 convs with GroupNorm, as the experiments' conv1d)",
          "wide_mlp": "MLP 784-1024-1024-10 (arithmetic-bound)",
          "vit_linear": "ViT-style, attention from nn.Linear: 4 blocks, D=64, T=16 patch tokens, 4 heads, MLP 256",
          "gpt2": "Hugging Face GPT2LMHeadModel: 4 layers, d=128, 4 heads, vocab 1000, T=64, tied embeddings, SDPA",
          "vit": "ViT D=64, 4 layers, 16 patches, cls token + position embedding",
          "vit_plain": "the same ViT without cls token and position embedding",
          "vit_embedding": "the same ViT, cls token and positions from nn.Embedding children",
          "resnet_gn": "ResNet with GroupNorm: 3 stages of one basic block, 16-32-64 channels, 32x32 RGB",
          "lstm_lm": "LSTM language model: Embedding 1000x64, nn.LSTM 64-128 (2 layers, batch_first), Linear 128-1000, T=32",
          "transformer": "nn.TransformerEncoder classifier: token + position nn.Embedding (vocab 1000), d=256, 4 heads, "
                         "4 layers, MLP 1024, pre-norm, T=64, mean-pooled, LayerNorm, linear head to 10 classes",
          "gpt2_d256": "Hugging Face GPT2LMHeadModel: 4 layers, d=256, 4 heads, vocab 1000, T=64, tied embeddings, SDPA",
          "transformer_d768": "the transformer classifier at d=768, 12 heads, MLP 3072 (the size the book-keeping papers report)"}
BATCHES = {"mlp": (32, 128, 512), "conv1d": (32, 128, 512), "wide_mlp": (256,), "vit_linear": (64,), "vit": (64,),
           "vit_plain": (64,), "vit_embedding": (64,), "resnet_gn": (32,), "gpt2": (16,), "transformer": (32,),
           "gpt2_d256": (8,), "lstm_lm": (32,), "transformer_d768": (16,)}
GPT2_T = 64
LSTM_T, LSTM_VOCAB = 32, 1000
VOCAB = 1000  # token ids of the language models and the transformer classifier
TOKEN_MODELS = ("gpt2", "gpt2_d256", "transformer", "transformer_d768", "lstm_lm")  # inputs are token ids
LANGUAGE_MODELS = ("gpt2", "gpt2_d256", "lstm_lm")  # targets are the inputs (shifted inside the loss)


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


class TransformerClassifier(nn.Module):
    """Token ids (B, T) -> 10 class scores: token and position nn.Embedding, a pre-norm
    nn.TransformerEncoder (nn.MultiheadAttention, MLP 4d, no dropout), LayerNorm, mean over tokens,
    linear head."""

    def __init__(self, dim=256, heads=4, depth=4, tokens=GPT2_T, vocab=VOCAB, classes=10):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(tokens, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):  # (B, T)
        # contiguous (repeat, not expand): Opacus's ghost clipping views the ids of an nn.Embedding
        positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        x = self.encoder(self.embed(ids) + self.position(positions))
        return self.head(self.norm(x).mean(1))


class GPT2Logits(nn.Module):
    """A tiny-config GPT-2 language model from transformers (no download), ids -> logits; `lm` is
    the GPT2LMHeadModel (input and output embeddings tied)."""

    def __init__(self, dim: int = 128):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        config = GPT2Config(n_layer=4, n_embd=dim, n_head=4, vocab_size=VOCAB, n_positions=GPT2_T, bos_token_id=0,
                            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        self.lm = GPT2LMHeadModel(config)

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


class LSTMLanguageModel(nn.Module):
    """ids (B, T) -> logits (B, T, vocab): Embedding, a 2-layer LSTM, a Linear per token. With
    recurrent="opacus", Opacus's DPLSTM (the same parameters and names) in place of nn.LSTM."""

    def __init__(self, vocab: int = LSTM_VOCAB, dim: int = 64, hidden: int = 128, recurrent: str = "torch"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        if recurrent == "opacus":
            from opacus.layers import DPLSTM
            self.rnn = DPLSTM(dim, hidden, num_layers=2, batch_first=True)
        else:
            self.rnn = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.out(self.rnn(self.embed(ids))[0])


def per_sample_losses(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,): cross-entropy; for the language models, averaged over each sample's next-token predictions."""
    if kind in LANGUAGE_MODELS:
        return ga.token_losses(out, y, shift=True)
    return F.cross_entropy(out, y, reduction="none")


def build_model(kind: str) -> torch.nn.Module:
    """The model `kind` of MODELS, freshly initialised from torch's global generator."""
    if kind in ("gpt2", "gpt2_d256"):
        return GPT2Logits(dim=256 if kind == "gpt2_d256" else 128)
    if kind == "transformer":
        return TransformerClassifier()
    if kind == "transformer_d768":
        return TransformerClassifier(dim=768, heads=12)
    if kind == "lstm_lm":
        return LSTMLanguageModel()
    if kind == "resnet_gn":
        return ResNetGN()
    if kind == "wide_mlp":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    if kind == "vit_linear":
        return LinearViT()
    if kind.startswith("vit"):
        return ViT(tokens={"vit": "raw", "vit_embedding": "embedding", "vit_plain": None}[kind])
    if kind == "conv1d":
        return conv1d_net()
    return seed_mlp()


def batch(kind: str, B: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of B random samples for `kind` (draws from torch's global generator):
    token ids for the token models (a language model's targets are its inputs), else standard
    normal inputs and 10 classes."""
    shape = build_shape(kind)
    if kind in TOKEN_MODELS:
        x = torch.randint(0, VOCAB, (B, *shape), device=device)
        return x, x if kind in LANGUAGE_MODELS else torch.randint(0, 10, (B,), device=device)
    return torch.randn(B, *shape, device=device), torch.randint(0, 10, (B,), device=device)


def build_shape(kind: str) -> tuple[int, ...]:
    """The shape of one input sample of `kind` (what `build` returns beside the model)."""
    if kind in TOKEN_MODELS:
        return (LSTM_T,) if kind == "lstm_lm" else (GPT2_T,)
    return {"resnet_gn": (3, 32, 32), "wide_mlp": (784,), "conv1d": (40,), "mlp": (40,)}.get(kind, (3, 16, 16))


def seed_mlp() -> nn.Module:
    """The seeds' MLP 40-256-256-10 with ReLU."""
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def conv1d_net(channels: int = 32, hidden: int = 256) -> nn.Module:
    """(B, 40) -> Conv1d(1, c, 5, pad 2)-GroupNorm-ReLU, Conv1d(c, c, 3, stride 2, pad 1)-GroupNorm-ReLU,
    flatten, Linear(c * 20, hidden)-ReLU, Linear(hidden, 10)."""
    return nn.Sequential(nn.Unflatten(1, (1, 40)),
                         nn.Conv1d(1, channels, 5, padding=2), nn.GroupNorm(8, channels), nn.ReLU(),
                         nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(8, channels), nn.ReLU(),
                         nn.Flatten(), nn.Linear(channels * 20, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def clip_weights(stats, clip: float = 1.0):
    """Per-sample clipping (the DP-SGD workload): w_i = min(1, C / |g_i|), from the norms alone."""
    return (clip / stats.norms).clamp(max=1.0)
