"""nn.Embedding: row lookups, g_i(W) = sum_t onehot(idx_it) d_it^T, kept as (index, D)."""
from torch import Tensor, nn

from gradalign.engine.representations import IndexedRows


def lookup_check(module: nn.Embedding | nn.EmbeddingBag) -> str | None:
    """Why an Embedding or EmbeddingBag cannot be served (None: it can)."""
    kind = "EmbeddingBag" if isinstance(module, nn.EmbeddingBag) else "Embedding"
    if module.scale_grad_by_freq:
        return ("scale_grad_by_freq scales gradients by index counts over the whole batch, which mixes samples; "
                f"construct the {kind} with scale_grad_by_freq=False")
    if module.sparse:
        return f"sparse gradients are not supported; construct the {kind} with sparse=False"
    return None


def embedding_rule(module: nn.Embedding, args: tuple, grad_output: Tensor) -> dict:
    index = args[0]
    B = index.shape[0]
    index = index.reshape(B, -1)
    d = grad_output.reshape(B, index.shape[1], module.embedding_dim)
    if module.padding_idx is not None:  # PyTorch gives the padding row no gradient
        d = d * (index != module.padding_idx).unsqueeze(-1).to(d.dtype)
    if not module.weight.requires_grad:
        return {}
    return {"weight": IndexedRows(index, d, module.num_embeddings)}
