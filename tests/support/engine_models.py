"""Small architectures for the engine tests: each returns (model, make_batch, loss_fn).

test_engine.py compares every statistic of every architecture in ARCHITECTURES with the
torch.func reference at B = 1, 7 and 64, reading the statistics in two orders (norms first,
and <g_i, gbar>, |gbar|^2 first). Between them the architectures reach every branch of the
engine, so that a change to one route cannot break it silently:

gradalign.engine.representations (PERSAMPLE_ROUTES below names one parameter per route, and
test_engine.py::test_architectures_take_the_listed_routes checks that it takes it):
    Factored, 2-D case (G = T = 1, nn.Linear on (B, in)): seed_mlp, residual_mlp, every head
        <g_i, S>, |S|^2 from the B x B Gram matrix: seed_mlp "2.weight" at B <= 255; at B = 1, 7
            most 2-D layers. |g_i|^2 from the Gram diagonal when read after them: the
            dots-first read order of test_engine.py, and leave-one-out GASW/GDSW (tests/methods/test_gasw.py)
        <g_i, S>, |S|^2 from S: seed_mlp "4.weight" at B = 64, "0.weight" at B = 128 (the Gram
            route wins while B (n_in + n_out) < 2 n_in n_out: S counted as a product)
        weighted sum scaling d (n_out <= n_in): seed_mlp "4.weight"; scaling a: "0.weight"
    Factored, T = 1 with G > 1 (a grouped convolution with one output position):
        single_position_groups, c1d = Conv1d(4, 6, 5, groups=2) on length 5 and
        c2d = Conv2d(8, 32, 3, groups=2) on 3x3: Gram route at B = 1 (both) and 7 (c2d)
    Factored, T > 1, ghost norms: sequence (Linear over tokens, G = 1), conv2d_bn_eval c2 (G = 2)
    Factored, T > 1, cosine terms from formed per-sample gradients (representations.cosine_route): their
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
    LSTM (2 layers, batch_first, the output sequence): lstm_lm; GRU (bidirectional, seq-first inside a
        batch-first model, h0 given by another layer, h_n read): bag_gru; every other configuration,
        packed sequences and dropout: test_rules_recurrent.py
    EmbeddingBag (2-D input, mean): bag_gru; offsets, sum/max, per_sample_weights, padding_idx:
        test_rules_embedding_bag.py
    watched LayerNorm subclasses (their own forward) with eps 0.5 and 1e-6 on inputs ~1e-3 (x-hat
        recomputed with the module's eps, not F.layer_norm's default): norm_eps
    a raw parameter of the root used twice, x * gamma + gamma (per-sample gradients summed over its
        uses): watched_root_twice
    nn.MultiheadAttention with dropout 0.5 and a TransformerEncoderLayer with dropout 0.1, in eval
        mode (the recompute must not drop): mha_eval_dropout, encoder_eval_dropout; query is key
        with a different value, att(x, x, 2 x): MHA_CONFIGS "self_distinct_value"
"""
import torch
from torch import nn

from tests.support.attention_models import (MHA_CONFIGS, Attention, Decoder, Encoder, LayerScale,  # noqa: F401
                                            RawParameters, Seq2Seq, TinyViT)
from tests.support.batches import (classification_batch, cross_entropy, grid_token_batch,  # noqa: F401
                                   labelled_token_batch, sequence_batch, token_batch, token_cross_entropy)
from tests.support.nets import (BagGRUClassifier, Conv1dNet, Conv2dBatchNormEval, Conv2dGroupNorm,  # noqa: F401
                                LSTMLanguageModel, ManyPositions, NormEps, ResidualMLP, SharedEmbeddingTokens,
                                SharedPositions, SharedTwice, SinglePositionGroups, SubclassedLayers, TiedLM,
                                TinySequenceModel, WatchedRootTwice, seed_mlp)
from tests.support.routes import PERSAMPLE_ROUTES, recording_engine, route_labels  # noqa: F401


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
    "lstm_lm": lambda: (LSTMLanguageModel(), token_batch(), token_cross_entropy),
    "bag_gru": lambda: (BagGRUClassifier(), labelled_token_batch(), cross_entropy),
    "norm_eps": lambda: (NormEps(), classification_batch(10, classes=4), cross_entropy),
    "watched_root_twice": lambda: (WatchedRootTwice(), sequence_batch(4, 6), cross_entropy),
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


ARCHITECTURES.update({
    "vit_cls_pos": lambda: (TinyViT(), classification_batch(3, 4, 4, classes=3), cross_entropy),
    "encoder_post_norm": lambda: (Encoder(), sequence_batch(5, 8), cross_entropy),
    "encoder_pre_norm_seq_first": lambda: (Encoder(batch_first=False, norm_first=True), sequence_batch(5, 8),
                                           cross_entropy),
    "decoder_layer": lambda: (Decoder(), sequence_batch(4 + 6, 8), cross_entropy),
    "transformer_seq_first": lambda: (Seq2Seq(batch_first=False), sequence_batch(3 + 4, 8), cross_entropy),
    "raw_parameters": lambda: (RawParameters(), sequence_batch(4, 6), cross_entropy),
    # dropout configured but the model in eval mode: the attention rule's recompute must not drop
    "mha_eval_dropout": lambda: (Attention(dropout=0.5).eval(), sequence_batch(5, 8), cross_entropy),
    "encoder_eval_dropout": lambda: (Encoder(dropout=0.1).eval(), sequence_batch(5, 8), cross_entropy),
})
