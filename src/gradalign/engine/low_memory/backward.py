"""memory="low": the per-sample statistics reduced inside the backward, p.grad from a second one.

The default backward keeps every layer's output gradient until the weights are known (the
weighted sum is formed from them). Here each layer's output gradient is used where autograd
produces it: a pre-hook on the autograd node it enters turns it, with the layer's inputs, into
the layer's per-sample gradients, which are reduced at once to (B,) numbers and freed:

    |g_i|^2 = sum over layers of |g_i(layer)|^2                          (always)
    <g_i, S>, |S|^2, S = sum_i g_i, per layer, then summed               (a weighting whose
                                                                          `needs` names "cosines")

A group is the calls that share a parameter (tied weights, a module called twice: their cross
terms need every use), so it is reduced when its last edge has arrived; most groups are one
call. Each group has its own power of two (engine/scale.py, out of place: autograd still uses
the gradient), so its squares are formed near 1 in float32, and the group's terms are added
in float64 times scale^2: no global scale is needed to keep losses x 1e20 or x 1e-30 in range.

What forces the backward to reach every layer without asking autograd for the gradients it
would then hold to the end: only the edges with no other recorded edge below them in the
graph (the first layers) are asked for; every other edge's node lies on the way to them, so
it runs and its pre-hook sees the gradient. The engine then forms p.grad with a second
backward of sum_i w_i l_i through the retained graph (engine/capture.py), divided by the
largest group scale so that its products stay in range as well.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from gradalign.engine import units as units_
from gradalign.engine.gradient_stats import GradientStats
from gradalign.engine.low_memory.reduced_stats import ReducedStats
from gradalign.engine.representations import combine
from gradalign.engine.rules.layout import batch_mismatch
from gradalign.engine.scale import rescale
from gradalign.errors import GradAlignError

MEMORY_MODES = ("default", "low")


def check_memory(memory, verify: bool, process_group, sharding) -> None:
    """The `memory` argument of engine.backward, and what memory="low" cannot serve yet."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be 'default' or 'low', got {memory!r}")
    if memory == "default":
        return
    if sharding is not None or process_group is not None:
        raise GradAlignError("memory='low' is single-process for now: with data parallel or a sharded model, "
                             "call backward with memory='default' (release=True frees each layer as p.grad is written)")
    if verify:
        raise GradAlignError("verify=True checks the per-sample gradients that memory='low' does not keep: "
                             "verify with memory='default', or create the engine with verify=False")


def below_edges(root, edge_nodes: set) -> set:
    """The nodes among `edge_nodes` that have another of them strictly below them (reachable
    through next_functions from the node), over the graph reachable from `root`. Iterative."""
    below: dict = {}  # node -> whether an edge node lies strictly below it
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            below[node] = any(c in edge_nodes or below[c] for c, _ in node.next_functions if c is not None)
            continue
        if node in below:
            continue
        below[node] = False  # (in progress; autograd graphs have no cycles)
        stack.append((node, True))
        stack.extend((c, False) for c, _ in node.next_functions if c is not None and c not in below)
    return {n for n in edge_nodes if below.get(n, False)}


class _Group:
    def __init__(self, calls: list):
        self.calls, self.waiting, self.done = calls, 0, False


