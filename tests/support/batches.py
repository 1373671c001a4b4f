"""Batches and per-sample losses of the engine tests' architectures: each make_batch(B, generator)
returns (inputs, targets)."""
import torch
import torch.nn.functional as F


def cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")


def token_cross_entropy(out, y):  # (B, T, V), (B, T) -> (B,) mean over tokens
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def classification_batch(*shape, classes=10):
    def make(B, gen):
        return torch.randn(B, *shape, generator=gen), torch.randint(0, classes, (B,), generator=gen)
    return make


def token_batch(vocab=20, T=6):
    def make(B, gen):
        return torch.randint(0, vocab, (B, T), generator=gen), torch.randint(0, vocab, (B, T), generator=gen)
    return make


def grid_token_batch(vocab=20):
    def make(B, gen):
        return torch.randint(0, vocab, (B, 2, 3), generator=gen), torch.randint(0, vocab, (B, 6), generator=gen)
    return make


def sequence_batch(T, E, classes=3):
    return classification_batch(T, E, classes=classes)


def labelled_token_batch(vocab=20, T=6, classes=5):
    def make(B, gen):
        return torch.randint(0, vocab, (B, T), generator=gen), torch.randint(0, classes, (B,), generator=gen)
    return make
