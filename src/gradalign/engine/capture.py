"""PerSampleGradients: per-sample gradient statistics from one forward and one backward.

The forward hooks (engine/recording.py) record each hooked module's inputs and the autograd
edges of its output; one backward of sum_i losses[i], asked only for the gradients at those
edges, gives every output gradient d. The per-layer rules turn (inputs, d) into factored
per-sample gradients; statistics and the (re-)weighted p.grad come from those, never from a
(B, P) matrix.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
from torch import Tensor, nn

from gradalign.engine.distributed import WeakGroup, refuse_late_sharding, resolve_group, sharding_of
from gradalign.engine.gradient_stats import GradientStats
from gradalign.engine.guards.census import refuse_reentrant_checkpoint, refuse_unfrozen, take_census_when_due
from gradalign.engine.guards.inputs import InputVersions, read_lazily, settle_inputs
from gradalign.engine.rules.layout import batch_mismatch, root_mismatch
from gradalign.engine.phases import BACKWARD, LOSS_SCALE, RULES, WEIGHTS, WRITE, Trace, phase
from gradalign.engine.representations import PerSampleGrad, combine, full_precision
from gradalign.engine.recording import Recorder, Call
from gradalign.engine.rules import RuleRegistry, default_registry
from gradalign.engine.scale import rescale, reuse_row_sq_norms
from gradalign.engine.low_memory import InBackward, check_memory
from gradalign.engine.weights import resolve_weights
from gradalign.engine.sharded_stats import ShardedGradientStats
from gradalign.engine.validate import check_losses, unseen_use, verify, verify_rtol
from gradalign.errors import GradAlignError, UnsupportedModuleError

Weights = Tensor | Callable[[GradientStats], Tensor] | None


class PerSampleGradients:
    """Hooks every module of `model` that owns trainable parameters.

    Example:
        ```python
        engine = PerSampleGradients(model)
        losses = F.cross_entropy(model(x), y, reduction="none")   # (B,)
        stats = engine.backward(losses)        # p.grad += mean gradient, as losses.mean().backward()
        stats.norms, stats.cosines             # (B,) each
        ```

    The engine is the one writer of p.grad: `backward` adds the (weighted) mean gradient,
    `set_grad` replaces it (e.g. with GSNRAccumulator's accumulated mean).

    Which route serves a module: its rule if the registry has one (Linear, Conv, norms,
    Embedding, MultiheadAttention with its out_proj, ...); otherwise its parameters are watched
    at their point of use during its forward (raw parameters: cls tokens, position
    embeddings, layer-scale gammas; engine/watching/watch.py); and only where watching meets an
    operation it cannot follow, the torch.func fallback (a vmap over that module's forward)
    or, for a module that does not take one tensor and return one, UnsupportedModuleError.

    The batch contract (engine/rules/layout.py): the batch is dim 0 of the model's first tensor argument
    and of every module's inputs and outputs, or dim 1 with batch_first=False; dim 1 inside an
    nn.Transformer* with batch_first=False (`RuleRegistry.register_layout` declares other such modules).

    Args:
        model: the network. Checked at once (`ga.validate` runs the same walk): every
            unsupported module is listed in one UnsupportedModuleError.
        batch_first: False for a sequence-first model: the batch is dim 1 of its input and of its
            modules' inputs, except where a module fixes its own (convolutions, norms over channels,
            batch_first flags of LSTM/GRU/RNN and attention) or an input lacks that dim (a pooled
            (B, H)); `registry.register_layout` per module type (engine/rules/layout.py). True or None
            (not declared; `ga.validate(model, example)` then flags T == B): dim 0.
        registry: per-layer rules (default: `default_registry()`, with watching and the
            torch.func fallback for modules without a rule).
        verify: after every backward, check that the per-sample gradients add up to
            autograd's summed gradient (catches parameters used outside their module's
            forward, which no hook can see). Costs one extra weighted sum per layer.
        max_pending_forwards: how many forwards of the model the engine keeps the records of
            until a backward uses them (default 8: a backward may sum the losses of several
            forwards, e.g. of augmented views). Records of older forwards are dropped, with a
            warning the first time, so forwards that no engine.backward follows (an evaluation
            with gradients on, a plain loss.backward()) cannot grow memory; `clear()` and
            `paused()` avoid the warning.
        process_group: data parallel (torch.distributed, e.g. `dist.group.WORLD`): every statistic becomes
            global. With R ranks holding B_r samples each, cosines are to the mean gradient over all sum_r B_r
            samples, GASW/GDSW weights are normalised over that global batch, and p.grad = (1/B) sum over ALL
            samples of w_i g_i, the same on every rank and equal to one process on the concatenated batch (to
            float tolerance). Norms, cosines and weights of a rank's own samples stay on that rank.
            Communication per backward (P = trainable parameters; one flattened all-reduce per line): plain mean
            gradient: P + 1 numbers; GASW/GDSW: P + 1 (S and B), 1 (the weights' normaliser), P (the weighted
            gradient), i.e. two parameter-sized calls and a scalar; GAGA (write_grad=False, GSNRAccumulator):
            2P + 1 (S, sum g**2, B); norms only: none. None (default): no communication at all, as in a single
            process. A model wrapped in DistributedDataParallel uses its own process group when none is given:
            DDP's reducer never runs on the engine's backward (autograd is asked for layer-output gradients, not
            parameter ones), so the engine's reduction is the only one and nothing is reduced twice. Every rank
            must call backward in step (same model, same statistics read). A model sharded with FSDP2
            (`fully_shard` modules, DTensor parameters) uses its mesh's group, and p.grad is written as each
            parameter's DTensor shard, reduced one FSDP unit at a time (engine/sharded_stats.py); ShardingError
            for what is not supported yet (HSDP, tensor parallel). The engine and its statistics hold the group
            by weak reference: they never keep it alive after torch.distributed.destroy_process_group.
        trace: a callable name -> context manager entered around each phase of a backward and
            each statistic of each unit, e.g. `torch.profiler.record_function` or a timer
            (engine/phases.py lists the names). None (default): nothing is traced.
    """
    process_group = WeakGroup()  # held weakly: never keeps a group alive (a DDP model holds its own)

    def __init__(self, model: nn.Module, *, batch_first: bool | None = None, registry: RuleRegistry | None = None,
                 verify: bool = False, max_pending_forwards: int = 8, process_group=None, trace: Trace = None):
        if batch_first not in (None, True, False):
            raise ValueError(f"batch_first must be True, False or None (not declared), got {batch_first!r}")
        if not (isinstance(max_pending_forwards, int) and max_pending_forwards >= 1):
            raise ValueError(f"max_pending_forwards must be an integer >= 1, got {max_pending_forwards!r}")
        self.model = model
        self.registry = registry if registry is not None else default_registry()
        self.verify = verify
        self.max_pending_forwards = max_pending_forwards
        self._sharding = sharding_of(model, process_group)  # FSDP2: before the recorder, which hooks after it
        self.process_group = self._sharding.group if self._sharding is not None else resolve_group(model, process_group)
        self.trace = trace
        self._recorder = Recorder(model, self.registry, max_pending_forwards, self._sharding, batch_first)
        self._hooked, self._params = self._recorder.hooked, self._recorder.params  # shared dicts
        self._removed = False
        self._first_backward = True
        self._routes: dict[str, str] = {}

    def routes(self) -> dict[str, str]:
        """{module path: the route that served it} in the latest backward: "rule", "watched" (no rule:
        its parameters watched at their point of use), "fallback" (torch.func) or "shared" (a rule on a
        value shared by all samples), comma-separated for a module called several ways; modules without
        a part in the losses are left out ({} before any backward). As `ga.validate(model, example)`."""
        return dict(self._routes)

    def ambiguous(self) -> dict[str, tuple[int, ...]]:
        """{module path: input shape} of calls with size B on dims 0 and 1, layout undeclared: dim 0 taken."""
        return dict(self._recorder.ambiguous)

    def clear(self) -> None:
        """Forget every recorded forward (their inputs are freed); the next backward uses only
        forwards that come after this (a backward of losses from a forgotten forward is refused)."""
        self._recorder.clear(forget=True)

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside this block are not recorded (e.g. an evaluation with gradients on,
        or a step taken with a plain loss.backward())."""
        with self._recorder.paused():
            yield self

    def backward(self, losses: Tensor, weights: Weights = None, *, write_grad: bool = True,
                 release: bool = False, memory: str = "default") -> GradientStats:
        """One backward of sum(losses); p.grad += (1/B) sum_i w_i g_i (w = 1 by default).

        Args:
            losses: (B,) per-sample losses, e.g. F.cross_entropy(..., reduction="none").
            weights: None, a (B,) tensor, or a callable GradientStats -> (B,) tensor such as
                GASW(gamma); it sees the statistics of this batch before p.grad is written.
            write_grad: False leaves p.grad alone (statistics only, e.g. for GAGA, whose
                accumulated mean is written with `set_grad`).
            release: True writes p.grad one layer at a time, the last first, freeing each layer's per-sample
                factors (its inputs and output gradients) once its part is written, so the step's extra memory
                peaks as a plain backward's does. The statistics read before (by the `weights` callable) stay
                readable; any other raises GradAlignError. No copy of the model's inputs is made (guards/inputs.py).
            memory: "default", or "low": each layer's output gradient is reduced to per-sample norms (and the
                cosines, for a weighting whose `needs` names "cosines", e.g. GASW) inside the backward and freed,
                and p.grad comes from a second backward of sum_i w_i l_i through the retained graph
                (engine/low_memory/): extra memory near a plain step's, time about a backward more. The result
                then holds only those (ReducedStats); GAGA's sums and a process group need the default.

        Returns:
            GradientStats of the unweighted per-sample gradients, with `.weights` set.
        """
        self._check_backward(losses, write_grad, release, memory)
        B = losses.shape[0]
        params = {n: p for n, p in self._params.items() if p.requires_grad}
        low = None if memory == "default" else InBackward(
            self._hooked, params, B, losses.device, cosines="cosines" in getattr(weights, "needs", ()),
            paused=self._recorder.paused, batch_first=self._recorder.batch_first, second=write_grad)
        try:  # an empty batch (Poisson sampling) has no sample, so no per-sample gradient
            per_sample, sums, scale, rtol, inputs = (self._rules(losses, weights, params, low, release) if B
                                                     else ({}, {}, None, 0.0, None))
        finally:
            self._routes = self._recorder.routes()
            self._recorder.clear()
            self._recorder.unrecorded.clear()  # (the census took them into account)
            self._recorder.record_outputs = self.verify or self._recorder.census_due  # (for the separability check)
        stats = (self._stats(per_sample, B, losses.device, params, scale, sums, inputs) if low is None
                 else low.stats(tuple(params)))
        del per_sample, sums, inputs  # the statistics hold them now (and free them with release=True)
        if self.verify and B:
            verify(stats, losses, self._graph_params(self._params), rtol)
        with phase(self.trace, WEIGHTS):
            w = resolve_weights(weights, stats, losses, self.verify)
        stats.weights = w
        with phase(self.trace, WRITE):
            if (release or write_grad) and stats.global_batch_size == 0:
                pass  # no sample anywhere: p.grad is left as it is (adds zero)
            elif low is not None:
                if write_grad:  # a second backward of sum_i w_i l_i through the retained graph
                    self._write_grad(low.weighted_grads(losses, w, self._graph_params(params)), add=True)
            elif release:  # (1/B) sum_i w_i g_i, a layer at a time, each layer's factors freed after
                stats.release_into(None if weights is None else w, functools.partial(self._write_grad, add=True),
                                   factor=1.0 / stats.global_batch_size)
            elif write_grad:  # fresh tensors: p.grad never aliases a statistic the caller may read later
                update = (stats.mean_update() if weights is None                    # (1/B) sum_i g_i
                          else stats.weighted_sum(w, factor=1.0 / stats.global_batch_size))  # (1/B) sum_i w_i g_i
                self._write_grad(update, add=True)
        return stats

    def _rules(self, losses: Tensor, weights: Weights, params: dict[str, nn.Parameter],
               low: InBackward | None, release: bool) -> tuple:
        """(per-sample gradients, autograd's S where wanted, the loss scale, verify's tolerance, the layer
        inputs the representations read: engine/guards/inputs.py); with `low`, none (reduced in the backward).
        Without `release` the representations outlive the backward, so they read copies of the model's inputs."""
        calls = [c for h in self._hooked.values() for c in h.calls]
        roots = {c.root for c in calls if c.root is not None}
        if roots and losses.shape[0] not in roots:  # before the backward, whose checks would blame a module
            raise ValueError(root_mismatch(roots.pop(), losses.shape[0], self._recorder.batch_first))
        with full_precision(losses.device):  # backward and rules in float32, also inside autocast
            take_census_when_due(self._recorder, losses, self._graph_params(params), calls, self.verify)
            wanted = self._sums_wanted(weights, params) if low is None else []
            self._recorder.recomputed.clear()  # (what a checkpoint recomputes in this backward)
            if low is not None:
                InputVersions.check_calls(calls, "between its forward and this backward")
            with phase(self.trace, BACKWARD):
                retain = self.verify or (low is not None and low.second)  # (low: for the second backward)
                sums = self._backward_to_outputs(losses, params, wanted, retain_graph=retain,
                                                 grad=torch.autograd.grad if low is None else low.grad)
                if low is not None:
                    low.flush()
            refuse_reentrant_checkpoint(self._recorder, self._params)
            if low is not None:
                return {}, {}, None, 0.0, None
            rtol = verify_rtol([g for c in calls for g in (c.grads or ())]) if self.verify else 0.0
            with phase(self.trace, LOSS_SCALE):
                scale = rescale(calls, sums, rows=(rows := {}))  # (squared row norms the norms reuse)
            settle_inputs(calls, copies=not release)
            with phase(self.trace, RULES):
                per_sample = self._per_sample_grads(losses.shape[0], params)
                reuse_row_sq_norms(per_sample.values(), rows)
        return per_sample, sums, scale, rtol, InputVersions.of_calls(calls)

    def _check_backward(self, losses: Tensor, write_grad: bool, release: bool, memory: str) -> None:
        check_losses(losses, write_grad, release)
        check_memory(memory, self.verify, self.process_group, self._sharding)
        if self._removed:
            raise GradAlignError("this engine was removed (engine.remove()), so it recorded nothing: create a "
                                 "new ga.PerSampleGradients(model) to use it again")
        if self._first_backward and self._sharding is None:
            refuse_late_sharding(self.model)
        self._first_backward = False
        refuse_unfrozen(self._recorder.unfrozen())

    def _stats(self, per_sample, B: int, device, params: dict[str, nn.Parameter], scale, sums,
               inputs: InputVersions | None) -> GradientStats:
        sums = {n: s for n, s in sums.items() if n in per_sample}
        shapes = {n: (p.shape, p.dtype) for n, p in params.items()}
        if self._sharding is not None:
            stats = ShardedGradientStats(per_sample, B, sharding=self._sharding, param_shapes=shapes, device=device,
                                         scale=scale, trace=self.trace)
        else:
            group = self.process_group
            stats = GradientStats(per_sample, B, device=device, process_group=group, inputs=inputs, scale=scale,
                                  param_shapes=shapes if group is not None else None, sums=sums, trace=self.trace)
        stats.trainable_names = tuple(params)  # (GAGA counts the samples of each parameter trainable now)
        return stats

    def _sums_wanted(self, weights: Weights, params: dict[str, nn.Parameter]) -> list[str]:
        """Parameters whose gradient sum S autograd should form in the backward itself, where
        each layer's output gradient is still in cache (the plain step's weight-gradient
        products): for the cosines of a weighting that declares it reads them (`needs`, e.g.
        GASW), on the layers whose cosine terms come from S (not from a Gram matrix:
        `Rule.own_cosines`). p.grad itself always comes from the factors (for the plain mean,
        with every weight 1/B), as a fresh tensor: no second parameter-sized copy.
        Not for a parameter with a watched use (a raw parameter, a module called without the batch),
        nor with a use that ran in bfloat16 or float16 (S is then formed in float32 from the factors).
        For a parameter with several uses (tied, or one module called twice) no single call's route
        describes the combined representation, so its S is wanted with the cosines."""
        if "cosines" not in getattr(weights, "needs", ()) or self._sharding is not None:
            return []  # (sharded: S is formed a unit at a time, never the whole model's at once)
        uses: dict[str, list[tuple[str, Call]]] = {}  # name -> (local name, call) for every use
        blocked = set()  # (those with a watched use)
        for h in self._hooked.values():
            for local, n in h.param_names.items():
                if h.rule.watch:
                    blocked.add(n)
                uses.setdefault(n, []).extend((local, c) for c in h.calls)
        wanted = []
        for n, calls in uses.items():
            if n not in params or n in blocked or any(c.watched or not c.full for _, c in calls):
                continue
            if self.process_group is None and len(calls) == 1:
                (local, call), = calls
                if call.own_cosines and local in self._hooked[call.path].rule.own_cosine_params and call.own_cosines():
                    continue  # its cosine terms come without S
            wanted.append(n)
        return wanted

    def set_grad(self, grads: dict[str, Tensor]) -> None:
        """p.grad = grads[name] for every hooked parameter named (cast to the parameter's dtype).

        Names are those of `model.named_parameters()`, as in `GradientStats.mean_grad`.
        """
        unknown = sorted(set(grads) - set(self._params))
        if unknown:
            raise KeyError(f"set_grad: {', '.join(unknown)} are not trainable parameters hooked by this engine")
        if self._sharding is not None:  # a full tensor for a sharded parameter: this rank's part of it
            grads = {n: self._sharding.like_param(n, self._params[n], g) for n, g in grads.items()}
        self._write_grad({n: g.detach().to(device=self._params[n].device, dtype=self._params[n].dtype, copy=True)
                          for n, g in grads.items()}, add=False)

    def _write_grad(self, grads: dict[str, Tensor], *, add: bool) -> None:
        """The one place p.grad is written, from tensors nobody else holds. Parameters
        absent from `grads` (outside the losses) keep their grad, as in autograd."""
        for name, g in grads.items():
            p = self._params[name]
            g = g if g.dtype == p.dtype else g.to(p.dtype)  # statistics are float32, p may be half
            if add and p.grad is not None:
                p.grad.add_(g)
            else:
                p.grad = g

    def _backward_to_outputs(self, losses: Tensor, params: dict[str, nn.Parameter], wanted: list[str],
                             retain_graph: bool, grad=torch.autograd.grad) -> dict[str, Tensor]:
        """One backward of sum(losses) that fills every call's gradients; returns {name: S} for
        the `wanted` parameters.

        Autograd is asked for the gradients at the recorded edges, and for the parameters only
        where S is wanted, so it skips every other weight-gradient product (the engine forms
        p.grad from the factors instead).
        An edge is a tensor as the forward produced it, so an in-place op after the layer does
        not change what is captured, and no output tensor is kept alive. Parameters of modules
        that recorded no call are asked for too: a gradient there means the parameter was used
        outside its module, which no hook sees.
        """
        calls = [call for h in self._hooked.values() for call in h.calls]
        seen = {n for h in self._hooked.values() if any(c.edges for c in h.calls) for n in h.param_names.values()}
        unseen_named = self._graph_params({n: p for n, p in params.items() if n not in seen})  # tied: seen by any
        unseen = list(unseen_named.values())  # of its modules; under FSDP the tensors the forward used
        edges = [e for call in calls for e in call.edges]
        if not edges and not unseen:
            return {}
        unseen_ids = {id(p) for p in unseen}
        wanted = [n for n in wanted if id(params[n]) not in unseen_ids]
        grads = grad(losses.sum(), edges + unseen + [params[n] for n in wanted], allow_unused=True,
                     retain_graph=retain_graph)
        sums = {n: g for n, g in zip(wanted, grads[len(grads) - len(wanted):]) if g is not None}
        grads = grads[:len(grads) - len(wanted)]
        start = 0
        for call in calls:
            call.grads = list(grads[start:start + len(call.edges)])
            start += len(call.edges)
        names = {id(p): n for n, p in unseen_named.items()}
        for p, g in zip(unseen, grads[start:]):
            if g is not None:  # the loss depends on p, yet no use of it was seen: no host read needed
                owners = [h.where for h in self._hooked.values()
                          if names[id(p)] in h.param_names.values()]
                raise UnsupportedModuleError(unseen_use(names[id(p)], owners, any_call=bool(edges)))
        return sums

    def _per_sample_grads(self, B: int, params: dict[str, nn.Parameter]) -> dict[str, PerSampleGrad]:
        out: dict[str, PerSampleGrad] = {}
        with self._recorder.paused():  # a rule may run the module again (torch.func fallback, attention)
            for h in self._hooked.values():
                with self._values_for(h):
                    self._finish_calls(h, B, params, out)
        return out

    def _values_for(self, h):
        """Under FSDP, the unit of a module whose rule reads parameter values, all-gathered around it."""
        if self._sharding is None or not h.rule.reads_parameters or not h.calls:
            return contextlib.nullcontext()
        return self._sharding.gathered(h.param_names.values())

    def _finish_calls(self, h, B: int, params: dict[str, nn.Parameter], out: dict[str, PerSampleGrad]) -> None:
        """The per-sample gradients of every call of one hooked module, added to `out`."""
        for call in h.calls:
            if call.grads is None or all(g is None for g in call.grads):  # no part in the losses
                call.inputs = []
                continue
            if call.batch != B:
                raise ValueError(batch_mismatch(call, B, self._recorder.batch_first))
            finished = call.finish(call.grads)
            if call.inputs:  # (engine/guards/inputs.py)
                call.inputs = read_lazily(call.inputs, finished.values())
            for local, grads in finished.items():
                name = h.param_names[local]
                if name not in params:  # frozen since the engine was created
                    continue
                out[name] = grads if name not in out else combine(out[name], grads)  # tied, or called twice

    def _graph_params(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """{name: the tensor autograd's graph holds for it}: the parameter itself, or under FSDP the
        unsharded tensor the latest forward used."""
        if self._sharding is None:
            return params
        return {n: self._sharding.graph_param(n, p) for n, p in params.items()}

    def remove(self) -> None:
        """Detach every hook; the model is exactly as before the engine was created."""
        self._recorder.remove()
        if self._sharding is not None:
            self._sharding.remove()
        self._removed = True
