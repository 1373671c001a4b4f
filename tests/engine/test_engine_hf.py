"""Hugging Face transformers models as they come, built from tiny configs (nothing downloaded),
against the torch.func reference: every statistic, at B = 1 and 7.

Covered: GPT-2 (tied input/output embeddings, Conv1D, (1, T) position ids), BERT and RoBERTa
(padding masks; BERT's (1, T) position lookups; RoBERTa's masked-LM head tied to the word
embeddings), ViT (cls token and position embedding owned by ViTEmbeddings, called with keyword
arguments), T5 (shared embedding tied to the LM head, relative attention bias looked up with
(T, T) buckets) and BART (embedding subclasses with their own forward, shared embedding tied to
the LM head). Eager attention everywhere, SDPA for GPT-2, BERT and T5; dropout against a
per-sample loop. Models with attention masks use the reference one sample at a time
(vectorize=False): their mask checks are data-dependent, which vmap cannot batch.
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

import gradalign as ga  # noqa: E402
from gradalign.engine import PerSampleGradients  # noqa: E402
from tests.support.compare import compare_all, loop_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

V, T = 60, 8  # T differs from every B tested (see test_t5_with_as_many_tokens_as_samples)


class Inputs(nn.Module):
    """A Hugging Face model fed from one (B, rows, T) tensor, as the references need: rows are
    input_ids, attention_mask and (encoder-decoders) decoder_input_ids."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        kwargs = {"input_ids": x[:, 0], "attention_mask": x[:, 1]}
        if x.shape[1] > 2:
            kwargs["decoder_input_ids"] = x[:, 2]
        return self.model(**kwargs)


def token_ids(B, gen):
    ids = torch.randint(1, V, (B, T), generator=gen)
    return ids, ids


def padded(rows=2, classes=3, labels="class"):
    """Ids with right padding (every sample keeps at least T/2 tokens), and targets."""
    def make(B, gen):
        x = torch.randint(1, V, (B, rows, T), generator=gen)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
        mask = (torch.arange(T) < lengths[:, None]).long()
        x[:, 1] = mask
        if labels == "class":
            return x, torch.randint(0, classes, (B,), generator=gen)
        target = x[:, 2 if rows > 2 else 0].masked_fill(mask == 0, -100)
        return x, target
    return make


def lm_loss(out, labels):  # causal LM: position t predicts token t + 1
    return ga.token_losses(out.logits, labels, shift=True)


def seq2seq_loss(out, labels):
    return ga.token_losses(out.logits, labels)


def classify(out, y):
    return F.cross_entropy(out.logits, y, reduction="none")


def gpt2(impl="eager", dropout=0.0):
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=V, n_positions=16, resid_pdrop=dropout,
                                     embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation=impl)
    return transformers.GPT2LMHeadModel(config), token_ids, lm_loss


def bert(impl="eager", dropout=0.0):
    config = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout, num_labels=3, attn_implementation=impl)
    return Inputs(transformers.BertForSequenceClassification(config)), padded(), classify


def roberta_config(impl="eager"):
    return transformers.RobertaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=T + 4, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, num_labels=3, attn_implementation=impl)


def roberta(impl="eager"):
    return Inputs(transformers.RobertaForSequenceClassification(roberta_config(impl))), padded(), classify


def roberta_mlm(impl="eager"):  # the LM head's decoder is tied to the word embeddings
    return Inputs(transformers.RobertaForMaskedLM(roberta_config(impl))), padded(labels="tokens"), seq2seq_loss


def vit(impl="eager"):
    config = transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, attn_implementation=impl)

    def images(B, gen):
        return torch.randn(B, 3, 8, 8, generator=gen), torch.randint(0, 3, (B,), generator=gen)
    return transformers.ViTForImageClassification(config), images, classify


def t5(impl="eager"):
    config = transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=8,
                                   attn_implementation=impl)
    return Inputs(transformers.T5ForConditionalGeneration(config)), padded(rows=3, labels="tokens"), seq2seq_loss


def bart(impl="eager"):
    config = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
                                     activation_dropout=0.0, scale_embedding=True, attn_implementation=impl)
    return Inputs(transformers.BartForConditionalGeneration(config)), padded(rows=3, labels="tokens"), seq2seq_loss


MODELS = {"gpt2": (gpt2, True), "bert": (bert, False), "roberta": (roberta, False), "roberta_mlm": (roberta_mlm, False),
          "vit": (vit, True), "t5": (t5, False), "bart": (bart, False)}  # name: (builder, vmap reference works)


def compare(name, B, impl="eager"):
    build, vectorize = MODELS[name]
    torch.manual_seed(0)
    model, make_batch, loss_fn = build(impl)
    model.train()
    compare_all(model, make_batch, loss_fn, B=B, reference=functools.partial(ga.reference_statistics,
                                                                               vectorize=vectorize))


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hugging_face_models_match_torch_func(name, B):
    compare(name, B)


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_sdpa_attention_matches_torch_func(name):
    compare(name, 7, impl="sdpa")


@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2", "bert"])
def test_dropout_matches_a_per_sample_loop(build):
    torch.manual_seed(0)
    model, make_batch, loss_fn = build(dropout=0.2)
    compare_all(model, make_batch, loss_fn, B=5, reference=loop_reference(3), forward_seed=3)


def test_every_module_is_served_by_a_rule_or_watched_never_vmapped(monkeypatch):
    def no_vmap(*args, **kwargs):
        raise AssertionError("the torch.func fallback ran")
    monkeypatch.setattr("gradalign.engine.rules.fallback_rule", no_vmap)
    for name in ("gpt2", "t5", "bart", "vit"):
        compare(name, 3)


def test_gpt2_conv1d_has_its_own_rule_and_tied_embeddings_one_name():
    model, _, _ = gpt2()
    engine = PerSampleGradients(model)
    conv = engine._hooked["transformer.h.0.attn.c_attn"]
    assert not conv.rule.watch and conv.rule.compute.__name__ == "hf_conv1d_rule"
    assert engine._hooked["lm_head"].param_names == {"weight": "transformer.wte.weight"}
    engine.remove()


def test_t5_with_as_many_tokens_as_samples():
    """T5's (T, T) relative-position buckets have size B on dim 0 when T == B: declared shared by
    the default registry; without the declaration verify=True catches the misattribution."""
    torch.manual_seed(0)
    model, make_batch, loss_fn = t5()
    compare_all(model, make_batch, loss_fn, B=T, reference=functools.partial(ga.reference_statistics, vectorize=False))
    registry = ga.default_registry()
    registry._shared.clear()
    x, y = make_batch(T, torch.Generator().manual_seed(0))
    engine = PerSampleGradients(model, registry=registry, verify=True)
    with pytest.raises(ga.UnsupportedModuleError, match="register_shared"):
        engine.backward(loss_fn(model(x), y))
    engine.remove()


def test_token_losses_average_each_samples_own_tokens():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, -100, -100], [3, 4, 0, 1]])
    per_token = F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    expected = torch.stack([per_token[0, :2].mean(), per_token[1].mean()])
    torch.testing.assert_close(ga.token_losses(logits, labels), expected)
    torch.testing.assert_close(ga.token_losses(logits, labels, shift=True)[1], per_token.new_tensor(
        F.cross_entropy(logits[1, :-1], labels[1, 1:]).item()))
    assert ga.token_losses(logits, torch.full((2, 4), -100)).tolist() == [0.0, 0.0]
