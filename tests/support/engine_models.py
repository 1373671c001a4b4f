"""Small architectures for the engine tests: each returns (model, make_batch, loss_fn).

test_engine.py compares every statistic of every architecture in ARCHITECTURES with the
torch.func reference at B = 1, 7 and 64, reading the statistics in two orders (norms first,
and <g_i, gbar>, |gbar|^2 first). Between them the architectures reach every branch of the
engine, so that a change to one route cannot break it silently:

gradalign.engine.persample (PERSAMPLE_ROUTES below names one parameter per route, and
test_engine.py::test_architectures_take_the_listed_routes checks that it takes it):
    Factored, 2-D case (G = T = 1, nn.Linear on (B, in)): seed_mlp, residual_mlp, every head
        <g_i, S>, |S|^2 from the B x B Gram matrix: seed_mlp "2.weight" at B <= 255; at B = 1, 7
            most 2-D layers. |g_i|^2 from the Gram diagonal when read after them: the
            dots-first read order of test_engine.py, and leave-one-out GASW/GDSW (test_weighting.py)
        <g_i, S>, |S|^2 from S: seed_mlp "4.weight" at B = 64, "0.weight" at B = 128 (the Gram
            route wins while B (n_in + n_out) < 2 n_in n_out: S counted as a product)
        weighted sum scaling d (n_out <= n_in): seed_mlp "4.weight"; scaling a: "0.weight"
    Factored, T = 1 with G > 1 (a grouped convolution with one output position):
        single_position_groups, c1d = Conv1d(4, 6, 5, groups=2) on length 5 and
        c2d = Conv2d(8, 32, 3, groups=2) on 3x3: Gram route at B = 1 (both) and 7 (c2d)
    Factored, T > 1, ghost norms: sequence (Linear over tokens, G = 1), conv2d_bn_eval c2 (G = 2)
    Factored, T > 1, cosine terms from formed per-sample gradients (persample.cosine_route): their
        Gram matrix (a whole layer formed at once) at B = 1, 7, cache-sized chunks with S at B = 64:
        many_positions "inp", "mix" (G = 1) and "conv" (G = 2); the Gram route at B = 1 also on
        most token layers of the other architectures
    Factored, T > 1, materialised: shared_embedding_tokens "narrow" (Linear over tokens); in several
        chunks of uneven size: test_engine.py::test_materialised_route_in_several_chunks. Convolutions
        where the ghost route costs more take the conv rule's dense route instead (Dense: conv1d c1, c2;
        conv2d_groupnorm); the materialised route with G > 1 is reached when a test forces a conv onto
        the factored route (test_rules_conv.py)
    Factored.merge: shared_bn_fallback "shared" (one Linear called twice; T = 2 after the merge)
    IndexedRows: sequence, shared_embedding_tokens; IndexedRows.merge: shared_embedding_tokens
    FactoredBias (a Linear's bias, a ghost-route convolution's): every such bias; FactoredBias.merge:
        shared_bn_fallback "shared.bias"
    Dense: norm affines, the fallback; Dense.merge: shared_embedding_tokens "norm.weight" (a LayerNorm
        called twice)

gradalign.engine.rules:
    Linear on (B, in): the MLPs; on (B, T, in): sequence; on (B, 2, 3, in): shared_embedding_tokens;
        bias=False: conv2d_bn_eval head, shared_embedding_tokens out, random architectures;
        frozen weight with a trainable bias: shared_embedding_tokens shift; every parameter
        frozen (not hooked): shared_bn_fallback frozen; frozen after the engine was created:
        test_engine_errors.py
    Conv1d: conv1d (padding, stride, dilation, groups, padding="same" with circular padding,
        bias=False), single_position_groups c1d
    Conv2d: conv2d_groupnorm (tuple kernel, stride and padding, groups), conv2d_bn_eval
        (padding="same" with reflect padding; replicate padding with stride, dilation, groups and
        bias=False; frozen weight with a trainable bias), single_position_groups c2d
    Embedding: padding_idx: sequence; no padding_idx, two calls, (B, 2, 3) indices:
        shared_embedding_tokens; frozen after the engine was created: test_engine.py (its
        output then needs no gradient, so the hook skips the call: the rule's own frozen-weight
        branch cannot be reached through the engine)
    LayerNorm: residual_mlp, sequence; without bias, and with a frozen weight: shared_embedding_tokens
    GroupNorm: conv2d_groupnorm, random architectures (on (B, C, L))
    BatchNorm in eval mode, random running statistics and affine parameters: 1-D (B, C):
        shared_bn_fallback; 2-D (B, C, H, W), eps 0.25 so that eps matters: conv2d_bn_eval
    torch.func fallback: shared_bn_fallback scale (a custom module)
"""
import dataclasses
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from gradalign.engine import PerSampleGradients, Rule, default_registry
from gradalign.engine.persample import Factored


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
        nn.init.uniform_(self.bn.weight, 0.5, 1.5)
        nn.init.normal_(self.bn.bias, std=0.1)
        self.shared = nn.Linear(d, d)
        self.scale = Scale(d)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.bn(self.frozen(x))
        h = self.act(self.shared(h))
        h = self.act(self.shared(h))
        return self.head(self.scale(h))


