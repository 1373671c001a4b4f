"""Small architectures for the engine tests: each returns (model, make_batch, loss_fn).

test_engine.py compares every statistic of every architecture in ARCHITECTURES with the
torch.func reference at B = 1, 7 and 64, reading the statistics in two orders (norms first,
and <g_i, gbar>, |gbar|^2 first). Between them the architectures reach every branch of the
engine, so that a change to one route cannot break it silently:

gradalign.engine.persample (PERSAMPLE_ROUTES below names one parameter per route, and
test_engine.py::test_architectures_take_the_listed_routes checks that it takes it):
    Factored, 2-D case (G = T = 1, nn.Linear on (B, in)): seed_mlp, residual_mlp, every head
        <g_i, S>, |S|^2 from the B x B Gram matrix: seed_mlp "2.weight" at B <= 127; at B = 1, 7
            most 2-D layers. |g_i|^2 from the Gram diagonal when read after them: the
            dots-first read order of test_engine.py, and leave-one-out GASW/GDSW (test_weighting.py)
        <g_i, S>, |S|^2 from S: seed_mlp "0.weight" and "4.weight" at B = 64
        weighted sum scaling d (n_out <= n_in): seed_mlp "4.weight"; scaling a: "0.weight"
    Factored, T = 1 with G > 1 (a grouped convolution with one output position):
        single_position_groups, c1d = Conv1d(4, 6, 5, groups=2) on length 5 and
        c2d = Conv2d(8, 32, 3, groups=2) on 3x3: Gram route at B = 1 (both) and 7 (c2d)
    Factored, T > 1, ghost norms: sequence (Linear over tokens, G = 1), conv2d_bn_eval c2 (G = 2)
    Factored, T > 1, materialised: conv1d, conv2d_groupnorm, conv2d_bn_eval c1,
        shared_embedding_tokens (Linear over tokens); in several chunks of uneven size:
        test_engine.py::test_materialised_route_in_several_chunks
    Factored.merge: shared_bn_fallback "shared" (one Linear called twice; T = 2 after the merge)
    IndexedRows: sequence, shared_embedding_tokens; IndexedRows.merge: shared_embedding_tokens
    Dense: every bias and norm affine, the fallback; Dense.merge: shared_bn_fallback "shared.bias"

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
        nn.init.normal_(self.bn.bias)
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
        self.c2d = nn.Conv2d(8, 32, 3, groups=2)  # on (B, 8, 3, 3): n_in 36, n_out 16, Gram route for B <= 11
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
        nn.init.normal_(self.bn.bias)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, dilation=2, padding=1, padding_mode="replicate", groups=2,
                            bias=False)  # 6x6 -> 2x2: T = 4, n_in 36, n_out 8
        self.c3 = nn.Conv2d(16, 6, 2)  # 2x2 -> 1x1
        self.c3.weight.requires_grad_(False)
        self.head = nn.Linear(6, classes, bias=False)

    def forward(self, x):  # (B, 3, 6, 6)
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))
        return self.head(torch.tanh(self.c3(h)).flatten(1))


class SharedEmbeddingTokens(nn.Module):
    """Tokens on a (B, 2, 3) grid: an Embedding without padding_idx called twice, LayerNorm without
    bias, LayerNorm with a frozen weight, Linear layers over (B, 2, 3, in) inputs: one with a frozen
    weight (bias only), one narrow enough that materialising beats the ghost route, one without bias."""

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
        h = self.norm2(self.shift(self.norm(h)))
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
    "shared_bn_fallback": lambda: (SharedTwice(), classification_batch(16, classes=4), cross_entropy),
    "single_position_groups": lambda: (SinglePositionGroups(), classification_batch(8, 3, 3, classes=5),
                                       cross_entropy),
    "conv2d_bn_eval": lambda: (Conv2dBatchNormEval(), classification_batch(3, 6, 6, classes=5), cross_entropy),
    "shared_embedding_tokens": lambda: (SharedEmbeddingTokens(), grid_token_batch(), token_cross_entropy),
}


# One parameter per route of gradalign.engine.persample: label -> (architecture, B, parameter).
PERSAMPLE_ROUTES = {
    "2-D, Gram route": ("seed_mlp", 64, "2.weight"),
    "2-D, from S": ("seed_mlp", 64, "0.weight"),
    "2-D, weighted sum scales d": ("seed_mlp", 64, "4.weight"),
    "2-D, weighted sum scales a": ("seed_mlp", 64, "0.weight"),
    "T = 1, G > 1, Gram route": ("single_position_groups", 7, "c2d.weight"),
    "T = 1, G > 1, from S": ("single_position_groups", 64, "c2d.weight"),
    "T > 1, ghost, G = 1": ("sequence", 7, "mix.weight"),
    "T > 1, ghost, G > 1": ("conv2d_bn_eval", 7, "c2.weight"),
    "T > 1, materialised, G = 1": ("conv1d", 7, "c1.weight"),
    "T > 1, materialised, G > 1": ("conv1d", 7, "c2.weight"),
    "Factored merged": ("shared_bn_fallback", 7, "shared.weight"),
    "IndexedRows": ("sequence", 7, "embed.weight"),
    "IndexedRows merged": ("shared_embedding_tokens", 7, "embed.weight"),
    "Dense merged": ("shared_bn_fallback", 7, "shared.bias"),
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
        return labels | {f"T > 1, {route}, G {'= 1' if G == 1 else '> 1'}"}
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
        return Rule(compute, rule.check, rule.check_call)

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
