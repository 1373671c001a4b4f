"""A hand-written exact per-sample clipping step, beside the engine's and a plain one: what the
clipping goals of issue 26 would cost without the engine's generality.

    python -m benchmarks.minimal_clip --models wide_mlp vit_linear --rounds 41

`MinimalClip` serves only models whose trainable modules are nn.Linear (inputs (B, ..., n_in)) and
nn.LayerNorm over the last dim, each called once per forward, and does the least an exact
one-backward method must: forward hooks keep each module's input and output; one backward of
sum_i l_i to the outputs (no weight-gradient product); per module the squared per-sample norms,
in the cheaper of the usual routes (|a_i|^2 |d_i|^2 for one position, <A_i A_i^T, D_i D_i^T> for
several, a LayerNorm's (sum_t d_t xhat_t, sum_t d_t) formed); w_i = min(1, C / |g_i|); then
p.grad = (1/B) sum_i w_i g_i, the weights scaling the output gradients. No loss-scale check
(squares may overflow where the engine's would not), no copy of the inputs, no check of any kind.

Columns (medians of `--rounds` interleaved rounds, one thread):
  plain ms        a plain forward + backward of the mean loss
  engine, minimal the engine's clipping step (benchmarks.engine's "clip") and MinimalClip's, as
                  multiples of the plain step
  faults          minor page faults per step (plain / engine / minimal): memory the C allocator
                  handed back to the system and the step touched again (docs/speed.md#cpu-allocator)
Run it again under MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=1000000000 to see
the steps without those faults.
"""
from __future__ import annotations

import argparse
import resource

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.engine import make_variants
from benchmarks.floor import GOALS
from benchmarks.models import BATCHES, batch, build_model, per_sample_losses
from benchmarks.timing import time_variants

SERVED = (nn.Linear, nn.LayerNorm)


class MinimalClip:
    """p.grad = (1/B) sum_i min(1, C / |g_i|) g_i for a model of nn.Linear and nn.LayerNorm modules."""

    def __init__(self, model: nn.Module, clip: float = 1.0):
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own and not isinstance(module, SERVED):
                raise ValueError(f"MinimalClip serves nn.Linear and nn.LayerNorm only, not {name} "
                                 f"({type(module).__name__})")
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                raise ValueError(f"MinimalClip serves a LayerNorm over the last dim only, not {name}")
        self.model, self.clip, self.calls = model, clip, []
        for module in model.modules():
            if isinstance(module, SERVED):
                module.register_forward_hook(lambda m, args, out: self.calls.append((m, args[0], out)))

    def step(self, x: Tensor, y: Tensor, loss) -> None:
        """One step on (x, y); loss(output, y) -> (B,) per-sample losses."""
        self.calls.clear()
        self.model.zero_grad(set_to_none=True)
        losses = loss(self.model(x), y)
        if len({id(m) for m, _, _ in self.calls}) != len(self.calls):
            raise ValueError("MinimalClip serves modules called once per forward")
        outputs = [out for _, _, out in self.calls]
        grads = torch.autograd.grad(losses.sum(), outputs)
        B = losses.shape[0]
        with torch.no_grad():
            parts = [self._per_sample(m, a, d, B) for (m, a, _), d in zip(self.calls, grads)]
            sq_norms = torch.stack([p[0] for p in parts]).sum(0)
            w = (self.clip / sq_norms.sqrt()).clamp_(max=1.0).div_(B)
            for (module, _, _), (_, a, d, sums) in zip(self.calls, parts):
                self._write(module, a, d, sums, w)
        self.calls.clear()

    @staticmethod
    def _per_sample(module: nn.Module, a: Tensor, d: Tensor, B: int) -> tuple:
        """(|g_i|^2 over the module's parameters, then what its weighted sum reads)."""
        if isinstance(module, nn.LayerNorm):  # formed: weight sum_t d_t xhat_t, bias sum_t d_t, (B, n) each
            xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
            gw = (d * xhat).reshape(B, -1, d.shape[-1]).sum(1)
            gb = d.reshape(B, -1, d.shape[-1]).sum(1)
            sq = torch.linalg.vector_norm(gw, dim=1).square_() + torch.linalg.vector_norm(gb, dim=1).square_()
            return sq, gw, gb, None
        a, d = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
        bias = module.bias is not None
        if a.shape[1] == 1:  # one position: |a_i|^2 |d_i|^2, with the bias (|a_i|^2 + 1) |d_i|^2
            a, d = a[:, 0], d[:, 0]
            aa = torch.linalg.vector_norm(a, dim=1).square_()
            dd = torch.linalg.vector_norm(d, dim=1).square_()
            return (torch.addcmul(dd, aa, dd) if bias else aa * dd), a, d, None
        sq = torch.linalg.vecdot(torch.bmm(a, a.mT).view(B, -1), torch.bmm(d, d.mT).view(B, -1))
        sums = d.sum(1) if bias else None  # the bias's per-sample gradients, (B, n_out)
        if bias:
            sq += torch.linalg.vector_norm(sums, dim=1).square_()
        return sq, a, d, sums

    @staticmethod
    def _write(module: nn.Module, a: Tensor, d: Tensor, sums: Tensor | None, w: Tensor) -> None:
        if isinstance(module, nn.LayerNorm):  # a, d: the formed (B, n) gradients of weight and bias
            module.weight.grad, module.bias.grad = w @ a, w @ d
            return
        if a.dim() == 2:
            module.weight.grad = (d * w[:, None]).T.mm(a)
            if module.bias is not None:
                module.bias.grad = w @ d
            return
        dw = (d * w[:, None, None]).reshape(-1, d.shape[-1])
        module.weight.grad = dw.T.mm(a.reshape(-1, a.shape[-1]))
        if module.bias is not None:
            module.bias.grad = w @ sums


