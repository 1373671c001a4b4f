"""The forward side of the engine: what each training forward leaves for the backward.

Forward hooks on every served module record, per call, the autograd edges where its gradients
will be taken and a function from the gradients there to per-sample gradients (`Call`); a
rule's call has the edges of its outputs, a watched module's call (engine/watching/watch.py) one edge per
point of use of a watched parameter. Records are kept for the last `max_pending_forwards`
training forwards of the model; `PerSampleGradients.backward` consumes them.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.utils._pytree import tree_leaves

from gradalign.engine.guards.census import output_edges
from gradalign.engine.guards.inputs import keep, own, versions
from gradalign.engine.recording.calls import Call, Hooked, nodes
from gradalign.engine.recording.hooks import eager, edge, first_tensor, in_backward, inside_torch_func
from gradalign.engine.rules import RuleRegistry
from gradalign.engine.rules.layout import ambiguous, batch_size, call_batch_dim, feature_dims, first_argument
from gradalign.engine.recording.parametrized import derived_finish, used_tensors, watch_outputs
from gradalign.engine.validate import survey
from gradalign.engine.watching import Watch, refuse_watched_input, watch_shared_output
from gradalign.errors import UnsupportedModuleError

class Recorder:
    """Hooks every served module of `model` and keeps the records of its training forwards.

    hooked: {module path: Hooked}; params: {full name: trainable parameter} of every served
    module (a tied parameter under its first name). batch_first: the model's declared layout
    (False: sequence-first, the batch on dim 1; None: not declared, taken as batch-first);
    `ambiguous` collects the modules called with T == B where nothing declared the layout.

    A sharded model (`sharding`, engine/distributed/fsdp.py): its forwards register other tensors
    in place of the sharded parameters (`sharding.forward_params`), which are watched in their
    stead, and the hooks of a fully_shard module itself run before FSDP's post-forward reshards it.

    Forwards that run inside a backward (an activation checkpoint recomputing its region) are not
    recorded: the original forward's records serve the backward. `recomputed` and `without_grad`
    name the hooked modules whose forward ran inside a backward, or with gradients off inside a
    training forward, to tell a reentrant checkpoint (which does both, with no record).
    """

    def __init__(self, model: nn.Module, registry: RuleRegistry, max_pending_forwards: int, sharding=None,
                 batch_first: bool | None = None):
        self.model, self.registry, self.max_pending_forwards = model, registry, max_pending_forwards
        self.batch_first = batch_first
        self._base = 1 if batch_first is False else 0  # the batch dim outside every declared layout
        self.ambiguous: dict[str, tuple[int, ...]] = {}  # path -> input shape, T == B and undeclared
        self._capturing = True
        self._generation = 0   # training forwards of the model so far
        self._oldest: int | None = None  # the oldest generation with a record
        self._warned_dropped = False
        self.hooked: dict[str, Hooked] = {}
        self.params: dict[str, nn.Parameter] = {}  # every hooked trainable parameter, by full name
        self._layout: list[int] = []  # batch dims of the transformers whose forward is running
        self._root_batch: list[int | None] = []  # B of each forward of the model in progress
        self.forward_params: dict[str, Tensor] = sharding.forward_params if sharding is not None else {}
        self.recomputed: set[str] = set()
        self.without_grad: set[str] = set()  # hooked modules run with gradients off inside a training forward
        self._training_roots: list[bool] = []
        self._last_batch: int | None = None
        self._root_inputs: list[tuple[int, ...]] = []  # the data_ptr of its tensor arguments (guards/inputs.py)
        self.unrecorded: list[str] = []  # why a forward since the last backward may have no record (census)
        self.census_due = True  # the first backward takes the census (engine/guards/census.py)
        self.record_outputs = True  # the model's outputs' edges, for the separability check (census.py)
        self.outputs: list[tuple[int, GradientEdge, int]] = []  # (generation, edge, batch dim)
        self._handles = []
        self._units = {id(m) for m in sharding.modules.values()} if sharding is not None else set()
        self._frozen: list[nn.Parameter] = []  # parameters frozen when last surveyed
        self._pre_hooks: dict[str, Callable] = {}
        self._newly_hooked: list[str] = []
        self.refresh()
        self._hook_layouts()

    def refresh(self, *, strict: bool = True) -> list[str]:
        """Survey the model again: parameters made trainable since (gradual unfreezing) are served
        from now on, their modules hooked; returns their names. Runs before every training forward
        in which a parameter frozen at the last survey requires grad (strict=False: not inside
        torch.func's functional_call, whose tensors stand in for the parameters)."""
        served, problems = survey(self.model, self.registry)
        try:
            found = {full: s.module.get_parameter(local) for s in served for local, full in s.param_names.items()}
        except AttributeError:
            if strict:
                raise
            return []
        if problems:
            raise UnsupportedModuleError(
                "per-sample gradients are not available for these modules:\n  " + "\n  ".join(problems))
        for s in served:
            h = self.hooked.get(s.path)
            if h is None:
                h = self.hooked[s.path] = Hooked(s.path, s.module, s.rule, s.param_names, s.shared, s.derived)
                self._hook(s.path, h)
                self._newly_hooked.append(s.path)
            else:  # in place: the hooks hold it
                h.param_names.update(s.param_names)
        new = [full for full in found if full not in self.params]
        self.params.update(found)
        self.census_due = self.census_due or bool(new)
        served_ids = {id(p) for p in self.params.values()}
        self._frozen = [p for p in self.model.parameters() if id(p) not in served_ids]
        return new

    def unfrozen(self) -> list[str]:
        """The names of the parameters frozen at the last survey that require grad now."""
        ids = {id(p) for p in self._frozen if p.requires_grad}
        return [n for n, p in self.model.named_parameters() if id(p) in ids] if ids else []

    def _hook(self, path: str, h: Hooked) -> None:
        if h.rule.watch or h.rule.capture:
            self._pre_hooks[path] = eager(self._make_pre_hook(path, h))
            self._handles.append(h.module.register_forward_pre_hook(self._pre_hooks[path], with_kwargs=True))
        self._handles.append(h.module.register_forward_hook(
            eager(self._make_hook(path, h)), with_kwargs=True, always_call=bool(h.rule.watch or h.rule.capture),
            prepend=id(h.module) in self._units))
        self._handles += watch_outputs(h.module, h.latest, lambda: self._capturing and torch.is_grad_enabled())

    def remove(self) -> None:
        """Detach every hook and forget every record."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
        for h in self.hooked.values():
            h.pending.clear()

    def _hook_layouts(self) -> None:
        """Batch dims: a stack pushed by transformers that move the batch (batch_first=False),
        and B itself from the model's first tensor argument (for watched modules and modules
        called without the batch), with the count of training forwards. Their pre-hooks run
        before every other hook of a module, their post-hooks after."""
        layouts = [(m, bd) for m in self.model.modules() if (bd := self.registry.batch_dim_for(m)) is not None]
        root_dim = self.registry.batch_dim_for(self.model)
        root_dim = self._root_dim = self._base if root_dim is None else root_dim

        def pop(stack: list):
            def hook(*_):
                stack.pop()  # and return None: a forward hook's result would replace the output
            return eager(hook)

        def root_pre(module, args, kwargs):  # the forward's generation, and B for the watches
            training = self._capturing and torch.is_grad_enabled() and not in_backward()
            self._root_batch.append(batch_size(args, kwargs, root_dim))
            self._training_roots.append(training)
            self._last_batch = self._root_batch[-1]  # for a checkpoint's recomputation, after the forward
            first = first_tensor(args, kwargs)  # plain: a forward with gradients, not a recomputation or torch.func
            plain = (torch.is_grad_enabled() and not in_backward()
                     and not (first is not None and inside_torch_func(first)))
            self._root_inputs.append(tuple(t.data_ptr() for t in (*args, *kwargs.values())
                                           if isinstance(t, Tensor)) if plain and self._capturing else ())
            if plain and not self._capturing:
                self._note("a forward ran inside engine.paused(), which records nothing")
            if training:
                self._generation += 1
                if self._frozen and any(p.requires_grad for p in self._frozen):  # unfrozen: hook their modules first
                    self._newly_hooked.clear()
                    self.refresh(strict=False)
                    if "" in self._newly_hooked and "" in self._pre_hooks:  # the root's own: too late to fire
                        self._pre_hooks[""](module, args, kwargs)

        def root_post(module, args, output):  # (returns None: a forward hook's result would replace the output)
            B, training = self._root_batch.pop(), self._training_roots.pop()
            self._root_inputs.pop()
            if self.record_outputs and training and output is not None:
                self.outputs += [(self._generation, edge, root_dim) for edge in output_edges(output, B, root_dim)]
        self._handles += [self.model.register_forward_pre_hook(eager(root_pre), with_kwargs=True, prepend=True),
                          self.model.register_forward_hook(eager(root_post), always_call=True)]
        for module, bd in layouts:
            def push(*_, bd=bd):
                self._layout.append(bd)
            self._handles += [module.register_forward_pre_hook(eager(push), prepend=True),
                              module.register_forward_hook(pop(self._layout), always_call=True)]

    def _active(self, args: tuple, kwargs: dict) -> bool:
        """A training forward: capturing, gradients on, not inside a torch.func transform, not a
        recomputation inside a backward."""
        first = first_tensor(args, kwargs)
        return (self._capturing and torch.is_grad_enabled() and not (first is not None and inside_torch_func(first))
                and not in_backward())

    def _note(self, cause: str) -> None:
        if cause not in self.unrecorded:
            self.unrecorded.append(cause)

    def _batch_dim(self, path: str, module: nn.Module, x) -> int:
        """The batch dim of a call whose first input is x, within the enclosing layout (engine/rules/layout.py)."""
        declared = self._layout[-1] if self._layout else self._base
        if declared == 0 and not (isinstance(x, Tensor) and x.dim() > 1 and x.shape[0] == x.shape[1]):
            return 0  # batch first, and no T == B to note: call_batch_dim's answer, without its calls
        B = self._root_batch[-1] if self._root_batch else None
        features = feature_dims(self.hooked[path].rule.features, module)
        if self.batch_first is None and not self._layout and ambiguous(x, B, features):
            self.ambiguous[path] = tuple(x.shape)
        return call_batch_dim(x, declared, B, features)

    def _layout_hint(self) -> str:
        """Where the model's layout is undeclared: how to declare it, for the messages of refusals."""
        if self.batch_first is not None or not self._root_batch or self._root_batch[-1] is None:
            return ""
        return (f". If the model's input is sequence-first ((T, B, ...)): the engine read the batch, "
                f"{self._root_batch[-1]}, from its dim {self._root_dim}; declare "
                "ga.PerSampleGradients(model, batch_first=False)")

    def _make_pre_hook(self, path: str, hooked: Hooked):
        rule, where = hooked.rule, hooked.where

        def pre_hook(module, args, kwargs):
            state = None
            recompute = rule.watch and self._capturing and torch.is_grad_enabled() and in_backward()
            if self._active(args, kwargs) or recompute:
                batch_dim = self._batch_dim(path, module, first_argument(args, kwargs))
                if not rule.watch:
                    state = (rule.capture(module, args, kwargs, batch_dim), versions(tree_leaves((args, kwargs))))
                else:  # (the output is not known yet: the first argument stands in for it)
                    # a checkpoint's recomputation watches too, so that it saves what the forward saved
                    # (the expanded uses), but nothing it sees is kept
                    no_fallback = rule.check_call and rule.check_call(module, args, kwargs, args[0] if args else None)
                    can_fall_back = not no_fallback
                    captured = (rule.capture(module, args, kwargs, batch_dim)
                                if rule.capture and can_fall_back and not recompute else None)
                    params = {local: p for local, full in hooked.param_names.items()
                              if ((p := module._parameters.get(local)) is self.params[full]
                                  or p is self.forward_params.get(full)) and p.requires_grad}
                    batch = (self._root_batch[-1] if self._root_batch else
                             self._last_batch if recompute else batch_size(args, kwargs, batch_dim))
                    state = (Watch(module, where, params, hooked.param_names, batch, batch_dim, can_fall_back), captured)
                    state[0].hint = self._layout_hint()
                    state[0].no_fallback = no_fallback or state[0].no_fallback
                    state[0].start()
            hooked.pending.append(state)
            return None

        return pre_hook

    def _make_hook(self, path: str, hooked: Hooked):
        rule = hooked.rule

        def hook(module, args, kwargs, output):
            state = hooked.pending.pop() if rule.watch or rule.capture else None
            if self._capturing and torch.is_grad_enabled() and in_backward():  # a checkpoint's recomputation
                self.recomputed.add(path)
                if state is not None and rule.watch:
                    state[0].stop()
                return None
            if not torch.is_grad_enabled() and self._training_roots and self._training_roots[-1]:
                self.without_grad.add(path)  # (a reentrant checkpoint runs its region so)
            captured, kept = state if state is not None else (None, None)
            if rule.watch:
                if state is None:
                    return None
                watch, captured = state
                watch.stop()
                if output is None:  # the forward raised
                    return None
                if watch.stopped is None:  # watch.edges is live: uses after the forward still count
                    self._append(hooked, Call(path, watch.batch, watch.edges, watch.per_sample, watched=True,
                                              route="watched", inputs=watch.inputs, claims=tuple(watch.claims)))
                    return None
                kept = versions(tree_leaves((args, kwargs)))
                reason = rule.check_call(module, args, kwargs, output) if rule.check_call else None
                if reason:  # the torch.func fallback cannot serve it either
                    raise UnsupportedModuleError(watch.refusal(reason))
            return self._record(path, hooked, module, args, kwargs, output, captured, kept)

        return hook

    def _record(self, path: str, hooked: Hooked, module: nn.Module, args: tuple, kwargs: dict, output,
                captured: tuple | None, kept: list | None = None):
        """Record one call of a rule's module: its output edges and how to finish it. Returns None,
        or the output to hand on in its place (a module called without the batch: watched)."""
        rule = hooked.rule
        if not self._capturing or not torch.is_grad_enabled() or (rule.capture and captured is None):
            return
        if rule.output is None:  # the common case, without the loops below
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            outputs, live = (output,), [0]
        else:
            outputs = rule.output(output)
            live = [i for i, t in enumerate(outputs) if isinstance(t, Tensor) and t.requires_grad]
            if not live:
                return
        if inside_torch_func(outputs[live[0]]):
            return
        for check in (rule.reason(module), rule.check_call(module, args, kwargs, output) if rule.check_call else None):
            if check:
                raise UnsupportedModuleError(f"{hooked.where}: {check}")
        batch_dim = self._batch_dim(path, module, first_argument(args, kwargs))
        refuse_watched_input(args, hooked.where)
        borrowed = ()
        if captured is None:  # default: the positional inputs (the model's own borrowed), batch first
            captured, kept, borrowed = keep(args, self._root_inputs[-1] if self._root_inputs else ())
            if batch_dim and captured and isinstance(captured[0], Tensor):
                captured = (captured[0].movedim(batch_dim, 0), *captured[1:])
        first = captured[0] if captured else None
        batch = first.shape[0] if isinstance(first, Tensor) and first.dim() else None
        B = self._root_batch[-1] if self._root_batch else None
        if B is not None and (batch != B or hooked.shared) and isinstance(first, Tensor) and not (rule.output or rule.capture):
            watch, shared = watch_shared_output(module, hooked.where,
                                                rule.compute, captured, output, B, batch_dim, self._layout_hint())
            self._append(hooked, Call(path, B, watch.edges, watch.per_sample, watched=True, route="shared", inputs=kept,
                                      stops=nodes(args), starts=(output.grad_fn,)))
            return shared
        n_outputs = len(outputs)  # the outputs themselves are not kept alive, only their edges
        edges = [edge(output)] if rule.output is None else [edge(outputs[i]) for i in live]
        starts = None
        if rule.inner and rule.output and (inner := rule.inner(module, captured, outputs)):
            starts, edges = tuple(e.node for e in edges), edges + inner  # (the census: the call's part starts at its outputs)

        def finish(grads: list) -> dict:  # (reads `captured` when called: own_inputs may have copied it)
            if rule.output:  # every declared output's gradient, in the module's own layout, then the inner edges'
                by_output = dict(zip(live, grads))
                return rule.compute(module, captured, tuple(by_output.get(i) for i in range(n_outputs))
                                    + tuple(grads[len(live):]))
            return rule.compute(module, captured, grads[0].movedim(batch_dim, 0) if batch_dim else grads[0])

        def own_inputs() -> None:
            nonlocal captured
            captured = own(captured, borrowed)

        if hooked.derived:  # a weight computed from other parameters (recording/parametrized.py): no S asked
            finish = derived_finish(finish, module, hooked.derived, used_tensors(module, hooked.derived, hooked.latest))
        own_cosines = functools.partial(rule.own_cosines, module, captured) if rule.own_cosines else None
        full = outputs[live[0]].dtype in (torch.float32, torch.float64)
        self._append(hooked, Call(path, batch, edges, finish, own_cosines=own_cosines, full=full,
                                  route="fallback" if rule.watch else "rule", batch_dim=batch_dim,
                                  single_output=rule.output is None and not rule.capture, inputs=kept,
                                  own_inputs=own_inputs if borrowed else None,
                                  watched=bool(hooked.derived), starts=starts,
                                  stops=nodes(tree_leaves((args, kwargs)) if kwargs or rule.capture else args)))

    def routes(self) -> dict[str, str]:
        """{path: its calls' routes} over the calls recorded now that took part in a backward (or,
        before one, every recorded call)."""
        out = {}
        for path, h in self.hooked.items():
            used = [c for c in h.calls if c.grads is None or any(g is not None for g in c.grads)]
            if used:
                out[path] = ", ".join(dict.fromkeys(c.route for c in used))
        return out

    def _append(self, hooked: Hooked, call: Call) -> None:
        """Keep a record; drop those of forwards older than the last `max_pending_forwards`."""
        call.generation = self._generation
        call.root = self._root_batch[-1] if self._root_batch else None
        hooked.calls.append(call)
        keep_from = self._generation - self.max_pending_forwards + 1
        if self._oldest is None:
            self._oldest = self._generation
        if self._oldest >= keep_from:
            return
        for h in self.hooked.values():
            h.calls[:] = [c for c in h.calls if c.generation >= keep_from]
        self._oldest = keep_from
        self._note(f"more than max_pending_forwards={self.max_pending_forwards} forwards ran with gradients on since "
                   "the last engine.backward(), so the records of the older ones were dropped (raise "
                   "max_pending_forwards, or run the other forwards under torch.no_grad() or engine.paused())")
        if not self._warned_dropped:
            self._warned_dropped = True
            warnings.warn(
                f"PerSampleGradients: more than {self.max_pending_forwards} forwards of the model ran with "
                "gradients on since the last engine.backward(); the records of the older ones were dropped to "
                "bound memory. Run evaluations under torch.no_grad() or `with engine.paused():`, call "
                "engine.clear() after forwards no engine.backward() will use, and step with engine.backward() "
                "rather than loss.backward() while the engine is attached (or raise max_pending_forwards)",
                RuntimeWarning, stacklevel=4)

    def clear(self, *, forget: bool = False) -> None:
        """Forget every recorded forward (their inputs are freed); the next backward uses only
        forwards that come after this. forget=True (engine.clear()): a backward of losses from
        a forgotten forward is then refused with this cause."""
        if forget and any(h.calls for h in self.hooked.values()):
            self._note("engine.clear() forgot the forwards recorded before it (call it only after forwards that no "
                       "engine.backward() will use)")
        for h in self.hooked.values():
            h.calls.clear()
        self._oldest, self.outputs = None, []
        self.recomputed.clear()
        self.without_grad.clear()

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside this block are not recorded (e.g. an evaluation with gradients on,
        or a step taken with a plain loss.backward())."""
        was, self._capturing = self._capturing, False
        try:
            yield self
        finally:
            self._capturing = was