class SinglePositionGroups(nn.Module):
    """Grouped convolutions whose kernel covers the whole input: one output position (T = 1)
    and G = 2 groups, the Factored case that is neither the 2-D fast path nor a sum over positions."""

    def __init__(self, classes=5):
        super().__init__()
        self.c1d = nn.Conv1d(4, 6, 5, groups=2)  # on (B, 4, 5): n_in 10, n_out 3
        self.c2d = nn.Conv2d(8, 32, 3, groups=2)  # on (B, 8, 3, 3): n_in 36, n_out 16, Gram route for B <= 22
        self.head = nn.Linear(6 + 32, classes)

    def forward(self, x):  # (B, 8, 3, 3)
        seq = x[:, :4].flatten(2)[:, :, :5]  # (B, 4, 5)
        return self.head(torch.tanh(torch.cat([self.c1d(seq).flatten(1), self.c2d(x).flatten(1)], 1)))


class Conv2dBatchNormEval(nn.Module):
    """Conv2d with string padding, reflect and replicate padding, stride, dilation and groups; eval
    BatchNorm2d with random running statistics and affine parameters (eps large enough to matter);
    a Conv2d whose weight is frozen (bias only); a Linear without bias."""

    def __init__(self, classes=5):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding="same", padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8, eps=0.25).eval()
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.05, 2.0)
        nn.init.uniform_(self.bn.weight, 0.5, 1.5)
        nn.init.normal_(self.bn.bias, std=0.1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, dilation=2, padding=1, padding_mode="replicate", groups=2,
                            bias=False)  # 6x6 -> 2x2: T = 4, n_in 36, n_out 8
        self.c3 = nn.Conv2d(16, 6, 2)  # 2x2 -> 1x1
        self.c3.weight.requires_grad_(False)
        self.head = nn.Linear(6, classes, bias=False)

    def forward(self, x):  # (B, 3, 6, 6)
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))
        return self.head(torch.tanh(self.c3(h)).flatten(1))


class ManyPositions(nn.Module):
    """Layers over 16 positions, where |g_i|^2, <g_i, S> and |S|^2 are cheapest from formed
    per-sample gradients (persample.cosine_route 'gram' at B <= 7, 'materialise' at B = 64):
    Linear layers with and without bias (G = 1), and a grouped Conv1d on the ghost route (G = 2,
    40 x 40 per group)."""

    def __init__(self, classes=5):
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.mix = nn.Linear(10, 16, bias=False)
        self.conv = nn.Conv1d(16, 80, 5, padding=2, groups=2)
        self.head = nn.Linear(80, classes)

    def forward(self, x):  # (B, 16, 6)
        h = torch.tanh(self.mix(torch.tanh(self.inp(x))))
        return self.head(torch.tanh(self.conv(h.transpose(1, 2))).mean(2))