def faults_per_step(step, steps: int = 20) -> float:
    """Minor page faults per call of `step` (after warm-up calls)."""
    for _ in range(3):
        step()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / steps


def measure(kind: str, B: int, rounds: int) -> dict:
    """{"plain": ms, "clip", "minimal": multiples of plain, "faults": (plain, clip, minimal)}."""
    steps = make_variants(kind, B, torch.device("cpu"), names=["plain", "clip"])
    torch.manual_seed(0)  # make_variants's model and batch, drawn again
    model = build_model(kind)
    x, y = batch(kind, B)
    minimal = MinimalClip(model)
    steps = {"plain": steps["plain"], "clip": steps["clip"],
             "minimal": lambda: minimal.step(x, y, lambda out, t: per_sample_losses(kind, out, t))}
    faults = tuple(faults_per_step(steps[name]) for name in ("plain", "clip", "minimal"))
    times = time_variants(steps, rounds=rounds)
    plain = times["plain"]
    return {"plain": plain * 1e3, "clip": times["clip"] / plain, "minimal": times["minimal"] / plain, "faults": faults}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["wide_mlp", "vit_linear"],
                        choices=["wide_mlp", "vit_linear", "mlp"])
    parser.add_argument("--batches", type=int, nargs="+", help="default: each model's benchmark batch")
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds\n")
    print("| model | B | plain ms | engine clip | minimal clip | faults per step (plain / engine / minimal) | goal |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.models:
        for B in args.batches or BATCHES[kind][:1]:
            r = measure(kind, B, args.rounds)
            goal = GOALS.get(kind)
            print(f"| {kind} | {B} | {r['plain']:.2f} | {r['clip']:.2f}x | {r['minimal']:.2f}x | "
                  f"{' / '.join(f'{f:.0f}' for f in r['faults'])} | {'-' if goal is None else f'{goal:.2f}x'} |")


if __name__ == "__main__":
    main()
