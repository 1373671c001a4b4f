"""Small architectures for the engine tests: each returns (model, make_batch, loss_fn)."""
import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")


def token_cross_entropy(out, y):  # (B, T, V), (B, T) -> (B,) mean over tokens
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def classification_batch(*shape, classes=10):
    def make(B, gen):
        return torch.randn(B, *shape, generator=gen), torch.randint(0, classes, (B,), generator=gen)
    return make


class ResidualMLP(nn.Module):
    def __init__(self, d=32, hidden=48, classes=10):
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
            for _ in range(2))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class Conv1dNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.c1 = nn.Conv1d(1, 8, 5, padding=2)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2, dilation=2, padding=1, groups=2)
        self.c3 = nn.Conv1d(8, 6, 3, padding="same", padding_mode="circular", bias=False)
        self.head = nn.Linear(6 * 19, classes)

    def forward(self, x):
        h = F.relu(self.c1(x.unsqueeze(1)))
        h = F.relu(self.c2(h))
        return self.head(torch.tanh(self.c3(h)).flatten(1))


class Conv2dGroupNorm(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, (3, 2), stride=(2, 1), padding=(1, 0), groups=4)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        h = F.relu(self.gn(self.c1(x)))
        h = F.relu(self.c2(h))
        return self.head(h.mean(dim=(2, 3)))


class TinySequenceModel(nn.Module):
    def __init__(self, vocab=20, dim=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):  # (B, T) -> (B, T, vocab)
        h = self.norm(self.embed(tokens))
        return self.out(torch.relu(self.mix(h)))


class TiedLM(nn.Module):
    """A tiny language model whose output layer shares the input embedding's matrix (tied
    weights: the Embedding's rows and the Linear's factors add up in one parameter)."""

    def __init__(self, vocab=20, dim=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):  # (B, T) -> (B, T, vocab)
        h = self.embed(tokens)
        return self.out(self.norm(h + torch.tanh(self.mix(h))))


class SharedPositions(nn.Module):
    """Values shared by all samples meeting the per-sample stream: position embeddings looked up
    with (1, T) ids (as BERT and GPT-2 do) and with (T,) ids, a Linear on a (T, D) table of
    learned queries, and one lookup used twice: each module with a rule called without the batch."""

    def __init__(self, vocab=20, dim=12, T=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(T + 2, dim)
        self.pos_flat = nn.Embedding(T, dim)
        self.queries = nn.Parameter(torch.randn(T, dim), requires_grad=False)  # frozen: only the Linear trains
        self.query_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):  # (B, T) -> (B, T, vocab)
        T = tokens.shape[1]
        positions = torch.arange(T, device=tokens.device).unsqueeze(0)  # (1, T): the same for every sample
        h = self.embed(tokens) + self.pos(positions) + self.pos_flat(positions[0])
        h = h * torch.sigmoid(self.query_proj(self.queries))  # (T, dim) broadcast over the batch
        return self.out(self.norm(torch.tanh(h)) + self.pos(positions[:, :1]))


class ScaledEmbedding(nn.Embedding):  # its own forward: watched, not served by the Embedding rule
    def forward(self, ids):
        return super().forward(ids) * 2.0


class FloatLayerNorm(nn.LayerNorm):  # its own forward: F.layer_norm followed by the watch
    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class TablePositions(nn.Module):
    """A raw table looked up with F.embedding and ids without the batch, inside its module."""

    def __init__(self, T=6, dim=12):
        super().__init__()
        self.table = nn.Parameter(torch.randn(T + 3, dim))

    def forward(self, x):
        return x + F.embedding(torch.arange(x.shape[1], device=x.device).unsqueeze(0), self.table, padding_idx=1)


class SubclassedLayers(nn.Module):
    def __init__(self, vocab=20, dim=12):
        super().__init__()
        self.embed = ScaledEmbedding(vocab, dim, padding_idx=0)
        self.positions = TablePositions(dim=dim)
        self.norm = FloatLayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.out(self.norm(self.positions(self.embed(tokens))))


def token_batch(vocab=20, T=6):
    def make(B, gen):
        return torch.randint(0, vocab, (B, T), generator=gen), torch.randint(0, vocab, (B, T), generator=gen)
    return make


