"""The engine tests' small architectures without attention: MLPs, convolutions, sequence models,
tied and shared parameters, modules without a rule (engine_models.py lists what each reaches)."""
import torch
import torch.nn.functional as F
from torch import nn


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


class NormEps(nn.Module):
    """Watched LayerNorms (subclasses with their own forward) whose eps is not F.layer_norm's
    default 1e-5: eps 0.5 on inputs of order 1, and eps 1e-6 on inputs of order 1e-3 (their
    variance ~1e-6, so the x-hat the watch recomputes is wrong unless it takes the module's eps)."""

    def __init__(self, d=10, classes=4):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.wide = FloatLayerNorm(d, eps=0.5)
        self.mix = nn.Linear(d, d)
        self.tight = FloatLayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # (B, d)
        h = self.mix(torch.tanh(self.wide(self.inp(x))))
        return self.head(self.tight(h * 1e-3))


class WatchedRootTwice(nn.Module):
    """A raw parameter of the root module used twice, x * gamma + gamma: its per-sample gradients
    at the two uses must be summed (each use alone gives a different gradient)."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # (B, T, d)
        h = torch.tanh(self.inp(x))
        return self.head(torch.tanh(h * self.gamma + self.gamma).mean(1))


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
    per-sample gradients (representations.cosine_route 'gram' at B <= 7, 'materialise' at B = 64):
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


def seed_mlp():
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class LSTMLanguageModel(nn.Module):
    """Embedding, a 2-layer LSTM (batch_first), a Linear per token: (B, T) ids -> (B, T, V)."""

    def __init__(self, vocab=20, dim=6, hidden=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.out(self.rnn(self.embed(ids))[0])


class BagGRUClassifier(nn.Module):
    """(B, T) ids: an EmbeddingBag (mean) of the ids, and a bidirectional GRU (seq-first inside,
    given h0 from the bag) over their Embedding; the head reads h_n and the bag."""

    def __init__(self, vocab=20, dim=4, hidden=3, classes=5):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.embed = nn.Embedding(vocab, dim)
        self.init = nn.Linear(dim, 2 * hidden)
        self.rnn = nn.GRU(dim, hidden, bidirectional=True)
        self.head = nn.Linear(2 * hidden + dim, classes)

    def forward(self, ids):
        bag = self.bag(ids)                                                   # (B, dim)
        h0 = self.init(bag).view(-1, 2, self.rnn.hidden_size).transpose(0, 1).contiguous()
        _, h = self.rnn(self.embed(ids).transpose(0, 1), h0)                  # (T, B, dim) in
        return self.head(torch.cat([h[0], h[1], bag], -1))
