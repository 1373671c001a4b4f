"""The engine tests' attention models: nn.MultiheadAttention in its configurations, encoders,
decoders, a tiny ViT and raw parameters used at their point of use."""
import torch
import torch.nn.functional as F
from torch import nn


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
    "self_distinct_value": {"distinct_value": True},  # att(x, x, 2 x): query is key, the value differs
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