class Scale(nn.Module):
    """A custom parametrised module with no rule: served by the torch.func fallback."""

    def __init__(self, n):
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        return x * self.log_scale.exp()


class SharedTwice(nn.Module):
    """One Linear applied twice in a forward; frozen input layer; eval BatchNorm; in-place ReLU."""

    def __init__(self, d=16, classes=4):
        super().__init__()
        self.frozen = nn.Linear(d, d).requires_grad_(False)
        self.bn = nn.BatchNorm1d(d).eval()
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)
        self.shared = nn.Linear(d, d)
        self.scale = Scale(d)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.bn(self.frozen(x))
        h = self.act(self.shared(h))
        h = self.act(self.shared(h))
        return self.head(self.scale(h))


def seed_mlp():
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


ARCHITECTURES = {
    "seed_mlp": lambda: (seed_mlp(), classification_batch(40), cross_entropy),
    "residual_mlp": lambda: (ResidualMLP(), classification_batch(32), cross_entropy),
    "conv1d": lambda: (Conv1dNet(), classification_batch(40), cross_entropy),
    "conv2d_groupnorm": lambda: (Conv2dGroupNorm(), classification_batch(3, 8, 6, classes=5), cross_entropy),
    "sequence": lambda: (TinySequenceModel(), token_batch(), token_cross_entropy),
    "tied_lm": lambda: (TiedLM(), token_batch(), token_cross_entropy),
    "shared_positions": lambda: (SharedPositions(), token_batch(), token_cross_entropy),
    "subclassed_layers": lambda: (SubclassedLayers(), token_batch(), token_cross_entropy),
    "shared_bn_fallback": lambda: (SharedTwice(), classification_batch(16, classes=4), cross_entropy),
}


def random_architecture(seed: int):
    """A seeded random MLP or Conv1d net with random widths, kernels, strides and norms."""
    g = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    torch.manual_seed(seed)
    if pick("mlp", "conv") == "mlp":
        d, layers = pick(3, 11, 40), []
        width = d
        for _ in range(pick(1, 2, 3)):
            out = pick(1, 5, 17, 64)
            layers += [nn.Linear(width, out, bias=pick(True, False)), pick(nn.ReLU(), nn.Tanh(), nn.LayerNorm(out))]
            width = out
        layers.append(nn.Linear(width, 3))
        return nn.Sequential(*layers), classification_batch(d, classes=3), cross_entropy
    channels, length = pick(1, 2, 4), pick(9, 16)
    c_out, k = pick(2, 4, 8), pick(1, 3, 4)
    conv = nn.Conv1d(channels, c_out, k, stride=pick(1, 2), padding=pick(0, 1, 2), dilation=pick(1, 2),
                     groups=pick(1, 2) if channels % 2 == 0 and c_out % 2 == 0 else 1)
    model = nn.Sequential(conv, nn.GroupNorm(pick(1, 2), c_out), nn.ReLU(), nn.AdaptiveAvgPool1d(2), nn.Flatten(),
                          nn.Linear(2 * c_out, 3))
    return model, classification_batch(channels, length, classes=3), cross_entropy


# -- attention, transformers and raw parameters ------------------------------------------------

def sequence_batch(T, E, classes=3):
    return classification_batch(T, E, classes=classes)


