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
