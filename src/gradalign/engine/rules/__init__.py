"""The per-layer rules, one explicit registry keyed by module type.

A rule turns what the engine captured for one call of a module (its inputs and the gradient
of the summed losses w.r.t. its output) into per-sample gradients of the parameters it
serves: {local parameter name: Factored | IndexedRows | Dense | RowBlocks}.

Modules without a rule get the registry's fallback, whose parameters are watched at their
point of use during the module's forward (`engine/watching/watch.py`); the fallback's own compute
(torch.func) serves a call only where watching meets an operation it cannot follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from gradalign.engine.rules.attention import (attention_capture, attention_check_call, attention_inner,
                                              attention_output, attention_rule, transformer_batch_dim)
from gradalign.engine.rules.conv import conv_rule
from gradalign.engine.rules.conv_transpose import conv_transpose_rule
from gradalign.engine.rules.embedding import embedding_rule, lookup_check
from gradalign.engine.rules.embedding_bag import embedding_bag_capture, embedding_bag_rule
from gradalign.engine.rules.fallback import fallback_capture, fallback_check_call, fallback_output, fallback_rule
from gradalign.engine.rules.hf_conv1d import hf_conv1d_own_cosines, hf_conv1d_rule
from gradalign.engine.rules.linear import linear_own_cosines, linear_rule
from gradalign.engine.rules.norm import (batch_norm_check, batch_norm_rule, group_norm_rule, instance_norm_rule,
                                        layer_norm_rule)
from gradalign.engine.rules.recurrent import (recurrent_capture, recurrent_check_call, recurrent_output,
                                              recurrent_rule)


@dataclass(frozen=True)
class Rule:
    """compute(module, args, grad_output) -> {name: per-sample grad}.

    By default `args` are the call's positional inputs and `grad_output` the gradient at its
    output, both detached and with the batch on dim 0 (the engine moves it there inside a
    batch_first=False transformer). A rule can declare more:

    check(module) -> reason string when the module, as configured now, is unsupported.
    check_call(module, args, kwargs, output) -> reason when one particular call is unsupported.
    capture(module, args, kwargs, batch_dim) -> tuple: what compute receives as `args`, taken
        just before the module's forward runs (so it may also save state such as the RNG's);
        the first element must be a tensor with the batch on dim 0. `batch_dim` is where the
        enclosing layout puts the batch.
    output(out) -> tuple: the module's outputs (tensors or None) whose gradients compute receives
        as `grad_output`, a tuple in the same order (None where an output received none); the
        gradients then stay in the module's own layout.
    owns: child modules whose parameters this rule serves; their own forward never runs
        (nn.MultiheadAttention's out_proj). Names are then "child.param".
    watch: the module's parameters are watched at their point of use during its forward
        (engine/watching/watch.py); compute (and check_call) serve a call only where watching stops.
    own_cosines(module, args) -> bool: whether the cosine terms of this call's `own_cosine_params`
        come without S (from the Gram matrix: `representations.cosine_route`), so the backward need not
        form their S.
    reads_parameters: compute reads the module's parameter VALUES, not only their shapes and
        requires_grad (attention's projections, a forward re-run by torch.func, the chains from a
        watched parameter): under FSDP the engine all-gathers the module's unit around it.
    inner(module, args, outputs) -> [GradientEdge]: edges inside the module's own graph whose
        gradients compute receives too, after grad_output's (nn.MultiheadAttention's in-projection
        output: no recompute); [] where it cannot find them (compute then does without).
    features: how many trailing dims of the module's first input are features, never the batch
        (nn.Linear: 1, nn.LayerNorm: its normalised dims, nn.Embedding: 0), or a function of the
        module giving it; None: torch fixes the batch on dim 0 whatever the enclosing layout
        (convolutions, GroupNorm, BatchNorm). Where the batch is: engine/rules/layout.py.
    """

    compute: Callable[[nn.Module, tuple, Tensor], dict]
    check: Callable[[nn.Module], str | None] | None = None
    check_call: Callable[[nn.Module, tuple, dict, object], str | None] | None = None
    capture: Callable[[nn.Module, tuple, dict, int], tuple] | None = None
    output: Callable[[object], tuple] | None = None
    owns: tuple[str, ...] = ()
    watch: bool = False
    own_cosines: Callable[[nn.Module, tuple], bool] | None = None
    own_cosine_params: tuple[str, ...] = ()
    reads_parameters: bool = False
    features: int | Callable[[nn.Module], int] | None = 0
    inner: Callable[[nn.Module, tuple, tuple], list] | None = None

    def reason(self, module: nn.Module) -> str | None:
        return self.check(module) if self.check else None


class RuleRegistry:
    """Maps module types to rules; the most specific registered base class wins, unless a
    subclass between them defines its own forward (HF's BartScaledWordEmbedding is an
    nn.Embedding whose forward scales the lookup): its parameters are then watched like any
    module without a rule. A type may be registered by its qualified name
    ("transformers.pytorch_utils.Conv1D"), so a library need not be imported to be served.

    `layouts` maps module types (or qualified names) to `module -> batch dim (or None)` for modules
    that put the batch on a dim of their own, for their own call and everything they call
    (nn.Transformer* with batch_first=False: dim 1; Opacus's SequenceBias: 1 unless batch_first;
    a batch-first block in a model declared batch_first=False: 0). A function returning None
    leaves the enclosing layout, so one can single out instances. Where the batch is:
    engine/rules/layout.py.

    `register_shared(parent type, child names)` declares children that are always called on
    inputs shared by all samples, whatever their sizes: a module called on a tensor whose batch
    dim does not have size B is recognised as shared anyway, but one whose input has size B
    there by coincidence (T5's relative-position buckets, (T, T), when T == B) is not.
    """

    def __init__(self, rules: dict[type | str, Rule] | None = None, fallback: Rule | None = None,
                 layouts: dict[type, Callable[[nn.Module], int | None]] | None = None):
        self._rules: dict[type | str, Rule] = dict(rules or {})
        self.fallback = fallback
        self._layouts = dict(layouts or {})
        self._shared: dict[type | str, tuple[str, ...]] = {}

    def register(self, module_type: type | str, rule: Rule) -> None:
        self._rules[module_type] = rule

    def register_layout(self, module_type: type | str, batch_dim: Callable[[nn.Module], int | None]) -> None:
        self._layouts[module_type] = batch_dim

    def register_shared(self, parent_type: type | str, *children: str) -> None:
        self._shared[parent_type] = self._shared.get(parent_type, ()) + children

    def shared_children(self, module: nn.Module) -> tuple[str, ...]:
        """Names of `module`'s children that are called on inputs shared by all samples."""
        return _most_specific(self._shared, module) or ()

    def rule_for(self, module: nn.Module) -> Rule | None:
        found = _most_specific(self._rules, module, own_forward=True)
        return found if found is not None else self.fallback

    def batch_dim_for(self, module: nn.Module) -> int | None:
        """Where `module` puts the batch for the modules it calls; None: it leaves it as it is."""
        layout = _most_specific(self._layouts, module)
        return None if layout is None else layout(module)


def _most_specific(table: dict, module: nn.Module, own_forward: bool = False):
    """The entry of the nearest class in the module's MRO (by type or qualified name); with
    own_forward, None if a nearer class defines its own forward."""
    for cls in type(module).__mro__:
        found = table.get(cls) or table.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
        if own_forward and "forward" in cls.__dict__:
            return None
    return None


def default_registry() -> RuleRegistry:
    """A fresh registry with every built-in rule and the watching / torch.func fallback."""
    conv, conv_transpose = Rule(conv_rule, features=None), Rule(conv_transpose_rule, features=None)
    norm_check = Rule(batch_norm_rule, check=batch_norm_check, features=None)
    recurrent = Rule(recurrent_rule, check_call=recurrent_check_call, capture=recurrent_capture,
                     output=recurrent_output, features=None, reads_parameters=True)  # its own batch_first decides
    transformers = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    registry = RuleRegistry(
        {
            nn.Linear: Rule(linear_rule, own_cosines=linear_own_cosines, own_cosine_params=("weight", "bias"),
                            features=1),
            nn.Conv1d: conv,
            nn.Conv2d: conv,
            nn.Conv3d: conv,
            nn.ConvTranspose1d: conv_transpose,
            nn.ConvTranspose2d: conv_transpose,
            nn.ConvTranspose3d: conv_transpose,
            nn.LayerNorm: Rule(layer_norm_rule, features=lambda m: len(m.normalized_shape)),
            nn.GroupNorm: Rule(group_norm_rule, features=None),
            nn.modules.batchnorm._BatchNorm: norm_check,
            nn.modules.instancenorm._InstanceNorm: Rule(instance_norm_rule),
            nn.Embedding: Rule(embedding_rule, check=lookup_check),
            nn.EmbeddingBag: Rule(embedding_bag_rule, check=lookup_check, capture=embedding_bag_capture,
                                  features=None, reads_parameters=True),  # max mode reads the rows
            "transformers.pytorch_utils.Conv1D": Rule(hf_conv1d_rule, own_cosines=hf_conv1d_own_cosines,
                                                      own_cosine_params=("weight",), features=1),  # GPT-2's transposed Linear
            nn.MultiheadAttention: Rule(attention_rule, check_call=attention_check_call, capture=attention_capture,
                                        output=attention_output, owns=("out_proj",), reads_parameters=True,
                                        features=None, inner=attention_inner),
            nn.LSTM: recurrent,
            nn.GRU: recurrent,
            nn.RNN: recurrent,
        },
        fallback=Rule(fallback_rule, check_call=fallback_check_call, capture=fallback_capture,
                      output=fallback_output, watch=True, reads_parameters=True),
        layouts={**dict.fromkeys(transformers, transformer_batch_dim),
                 "opacus.layers.dp_multihead_attention.SequenceBias": lambda m: 0 if m.batch_first else 1},
    )
    for attention in _T5_FAMILY:  # relative-position buckets (T_q, T_k), the same for every sample
        registry.register_shared(f"transformers.models.{attention}", "relative_attention_bias")
    return registry


_T5_FAMILY = ("t5.modeling_t5.T5Attention", "mt5.modeling_mt5.MT5Attention", "umt5.modeling_umt5.UMT5Attention",
              "longt5.modeling_longt5.LongT5Attention", "longt5.modeling_longt5.LongT5LocalAttention",
              "longt5.modeling_longt5.LongT5TransientGlobalAttention", "pop2piano.modeling_pop2piano.Pop2PianoAttention",
              "switch_transformers.modeling_switch_transformers.SwitchTransformersAttention",
              "pix2struct.modeling_pix2struct.Pix2StructTextAttention", "udop.modeling_udop.UdopAttention")


__all__ = ["Rule", "RuleRegistry", "default_registry"]