class Attention(nn.Module):
    """nn.MultiheadAttention in one configuration on (B, T + S, E) inputs: self-attention over
    the first T tokens (cross=False) or their cross-attention to the last S."""

    def __init__(self, E=8, heads=2, T=5, S=3, classes=3, *, batch_first=True, cross=False, kdim=None, vdim=None,
                 distinct_value=False, bias=True, add_bias_kv=False, add_zero_attn=False, mask=None,
                 key_padding=False, is_causal=False, need_weights=False, use_weights=False, per_head=False,
                 dropout=0.0):
        super().__init__()
        self.T, self.S, self.heads, self.cross, self.batch_first = T, S if cross else T, heads, cross, batch_first
        self.key_in = nn.Linear(E, kdim) if kdim else None
        self.value_in = nn.Linear(E, vdim) if vdim else None
        self.distinct_value = distinct_value
        self.att = nn.MultiheadAttention(E, heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first)
        self.mask_kind, self.key_padding, self.is_causal = mask, key_padding, is_causal
        self.need_weights, self.use_weights, self.per_head = need_weights or use_weights, use_weights, per_head
        g = torch.Generator().manual_seed(5)
        L, S_ = T, self.S
        if mask == "causal":
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))
        elif mask == "bool":
            m = torch.rand(L, S_, generator=g) > 0.6
            m[:, 0] = False
            self.register_buffer("mask", m)
        elif mask == "float":
            self.register_buffer("mask", torch.randn(L, S_, generator=g))
        self.head = nn.Linear(E, classes)

    def forward(self, x):
        q = x[:, :self.T]
        kv = x[:, self.T:] if self.cross else q
        key = self.key_in(kv) if self.key_in is not None else kv
        value = self.value_in(kv) if self.value_in is not None else (kv * 2 if self.distinct_value else key)
        B, L, S = x.shape[0], self.T, self.S
        if self.mask_kind == "per_sample":  # (B * heads, L, S) from the data, never a fully masked row
            m = (kv[:, None, None, :, 0] > 0.5).expand(B, self.heads, L, S).clone()
            m[..., 0] = False
            mask = m.reshape(B * self.heads, L, S)
        else:
            mask = getattr(self, "mask", None)
        kpm = None
        if self.key_padding:
            kpm = kv[:, :, 1] > 0.8
            kpm[:, 0] = False
            if mask is not None and mask.is_floating_point():
                kpm = kpm.float() * -1e4
        if not self.batch_first:
            same = {}
            q, key, value = (same.setdefault(id(t), t.transpose(0, 1)) for t in (q, key, value))
        out, weights = self.att(q, key, value, key_padding_mask=kpm, need_weights=self.need_weights,
                                attn_mask=mask, is_causal=self.is_causal, average_attn_weights=not self.per_head)
        out = out if self.batch_first else out.transpose(0, 1)
        logits = self.head(torch.tanh(out).mean(1))
        if self.use_weights:  # the loss sees the attention weights too
            logits = logits + weights.reshape(B, -1)[:, :logits.shape[1]] * 3
        return logits


MHA_CONFIGS = {
    "self": {},
    "self_seq_first": {"batch_first": False},
    "cross_kv_same": {"cross": True},
    "cross_seq_first": {"cross": True, "batch_first": False, "key_padding": True},
    "cross_distinct_value": {"cross": True, "distinct_value": True},
    "kdim_vdim": {"cross": True, "kdim": 6, "vdim": 4},
    "no_bias": {"bias": False},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True, "mask": "bool", "key_padding": True},
    "bias_kv_kdim": {"add_bias_kv": True, "kdim": 6, "vdim": 4, "batch_first": False},
    "bool_mask": {"mask": "bool"},
    "float_mask_padding": {"mask": "float", "key_padding": True},
    "float_mask_padding_weights": {"mask": "float", "key_padding": True, "need_weights": True},
    "causal_padding": {"mask": "causal", "is_causal": True, "key_padding": True},
    "per_sample_mask": {"mask": "per_sample", "cross": True},
    "causal": {"mask": "causal", "is_causal": True},
    "causal_weights": {"mask": "causal", "is_causal": True, "need_weights": True},
    "weights_in_loss": {"use_weights": True, "cross": True},
    "weights_per_head_zero_attn": {"use_weights": True, "per_head": True, "add_zero_attn": True, "batch_first": False},
}