class SharedEmbeddingTokens(nn.Module):
    """Tokens on a (B, 2, 3) grid: an Embedding without padding_idx called twice, LayerNorm without
    bias (called twice), LayerNorm with a frozen weight, Linear layers over (B, 2, 3, in) inputs: one
    with a frozen weight (bias only), one narrow enough that materialising beats the ghost route, one
    without bias."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim, bias=False)
        self.shift = nn.Linear(dim, dim)
        self.shift.weight.requires_grad_(False)
        self.norm2 = nn.LayerNorm(dim)
        self.norm2.weight.requires_grad_(False)
        self.narrow = nn.Linear(dim, 3)  # T = 6: 6 (8 + 3) > 8 * 3
        self.out = nn.Linear(3, vocab, bias=False)

    def forward(self, tokens):  # (B, 2, 3) -> (B, 6, vocab)
        # one Embedding, two calls; the tanh gives the two calls different output gradients
        h = self.embed(tokens) + torch.tanh(self.embed(tokens.flip(2)))
        h = self.norm(self.norm2(self.shift(self.norm(h))))
        return self.out(torch.tanh(self.narrow(h))).flatten(1, 2)


def grid_token_batch(vocab=20):
    def make(B, gen):
        return torch.randint(0, vocab, (B, 2, 3), generator=gen), torch.randint(0, vocab, (B, 6), generator=gen)
    return make


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
    "single_position_groups": lambda: (SinglePositionGroups(), classification_batch(8, 3, 3, classes=5),
                                       cross_entropy),
    "conv2d_bn_eval": lambda: (Conv2dBatchNormEval(), classification_batch(3, 6, 6, classes=5), cross_entropy),
    "shared_embedding_tokens": lambda: (SharedEmbeddingTokens(), grid_token_batch(), token_cross_entropy),
    "many_positions": lambda: (ManyPositions(), classification_batch(16, 6, classes=5), cross_entropy),
}


# One parameter per route of gradalign.engine.persample: label -> (architecture, B, parameter).
PERSAMPLE_ROUTES = {
    "2-D, Gram route": ("seed_mlp", 64, "2.weight"),
    "2-D, from S": ("seed_mlp", 64, "4.weight"),
    "2-D, weighted sum scales d": ("seed_mlp", 64, "4.weight"),
    "2-D, weighted sum scales a": ("seed_mlp", 64, "0.weight"),
    "T = 1, G > 1, Gram route": ("single_position_groups", 7, "c2d.weight"),
    "T = 1, G > 1, from S": ("single_position_groups", 64, "c2d.weight"),
    "T > 1, ghost, G = 1": ("sequence", 7, "mix.weight"),
    "T > 1, ghost, G > 1": ("conv2d_bn_eval", 7, "c2.weight"),
    "T > 1, materialised, G = 1": ("shared_embedding_tokens", 7, "narrow.weight"),
    "T > 1, Gram from formed gradients, G = 1": ("many_positions", 7, "inp.weight"),
    "T > 1, Gram from formed gradients, G > 1": ("many_positions", 7, "conv.weight"),
    "T > 1, cosines from formed chunks, G = 1": ("many_positions", 64, "inp.weight"),
    "T > 1, cosines from formed chunks, G > 1": ("many_positions", 64, "conv.weight"),
    "Dense": ("conv1d", 7, "c2.weight"),  # a conv where the ghost route costs more: one grouped weight-gradient call
    "Factored merged": ("shared_bn_fallback", 7, "shared.weight"),
    "IndexedRows": ("sequence", 7, "embed.weight"),
    "IndexedRows merged": ("shared_embedding_tokens", 7, "embed.weight"),
    "Dense merged": ("shared_embedding_tokens", 7, "norm.weight"),
    "FactoredBias merged": ("shared_bn_fallback", 7, "shared.bias"),
}


def route_labels(calls: list) -> set[str]:
    """The PERSAMPLE_ROUTES labels that one parameter's per-sample gradients take, given what
    the rule returned for each call of its module."""
    labels = {f"{type(calls[0]).__name__} merged"} if len(calls) > 1 else set()
    grads = calls[0]
    for other in calls[1:]:
        grads = grads.merge(other)
    if not isinstance(grads, Factored):
        return labels | {type(grads).__name__}
    _, G, T, n_in = grads.A.shape
    n_out = grads.D.shape[3]
    if T > 1:
        route = "ghost" if grads._ghost_is_cheaper() else "materialised"
        labels.add(f"T > 1, {route}, G {'= 1' if G == 1 else '> 1'}")
        cosines = {"gram": "Gram from formed gradients", "materialise": "cosines from formed chunks"}
        if (route := grads.cosine_route(have_sum=False)) in cosines:
            labels.add(f"T > 1, {cosines[route]}, G {'= 1' if G == 1 else '> 1'}")
        return labels
    kind = "2-D" if G == 1 else "T = 1, G > 1"
    labels.add(f"{kind}, {'Gram route' if grads.uses_gram() else 'from S'}")
    if G == 1:
        labels.add(f"2-D, weighted sum scales {'d' if n_out <= n_in else 'a'}")
    return labels


def recording_engine(model: nn.Module) -> tuple[PerSampleGradients, dict[str, list]]:
    """An engine whose rules also record what they return: {parameter name: [per call]},
    filled by each backward (for checking which route a parameter takes)."""
    record = defaultdict(list)
    registry = default_registry()
    paths = {id(m): path for path, m in model.named_modules()}

    def recording(rule: Rule) -> Rule:
        def compute(module, args, grad_output):
            out = rule.compute(module, args, grad_output)
            for local, grads in out.items():
                record[f"{paths[id(module)]}.{local}".lstrip(".")].append(grads)
            return out
        return dataclasses.replace(rule, compute=compute)  # every other field of the rule kept

    for module_type in {type(m) for m in model.modules()}:
        rule = registry.rule_for(next(m for m in model.modules() if type(m) is module_type))
        if rule is not None:
            registry.register(module_type, recording(rule))
    return PerSampleGradients(model, registry=registry), record


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
