"""Hand-written exact clipping and GASW steps, beside the engine's and a plain one: what the
goals of issue 26 would cost without the engine's generality.

    python -m benchmarks.minimal --models wide_mlp vit_linear --rounds 41

`MinimalStep` serves only models whose trainable modules are nn.Linear (inputs (B, ..., n_in), with
a bias) and nn.LayerNorm over the last dim, each called once per forward, and does the least an
exact one-backward method must:
  - forward hooks keep each module's input and output;
  - one backward of sum_i l_i to the outputs, which forms no weight-gradient product except, for
    GASW, S = sum_i g_i of the layers whose cosines read it (as a plain backward forms it);
  - per module the squared per-sample norms, by the cheaper of the usual routes (|a_i|^2 |d_i|^2 for
    one position, <A_i A_i^T, D_i D_i^T> for several, a LayerNorm's (sum_t d_t xhat_t, sum_t d_t)
    formed); for GASW also <g_i, S>: from the (B, B) Gram matrix (a_i . a_j + 1)(d_i . d_j) where
    that is cheaper than S (one position), else sum_t d_it^T S a_it;
  - the weights: clip w_i = min(1, C / |g_i|); GASW w_i = B c_i / sum_j c_j, c_i = max(0, cos(g_i, S))^gamma;
  - p.grad = (1/B) sum_i w_i g_i, the weights scaling the output gradients.
No loss-scale check unless asked (`check_scale=True`: the engine's CPU check, one norm per output
gradient, which refuses a backward it cannot settle where the engine would rescale; without it
squares may overflow where the engine's would not), no copy of the inputs, no fallback for
degenerate weights, no other check.

Columns (medians of `--rounds` interleaved rounds, one thread), per weighting (clip, gasw):
  plain ms          a plain forward + backward of the mean loss
  engine, by hand   the engine's step (benchmarks.engine's "clip" / "gasw", release=True) and
                    MinimalStep's, as multiples of the plain step; "+ check": MinimalStep with
                    check_scale=True (the loss-scale check that exactness at any loss scale needs)
  faults            minor page faults per step (plain / engine / minimal): memory the C allocator
                    handed back to the system and the step touched again (docs/speed.md#cpu-allocator)
Run it again under MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=1000000000 to see
the steps without those faults. Steps that share one process share its C heap, so each variant's
page faults depend on the others'; `--processes K` times each variant alone in a fresh process
instead (K rounds, one process per variant in turn, `--steps` steps each after 10 of warm-up):

    python -m benchmarks.minimal --models wide_mlp vit_linear --processes 5
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.engine import make_variants
from benchmarks.floor import GOALS
from benchmarks.models import BATCHES, batch, build_model, per_sample_losses
from benchmarks.timing import median_seconds, time_variants
from gradalign.engine.representations import cosine_route
from gradalign.engine.representations.dense import row_sq_norms
from gradalign.engine.scale import clearly_safe

SERVED = (nn.Linear, nn.LayerNorm)
GASW_GOALS = {"vit_linear": 1.80, "wide_mlp": 1.30}  # issue 26's


class MinimalStep:
    """p.grad = (1/B) sum_i w_i g_i with clipping or GASW weights, for a model of nn.Linear and
    nn.LayerNorm modules (see the module's docstring)."""

    def __init__(self, model: nn.Module, weighting: str = "clip", *, clip: float = 1.0, gamma: float = 2.0,
                 check_scale: bool = False):
        if weighting not in ("clip", "gasw"):
            raise ValueError(f"weighting must be 'clip' or 'gasw', got {weighting!r}")
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own and not isinstance(module, SERVED):
                raise ValueError(f"MinimalStep serves nn.Linear and nn.LayerNorm only, not {name} "
                                 f"({type(module).__name__})")
            if isinstance(module, SERVED) and (module.bias is None or module.weight is None):
                raise ValueError(f"MinimalStep serves modules with a weight and a bias, not {name}")
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                raise ValueError(f"MinimalStep serves a LayerNorm over the last dim only, not {name}")
        self.model, self.weighting, self.clip, self.gamma, self.calls = model, weighting, clip, gamma, []
        self.check_scale = check_scale
        for module in model.modules():
            if isinstance(module, SERVED):
                module.register_forward_hook(lambda m, args, out: self.calls.append((m, args[0], out)))

    def step(self, x: Tensor, y: Tensor, loss) -> None:
        """One step on (x, y); loss(output, y) -> (B,) per-sample losses."""
        self.calls.clear()
        self.model.zero_grad(set_to_none=True)
        losses = loss(self.model(x), y)
        if len({id(m) for m, _, _ in self.calls}) != len(self.calls):
            raise ValueError("MinimalStep serves modules called once per forward")
        B = losses.shape[0]
        gasw = self.weighting == "gasw"
        by_sum = [m for m, a, _ in self.calls if gasw and isinstance(m, nn.Linear) and not self._gram_cheaper(m, a, B)]
        sums = [p for m in by_sum for p in (m.weight, m.bias)]
        grads = torch.autograd.grad(losses.sum(), [out for _, _, out in self.calls] + sums)
        S = dict(zip(by_sum, zip(grads[len(self.calls)::2], grads[len(self.calls) + 1::2])))
        if self.check_scale and not clearly_safe(list(grads[:len(self.calls)])):
            raise ValueError("these losses need the loss scale, which MinimalStep does not apply")
        with torch.no_grad():
            parts = [self._per_sample(m, a, d, B) for (m, a, _), d in zip(self.calls, grads)]
            sq_norms = torch.stack([p[0] for p in parts]).sum(0)
            if gasw:
                dots, sum_sq = zip(*(self._dots(m, p, S.get(m)) for (m, _, _), p in zip(self.calls, parts)))
                cos = torch.stack(dots).sum(0) / (sq_norms.sqrt() * torch.stack(sum_sq).sum().sqrt())
                raw = cos.clamp_(min=0).pow_(self.gamma)
                w = raw.div_(raw.sum())  # B c_i / sum_j c_j, times the 1/B of the mean
            else:
                w = (self.clip / sq_norms.sqrt()).clamp_(max=1.0).div_(B)
            for (module, _, _), (_, a, d, sums_t) in zip(self.calls, parts):
                self._write(module, a, d, sums_t, w)
        self.calls.clear()

    @staticmethod
    def _gram_cheaper(module: nn.Module, a: Tensor, B: int) -> bool:
        """One position, and the (B, B) Gram products cheaper than forming S and d S a^T."""
        n_in, n_out = module.in_features, module.out_features
        return a.numel() == B * n_in and cosine_route(B, 1, 1, n_in, n_out, have_sum=False) == "gram"

    @staticmethod
    def _per_sample(module: nn.Module, a: Tensor, d: Tensor, B: int) -> tuple:
        """(|g_i|^2 over the module's weight and bias, then what the dots and the weighted sum read)."""
        if isinstance(module, nn.LayerNorm):  # formed: weight sum_t d_t xhat_t, bias sum_t d_t, (B, n) each
            xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
            gw = (d * xhat).reshape(B, -1, d.shape[-1]).sum(1)
            gb = d.reshape(B, -1, d.shape[-1]).sum(1)
            sq = row_sq_norms(gw) + row_sq_norms(gb)
            return sq, gw, gb, None
        a, d = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
        if a.shape[1] == 1:  # one position: (|a_i|^2 + 1) |d_i|^2
            a, d = a[:, 0], d[:, 0]
            aa, dd = row_sq_norms(a), row_sq_norms(d)
            return torch.addcmul(dd, aa, dd), a, d, None
        sums = d.sum(1)  # the bias's per-sample gradients, (B, n_out)
        sq = torch.linalg.vecdot(torch.bmm(a, a.mT).view(B, -1), torch.bmm(d, d.mT).view(B, -1))
        return sq.add_(row_sq_norms(sums)), a, d, sums

    @staticmethod
    def _dots(module: nn.Module, part: tuple, S: tuple | None) -> tuple[Tensor, Tensor]:
        """((B,) <g_i, S>, |S|^2) of one module, S = sum_j g_j over its weight and bias."""
        _, a, d, sums = part
        if isinstance(module, nn.LayerNorm):  # a, d: the formed gradients of weight and bias
            sw, sb = a.sum(0), d.sum(0)
            return a @ sw + d @ sb, sw.dot(sw) + sb.dot(sb)
        if S is None:  # one position, Gram route: K_ij = (a_i . a_j + 1)(d_i . d_j)
            K = torch.addmm(torch.ones((), dtype=a.dtype), a, a.T).mul_(d @ d.T)
            return K.sum(1), K.sum()
        SW, Sb = S
        B = a.shape[0]
        rows = d.reshape(-1, d.shape[-1]) @ SW  # (B T, n_in): d_it^T S
        dots = torch.linalg.vecdot(rows.view(B, -1), a.reshape(B, -1))
        dots += (sums if sums is not None else d) @ Sb
        return dots, SW.reshape(-1).dot(SW.reshape(-1)) + Sb.dot(Sb)

    @staticmethod
    def _write(module: nn.Module, a: Tensor, d: Tensor, sums: Tensor | None, w: Tensor) -> None:
        if isinstance(module, nn.LayerNorm):  # a, d: the formed (B, n) gradients of weight and bias
            module.weight.grad, module.bias.grad = w @ a, w @ d
        elif a.dim() == 2:
            module.weight.grad, module.bias.grad = (d * w[:, None]).T.mm(a), w @ d
        else:
            dw = (d * w[:, None, None]).reshape(-1, d.shape[-1])
            module.weight.grad, module.bias.grad = dw.T.mm(a.reshape(-1, a.shape[-1])), w @ sums


def faults_per_step(step, steps: int = 20) -> float:
    """Minor page faults per call of `step` (after warm-up calls)."""
    for _ in range(3):
        step()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / steps


VARIANTS = ("plain", "clip", "gasw", "by hand clip", "by hand clip + check", "by hand gasw", "by hand gasw + check")


def build_step(kind: str, B: int, name: str):
    """The step of variant `name` (VARIANTS) on its own copy of the benchmark model and batch."""
    if name in ("plain", "clip", "gasw"):
        return make_variants(kind, B, torch.device("cpu"), names=[name])[name]
    torch.manual_seed(0)  # make_variants's model and batch, drawn again
    model = build_model(kind)
    x, y = batch(kind, B)
    minimal = MinimalStep(model, "gasw" if "gasw" in name else "clip", check_scale=name.endswith("+ check"))
    return lambda: minimal.step(x, y, lambda out, t: per_sample_losses(kind, out, t))


def measure(kind: str, B: int, rounds: int) -> dict:
    """{"plain": ms; every other variant: a multiple of plain; "faults": (plain, clip, by hand clip) per
    step}, all variants interleaved in this process."""
    steps = {name: build_step(kind, B, name) for name in VARIANTS}
    faults = tuple(faults_per_step(steps[name]) for name in ("plain", "clip", "by hand clip"))
    times = time_variants(steps, rounds=rounds)
    plain = times.pop("plain")
    return {"plain": plain * 1e3, **{name: t / plain for name, t in times.items()}, "faults": faults}


def one_process(kind: str, B: int, name: str, steps: int) -> float:
    """Median seconds of `steps` steps of one variant, the only one in this process (after 10 of warm-up)."""
    step = build_step(kind, B, name)
    for _ in range(10):
        step()
    return median_seconds(step, steps)


def measure_apart(kind: str, B: int, processes: int, steps: int) -> dict:
    """As `measure`, each variant alone in a fresh process, `processes` rounds of one process per variant
    taking turns; the median over rounds of each process's median (no faults counted)."""
    seconds = {name: [] for name in VARIANTS}
    for _ in range(processes):
        for name in VARIANTS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.minimal", "--one", kind, str(B), name, str(steps)],
                                 cwd=Path(__file__).parents[1], capture_output=True, text=True, check=True)
            seconds[name].append(float(out.stdout.strip().splitlines()[-1]))
    plain = statistics.median(seconds.pop("plain"))
    return {"plain": plain * 1e3, **{n: statistics.median(t) / plain for n, t in seconds.items()}, "faults": None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["wide_mlp", "vit_linear"],
                        choices=["wide_mlp", "vit_linear", "mlp"])
    parser.add_argument("--batches", type=int, nargs="+", help="default: each model's benchmark batch")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--processes", type=int, default=0,
                        help="time each variant alone in its own process, this many rounds (0: all in this one)")
    parser.add_argument("--steps", type=int, default=150, help="--processes: steps timed per process")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "B", "VARIANT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:
        kind, B, name, steps = args.one
        print(one_process(kind, int(B), name, int(steps)))
        return
    where = (f"each variant alone in a fresh process, {args.processes} rounds of {args.steps} steps"
             if args.processes else f"{args.rounds} interleaved rounds")
    print(f"torch {torch.__version__}, 1 thread, {where}\n")
    print("| model | B | plain ms | clip: engine | by hand | by hand + check | GASW: engine | by hand | by hand + check "
          "| faults per step (plain / engine / by hand clip) | goals (clip, GASW) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    goal = lambda table, kind: f"{table[kind]:.2f}x" if kind in table else "-"  # noqa: E731
    for kind in args.models:
        for B in args.batches or BATCHES[kind][:1]:
            r = (measure_apart(kind, B, args.processes, args.steps) if args.processes
                 else measure(kind, B, args.rounds))
            ratios = " | ".join(f"{r[name]:.2f}x" for name in ("clip", "by hand clip", "by hand clip + check", "gasw",
                                                               "by hand gasw", "by hand gasw + check"))
            faults = " / ".join(f"{f:.0f}" for f in r["faults"]) if r["faults"] else "-"
            print(f"| {kind} | {B} | {r['plain']:.2f} | {ratios} | {faults} | {goal(GOALS, kind)}, {goal(GASW_GOALS, kind)} |")


if __name__ == "__main__":
    main()