class Encoder(nn.Module):
    """nn.TransformerEncoder (2 layers, final norm) on (B, T, E), batch first at the model's input."""

    def __init__(self, E=8, heads=2, classes=3, *, batch_first=True, norm_first=False, dropout=0.0):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, heads, 12, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False)
        self.batch_first = batch_first
        self.head = nn.Linear(E, classes)

    def forward(self, x):
        h = self.encoder(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class Decoder(nn.Module):
    """nn.TransformerDecoderLayer: T target tokens attending to S memory tokens of another length."""

    def __init__(self, E=8, heads=2, T=4, classes=3, *, batch_first=True, norm_first=False):
        super().__init__()
        self.T, self.batch_first = T, batch_first
        self.layer = nn.TransformerDecoderLayer(E, heads, 12, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.head = nn.Linear(E, classes)

    def forward(self, x):
        tgt, memory = x[:, :self.T], x[:, self.T:]
        mask = nn.Transformer.generate_square_subsequent_mask(self.T)
        if not self.batch_first:
            tgt, memory = tgt.transpose(0, 1), memory.transpose(0, 1)
        h = self.layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class Seq2Seq(nn.Module):
    """nn.Transformer: S source tokens, T target tokens, a causal target mask."""

    def __init__(self, E=8, heads=2, T=3, classes=3, *, batch_first=True):
        super().__init__()
        self.T, self.batch_first = T, batch_first
        self.transformer = nn.Transformer(E, heads, 1, 1, 12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(E, classes)

    def forward(self, x):
        src, tgt = x[:, self.T:], x[:, :self.T]
        if not self.batch_first:
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
        h = self.transformer(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(self.T))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class TinyViT(nn.Module):
    """Patch embedding (Conv2d), a cls token and a position embedding owned by the root (raw
    parameters), nn.TransformerEncoder, head on the cls token."""

    def __init__(self, dim=8, depth=2, heads=2, patch=2, image=4, classes=3, *, cls_pos=True, dropout=0.0):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls_pos = cls_pos
        if cls_pos:
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.randn(1, n + 4, dim))  # longer than needed: sliced below
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, n, dim)
        if self.cls_pos:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = x + self.pos_embed[:, :x.shape[1]]
        x = self.encoder(x)
        return self.head(self.norm(x[:, 0] if self.cls_pos else x.mean(1)))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x):
        return x * self.gamma


class RawParameters(nn.Module):
    """Raw parameters in the forms the watch follows: layer scale (elementwise), a learned
    temperature (exp, then divide), a soft threshold (compared with, then subtracted), x @ W and GPT-2's Conv1D addmm(b, x.view(-1, n), W) with W
    (in, out), F.linear with a transposed weight, and a cosine head (a weight computed from a
    parameter: materialised, then mapped back)."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.scale = LayerScale(d)
        self.w_right = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.conv1d_weight = nn.Parameter(torch.randn(d, 2 * d) / d ** 0.5)
        self.conv1d_bias = nn.Parameter(torch.randn(2 * d))
        self.w_t = nn.Parameter(torch.randn(2 * d, d) / d ** 0.5)
        self.cos_weight = nn.Parameter(torch.randn(classes, d))
        self.log_temperature = nn.Parameter(torch.tensor(0.3))
        self.threshold = nn.Parameter(torch.tensor(0.1))

    def forward(self, x):  # (B, T, d)
        h = x + self.scale(torch.tanh(self.inp(x)))
        h = torch.where(h > self.threshold, h - self.threshold, 0.2 * h)  # a comparison passes no gradient
        h = torch.tanh(h @ self.w_right)
        size = h.shape[:-1] + (self.conv1d_weight.shape[1],)
        h = torch.addmm(self.conv1d_bias, h.view(-1, h.shape[-1]), self.conv1d_weight).view(size)
        h = torch.tanh(F.linear(h, self.w_t.t()))
        cos = F.normalize(h.mean(1), dim=-1) @ F.normalize(self.cos_weight, dim=-1).t()
        return cos / self.log_temperature.exp()


ARCHITECTURES.update({
    "vit_cls_pos": lambda: (TinyViT(), classification_batch(3, 4, 4, classes=3), cross_entropy),
    "encoder_post_norm": lambda: (Encoder(), sequence_batch(5, 8), cross_entropy),
    "encoder_pre_norm_seq_first": lambda: (Encoder(batch_first=False, norm_first=True), sequence_batch(5, 8),
                                           cross_entropy),
    "decoder_layer": lambda: (Decoder(), sequence_batch(4 + 6, 8), cross_entropy),
    "transformer_seq_first": lambda: (Seq2Seq(batch_first=False), sequence_batch(3 + 4, 8), cross_entropy),
    "raw_parameters": lambda: (RawParameters(), sequence_batch(4, 6), cross_entropy),
})
