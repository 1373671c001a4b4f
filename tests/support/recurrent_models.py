"""Recurrent test models: any nn.LSTM / nn.GRU / nn.RNN configuration inside a small network whose
losses read the output sequence, h_n and c_n, optionally fed a PackedSequence of unequal, unsorted
lengths and initial states computed by another layer; and a sequence-first language model."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

LENGTHS = (4, 2, 5, 1, 5, 3, 2)  # unsorted, unequal: the packed batches (at most 7 samples, T = 5)


class RecurrentNet(nn.Module):
    """(B, T, 4) or (T, B, 4) inputs through a Linear, the recurrent layer, and a head reading the mean
    of the output sequence, the last layer's h_n and the sum of c_n (or h_n): every output counts."""

    def __init__(self, rnn: nn.RNNBase, packed: bool = False, given: bool = False):
        super().__init__()
        self.rnn, self.packed, self.given = rnn, packed, given
        D = 2 if rnn.bidirectional else 1
        H = rnn.proj_size or rnn.hidden_size
        self.inp = nn.Linear(4, rnn.input_size)
        if given:  # h0 (and c0) from the first step's input
            self.init = nn.Linear(rnn.input_size, rnn.num_layers * D * H)
            if isinstance(rnn, nn.LSTM):
                self.cell_init = nn.Linear(rnn.input_size, rnn.num_layers * D * rnn.hidden_size)
        self.head = nn.Linear(D * H, 3)

    def _states(self, first):
        B = first.shape[0]
        h0 = self.init(first).view(B, -1, self.rnn.proj_size or self.rnn.hidden_size).transpose(0, 1).contiguous()
        if not isinstance(self.rnn, nn.LSTM):
            return h0
        return h0, self.cell_init(first).view(B, -1, self.rnn.hidden_size).transpose(0, 1).contiguous()

    def forward(self, x):
        bf = self.rnn.batch_first
        x = self.inp(x)
        hx = self._states(x[:, 0] if bf else x[0]) if self.given else None
        if self.packed:
            lengths = torch.tensor(LENGTHS[:x.shape[0 if bf else 1]])
            x = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
        out, hidden = self.rnn(x, hx)
        h, c = hidden if isinstance(hidden, tuple) else (hidden, hidden)
        if self.packed:
            out = pad_packed_sequence(out, batch_first=bf)[0]
        last = h[-1].repeat(1, out.shape[-1] // h.shape[-1])
        return self.head(out.mean(1 if bf else 0) + last) + c.sum(0).sum(-1, keepdim=True)


def sequences(batch_first: bool, T: int = 5):
    def make(B, gen):
        x = torch.randn(B, T, 4, generator=gen)
        return (x if batch_first else x.transpose(0, 1).contiguous()), torch.randint(0, 3, (B,), generator=gen)
    return make


class SequenceFirstLM(nn.Module):
    """(T, B) ids -> (T, B, V): Embedding, LayerNorm, LSTM (batch_first=False), Linear per token, and
    a head on the last state (B, H) whose logits are added to every token's."""

    def __init__(self, vocab=11, dim=4, hidden=5):
        super().__init__()
        self.embed, self.norm = nn.Embedding(vocab, dim), nn.LayerNorm(dim)
        self.rnn = nn.LSTM(dim, hidden)
        self.out, self.last = nn.Linear(hidden, vocab), nn.Linear(hidden, vocab)

    def forward(self, ids):
        out, (h, _) = self.rnn(self.norm(self.embed(ids)))
        return self.out(out) + self.last(h[-1])


def sequence_first_tokens(T: int, vocab: int = 11):
    """(T, B) ids and (T, B) targets."""
    def make(B, gen):
        return (torch.randint(0, vocab, (T, B), generator=gen), torch.randint(0, vocab, (T, B), generator=gen))
    return make


def sequence_first_token_losses(out, y):  # (T, B, V), (T, B) -> (B,)
    return F.cross_entropy(out.permute(1, 2, 0), y.T, reduction="none").mean(1)