class InBackward:
    """One low-memory backward: `grad` stands in for torch.autograd.grad in the engine's
    backward to the layer outputs; `flush` reduces the groups left (whose edges were asked
    for, or never reached); then `sq_norms`, `dots`, `sum_sq` hold the float64 sums.

    Args:
        hooked: the engine's hooked modules (each with `.calls` and `.param_names`).
        params: the trainable parameters {name: parameter}.
        batch_size, device: B and the losses' device.
        cosines: also reduce <g_i, S> and |S|^2.
        paused: a context in which the rules run (the recorder paused: a rule may run its module).
        batch_first: the engine's layout declaration (for the messages of a batch mismatch).
        second: a second backward follows (write_grad): the first retains the graph for it.
    """

    def __init__(self, hooked: dict, params: dict, batch_size: int, device, *, cosines: bool, paused,
                 batch_first, second: bool = True):
        self.B, self.device, self.cosines = batch_size, device, cosines
        self.paused, self.batch_first = paused, batch_first
        self.params, self.second = params, second  # second: p.grad will come from a second backward
        acc = torch.float32 if device.type == "mps" else torch.float64  # (MPS has no float64)
        self.sq_norms = torch.zeros(batch_size, device=device, dtype=acc)
        self.dots = torch.zeros(batch_size, device=device, dtype=acc)
        self.sum_sq = torch.zeros((), device=device, dtype=acc)
        self.scales: list[Tensor] = []
        self.dtype = torch.float32
        self._calls = [(h, c) for h in hooked.values() for c in h.calls]
        self._groups = self._group_calls()
        self._arrived: dict[int, dict[int, Tensor | None]] = {}  # id(call) -> {edge index: gradient}
        self._handles: list = []
        self.took_part: set[str] = set()  # parameters with a per-sample gradient

    def _group_calls(self) -> dict[int, _Group]:
        """{id(call): its group}: calls joined where they share a parameter (union of names)."""
        owner: dict[str, int] = {}
        parent = list(range(len(self._calls)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i
        for i, (h, _) in enumerate(self._calls):
            for name in h.param_names.values():
                if name in owner:
                    parent[find(i)] = find(owner[name])
                else:
                    owner[name] = i
        members: dict[int, list] = {}
        for i, (_, c) in enumerate(self._calls):
            members.setdefault(find(i), []).append(c)
        groups = {}
        for calls in members.values():
            g = _Group(calls)
            groups.update((id(c), g) for c in calls)
        return groups

    def grad(self, output: Tensor, inputs: list, *, allow_unused: bool, retain_graph: bool) -> tuple:
        """torch.autograd.grad(output, inputs) where the recorded edges among `inputs` that have
        another edge below them are served by pre-hooks instead (None in the result)."""
        at_node: dict = {}  # node -> [(call, edge index, output_nr)]
        for _, c in self._calls:
            for k, e in enumerate(c.edges):
                at_node.setdefault(e.node, []).append((c, k, e.output_nr))
        hooked_nodes = below_edges(output.grad_fn, set(at_node)) if output.grad_fn is not None else set()
        for node in hooked_nodes:
            self._handles.append(node.register_prehook(self._prehook(at_node[node])))
            for c, _, _ in at_node[node]:
                self._groups[id(c)].waiting += 1
        asked = [i for i, t in enumerate(inputs) if not (isinstance(t, GradientEdge) and t.node in hooked_nodes)]
        try:
            got = torch.autograd.grad(output, [inputs[i] for i in asked], allow_unused=allow_unused,
                                      retain_graph=retain_graph)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
        out: list = [None] * len(inputs)
        for i, g in zip(asked, got):
            out[i] = g
        return tuple(out)

    def _prehook(self, entries: list):
        def hook(grad_outputs):
            touched = []
            for call, k, output_nr in entries:
                self._arrived.setdefault(id(call), {})[k] = grad_outputs[output_nr]
                group = self._groups[id(call)]
                group.waiting -= 1
                touched.append(group)
            for group in touched:
                if group.waiting == 0 and not group.done and self._complete(group):
                    self._reduce(group)
        return hook

    def _complete(self, group: _Group) -> bool:
        return all(len(self._arrived.get(id(c), ())) == len(c.edges) for c in group.calls)

    def flush(self) -> None:
        """Reduce every group not reduced in the backward, with the gradients autograd returned
        for its asked edges (each call's `.grads`, set by the engine) and those its hooks saw."""
        seen = set()
        for _, c in self._calls:
            group = self._groups[id(c)]
            if not group.done and id(group) not in seen:
                seen.add(id(group))
                self._reduce(group)

    def _reduce(self, group: _Group) -> None:
        group.done = True
        calls = group.calls
        for c in calls:
            arrived = self._arrived.pop(id(c), {})
            given = c.grads or [None] * len(c.edges)
            c.grads = [arrived.get(k, given[k] if k < len(given) else None) for k in range(len(c.edges))]
        live = [c for c in calls if c.grads and any(g is not None for g in c.grads)]
        if live:
            with self.paused(), torch.enable_grad():
                scale = rescale(live, {}, in_place=False)
                reps = self._per_sample(live)
                if reps:
                    self._add(reps, scale)
        for c in calls:
            c.grads, c.inputs = None, []  # (reduced: freed)

    def _per_sample(self, calls: list) -> dict:
        names = {id(c): h.param_names for h, c in self._calls}
        out: dict = {}
        for c in calls:
            if c.batch != self.B:
                raise ValueError(batch_mismatch(c, self.B, self.batch_first))
            for local, rep in c.finish(c.grads).items():
                name = names[id(c)][local]
                if name in self.params:
                    self.took_part.add(name)
                    out[name] = rep if name not in out else combine(out[name], rep)
        return out

    def _add(self, reps: dict, scale: Tensor | None) -> None:
        """Add one group's |g_i|^2 (and <g_i, S>, |S|^2), formed in float32 on g_i / scale, times scale^2."""
        self.dtype = torch.promote_types(self.dtype, next(iter(reps.values())).dtype)
        if self.cosines:
            sq, dots, sum_sq = GradientStats(reps, self.B, device=self.device).scaled_sums()
        else:
            sq, dots, sum_sq = units_.add_all([u.sq_norms() for u in units_.plan(reps)]), None, None
        acc = self.sq_norms.dtype
        factor = 1.0 if scale is None else scale.to(acc) ** 2
        if scale is not None:
            self.scales.append(scale)
        self.sq_norms += sq.to(acc) * factor
        if dots is not None:
            self.dots += dots.to(acc) * factor
            self.sum_sq += sum_sq.to(acc) * factor

    def grad_scale(self) -> Tensor | None:
        """The largest group scale (None where no group needed one): the second backward's divisor."""
        return torch.stack(self.scales).amax() if self.scales else None

    def stats(self, trainable_names: tuple) -> ReducedStats:
        stats = ReducedStats(self.sq_norms, self.dots if self.cosines else None,
                             self.sum_sq if self.cosines else None, self.dtype)
        stats.trainable_names = trainable_names
        return stats

    def weighted_grads(self, losses: Tensor, w: Tensor, graph_params: dict[str, Tensor]) -> dict[str, Tensor]:
        """{name: (1/B) sum_i w_i g_i} for the parameters that took part, from a second backward of
        sum_i w_i l_i / s through the retained graph (s the largest group scale times a power of two
        near max_i |w_i|: its gradients then stay near 1 as the first backward's did), times s / B."""
        names = [n for n in graph_params if n in self.took_part]
        if not names:
            return {}
        s = self.grad_scale()
        if s is not None:  # the weights scale the output gradients by up to max |w_i| (clipping: C / |g_i|)
            _, e = torch.frexp(w.detach().abs().amax().to(s.dtype))
            s = s * torch.exp2(e.to(s.dtype).clamp(-126, 126))
        total = (losses * w.detach()).sum()
        grads = list(torch.autograd.grad(total if s is None else total / s.to(total.dtype),
                                         [graph_params[n] for n in names], allow_unused=True))
        factor = (1.0 if s is None else s) / self.B
        # in place where a gradient is the only one on its storage and has no stride-0 dims (no second
        # parameter-sized copy); else one at a time, each copy's source freed before the next
        storages = [None if g is None else g.untyped_storage().data_ptr() for g in grads]
        out = {}
        for k, name in enumerate(names):
            g, grads[k] = grads[k], None
            if g is None:
                continue
            alone = storages.count(storages[k]) == 1 and all(st or n <= 1 for st, n in zip(g.stride(), g.shape))
            out[name] = g.mul_(factor) if alone else torch.mul(g, factor, out=torch.empty_like(g))
        return out
