"""What an exact one-backward clipping step cannot avoid on this machine, beside what the engine spends.

    python -m benchmarks.floor --models transformer gpt2_d256 vit_linear wide_mlp --rounds 21

Per-sample clipping needs every sample's gradient norm before any weight w_i = min(1, C/|g_i|) is
known, so a method with one backward (the engine, FastDP's book-keeping) must form the norms, keep
every layer's output gradients through the backward, and form p.grad = sum_i w_i g_i after it,
reading every layer's inputs and output gradients again. A plain step forms the same
weight-gradient products while each output gradient is in cache, and reuses its memory. Per model
(its benchmark batch, the threads given; every column a share of the plain step):

  plain, clip          a plain forward + backward (ms); the engine's clipping step (benchmarks.engine's
                       "clip"), medians of `--rounds` interleaved rounds
  norm MACs            per linear map (nn.Linear, attention's projections) the cheaper exact route:
                       ghost T^2 (n_in + n_out), formed T n_in n_out per sample, n_in + n_out for one
                       position; other parameters are left out, so every floor stays a lower bound
  norms @ peak         those multiply-adds at this machine's peak product rate (2048x1024 @ 1024x1024)
  norms, best kernel   the fastest of the exact formulations (`norm_kernels`, and the engine's own) on
                       each layer's own shapes, warm, summed; "norms, engine": the engine's alone
  re-read              per layer, the weight-gradient product D^T A started after the caches were
                       flushed, minus the same product warm (what the plain step pays)
  weighted, engine     the engine's weighted products (weights applied, bias), started cold, minus the
                       same warm plain products
  keep                 a plain step whose hooks keep every layer's output gradient to the end, minus
                       the same hooks keeping nothing (interleaved)
  LayerNorms           every nn.LayerNorm call's per-sample gradients (sum_t d_t xhat_t, sum_t d_t), the
                       faster of the engine's rule and a recompute of xhat with one product-sum, warm

  floor @ peak    = 1 + norms @ peak + re-read + keep + LayerNorms
  floor, kernels  = 1 + norms, best kernel + re-read + keep + LayerNorms

A goal below "floor @ peak" is out of reach for any exact one-backward method whose norms cost the
cheaper route's multiply-adds; below "floor, kernels", for one built on this machine's kernels at
these shapes. The clip ratio minus "floor, kernels" is what the engine spends beyond the floor
(forward hooks, the loss-scale check, the rules, the weights' passes, operator calls).
"""
from __future__ import annotations

import argparse

import torch

import gradalign as ga
from benchmarks.engine import make_variants
from benchmarks.models import BATCHES, MODELS, batch, build_model, per_sample_losses
from benchmarks.timing import median_seconds, time_variants
from gradalign.engine.representations import Factored

GOALS = {"transformer": 1.15, "gpt2_d256": 1.10, "vit_linear": 1.30, "wide_mlp": 1.10}  # issue 26's clip goals
_EVICT: list[torch.Tensor] = []  # 64 MiB, made on first use: more than this machine's per-core caches


def peak_macs_per_second(repeats: int = 11) -> float:
    """This machine's rate on a large float32 product (warm), multiply-adds per second: the best of
    five medians (a busy machine only ever makes it look slower, which would lower the floor)."""
    a, b = torch.randn(2048, 1024), torch.randn(1024, 1024)
    return 2048 * 1024 * 1024 / min(median_seconds(lambda: a @ b, repeats) for _ in range(5))


def linear_maps(kind: str, B: int) -> list[Factored]:
    """The engine's representations of one batch's linear maps (G = 1; T = 1 for features)."""
    torch.manual_seed(0)
    model = build_model(kind)
    x, y = batch(kind, B)
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(per_sample_losses(kind, model(x), y), write_grad=False)
    reps = [r for r in stats._per_sample.values()
            if isinstance(r, Factored) and r.A.shape[1] == 1]
    engine.remove()
    return reps


def norm_macs(rep: Factored) -> int:
    B, _, T, n_in = rep.A.shape
    n_out = rep.D.shape[3]
    if T == 1:  # |a|^2 |d|^2
        return B * (n_in + n_out)
    return B * min(T * T * (n_in + n_out), T * n_in * n_out)


def _evict() -> None:
    if not _EVICT:
        _EVICT.append(torch.zeros(64 << 20, dtype=torch.uint8))
    _EVICT[0].add_(1)


def norm_kernels(rep: Factored) -> dict:
    """Exact formulations of one layer's (B,) |g_i|^2 (weight only): for one position |a|^2 |d|^2; else
    the ghost products A A^T, D D^T (as the engine forms them, and with the transposed operands copied
    contiguous first, copy included) and the per-sample gradients formed and reduced."""
    B, _, T, _ = rep.A.shape
    A, D = rep.A[:, 0], rep.D[:, 0]  # (B, T, n)
    if T == 1:
        return {"rows": lambda: torch.linalg.vecdot(A[:, 0], A[:, 0]) * torch.linalg.vecdot(D[:, 0], D[:, 0])}
    return {"ghost": lambda: torch.linalg.vecdot((A @ A.transpose(1, 2)).view(B, -1),
                                                 (D @ D.transpose(1, 2)).view(B, -1)),
            "ghost, transposed copies": lambda: torch.linalg.vecdot(
                torch.bmm(A, A.transpose(1, 2).contiguous()).view(B, -1),
                torch.bmm(D, D.transpose(1, 2).contiguous()).view(B, -1)),
            "formed": lambda: torch.linalg.vector_norm(torch.bmm(D.transpose(1, 2), A).view(B, -1), dim=1).square()}


def layer_costs(reps: list[Factored], repeats: int) -> dict[str, float]:
    """Seconds, summed over the layers: the weight's norms by the best kernel and as the engine forms
    them (warm); the plain weight-gradient product D^T A started with cold caches minus warm (what reading
    the factors again after the backward costs); the engine's weighted products started cold."""
    B = reps[0].A.shape[0] if reps else 0
    w = torch.rand(B)
    out = dict.fromkeys(("best", "engine", "reread", "weighted"), 0.0)
    for rep in reps:
        engine = median_seconds(rep.sq_norms, repeats)
        out["engine"] += engine
        out["best"] += min([engine] + [median_seconds(f, repeats) for f in norm_kernels(rep).values()])
        d = rep.D.reshape(-1, rep.D.shape[3]).contiguous()
        a = rep.A.reshape(-1, rep.A.shape[3]).contiguous()
        warm = median_seconds(lambda: d.T.mm(a), repeats)
        out["reread"] += median_seconds(lambda: d.T.mm(a), repeats, setup=_evict) - warm
        if rep.A.shape[2] > 1:
            rep.position_sums  # noqa: B018 - formed by the engine's norms (their ghost route) before p.grad
        out["weighted"] += median_seconds(lambda: rep.weighted_sums(w, bias=True), repeats, setup=_evict) - warm
    return out


def step_times(kind: str, B: int, rounds: int) -> dict[str, float]:
    """Median seconds of the plain step and the engine's clipping step (benchmarks.engine's), interleaved."""
    return time_variants(make_variants(kind, B, torch.device("cpu"), names=["plain", "clip"]), rounds=rounds)


def norm_layer_cost(kind: str, B: int, repeats: int) -> float:
    """Seconds of every nn.LayerNorm call's per-sample weight and bias gradients, sum_t d_t * xhat_t and
    sum_t d_t, by the faster of the engine's rule and xhat recomputed, then one product-sum per
    parameter (warm), from one plain step's inputs and output gradients."""
    from gradalign.engine.rules.norm import layer_norm_rule
    torch.manual_seed(0)
    model = build_model(kind)
    x, y = batch(kind, B)
    calls = []

    def on_output(module, args, output):
        call = [module, args[0].detach(), None]
        output.register_hook(lambda g: call.__setitem__(2, g))
        calls.append(call)
    handles = [m.register_forward_hook(on_output) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    per_sample_losses(kind, model(x), y).sum().backward()
    for h in handles:
        h.remove()
    total = 0.0
    for module, inputs, d in calls:
        shape = module.normalized_shape
        xs, ds = inputs.reshape(inputs.shape[0], -1, *shape), d.reshape(d.shape[0], -1, *shape)
        ones, zeros = inputs.new_ones(shape), inputs.new_zeros(shape)

        def recomputed():
            xhat = torch.nn.functional.layer_norm(xs, shape, ones, zeros, eps=module.eps)
            return torch.linalg.vecdot(ds, xhat, dim=1), ds.sum(1)
        total += min(median_seconds(lambda: layer_norm_rule(module, (inputs,), d), repeats),
                     median_seconds(recomputed, repeats))
    return total


def keep_cost(kind: str, B: int, rounds: int) -> float:
    """Seconds a plain step takes longer when every layer's output gradient is kept until the step
    ends (as a one-backward method must keep them for p.grad) than with the same hooks keeping
    nothing: the allocator can no longer hand the backward memory that is still in cache."""
    torch.manual_seed(0)
    model = build_model(kind)
    x, y = batch(kind, B)
    served = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding,
                                                            torch.nn.MultiheadAttention))]
    kept = []

    def hooked_step(keep: bool):
        def on_output(module, args, output):
            output = output[0] if isinstance(output, tuple) else output
            if output.requires_grad:
                output.register_hook(kept.append if keep else (lambda g: None))
        handles = [m.register_forward_hook(on_output) for m in served]
        model.zero_grad(set_to_none=True)
        per_sample_losses(kind, model(x), y).mean().backward()
        for h in handles:
            h.remove()
        kept.clear()
    times = time_variants({"keep": lambda: hooked_step(True), "hooks": lambda: hooked_step(False)}, rounds=rounds)
    return times["keep"] - times["hooks"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(GOALS), choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = peak_macs_per_second()
    print(f"torch {torch.__version__}, {args.threads} thread(s), peak product rate {peak / 1e9:.1f} GMAC/s\n")
    print("| model | B | plain ms | clip | norm MACs (M) | norms @ peak | norms, best kernel | norms, engine | "
          "re-read | weighted, engine | keep | LayerNorms | floor @ peak | floor, kernels | goal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.models:
        B = BATCHES[kind][0]
        times = step_times(kind, B, args.rounds)
        reps = linear_maps(kind, B)
        macs = sum(norm_macs(r) for r in reps)
        costs = layer_costs(reps, repeats=max(5, args.rounds // 2))
        plain = times["plain"]
        at_peak = macs / peak
        reread = max(costs["reread"], 0.0)
        keep = max(keep_cost(kind, B, args.rounds), 0.0)
        norm_layers = norm_layer_cost(kind, B, repeats=max(5, args.rounds // 2))
        goal = GOALS.get(kind)
        share = lambda seconds: f"+{seconds / plain:.1%}"
        print(f"| {kind} | {B} | {plain * 1e3:.1f} | {times['clip'] / plain:.2f}x | {macs / 1e6:.0f} | {share(at_peak)} | "
              f"{share(costs['best'])} | {share(costs['engine'])} | {share(reread)} | {share(costs['weighted'])} | "
              f"{share(keep)} | {share(norm_layers)} | {(plain + at_peak + reread + keep + norm_layers) / plain:.2f}x | "
              f"{(plain + costs['best'] + reread + keep + norm_layers) / plain:.2f}x | "
              f"{'-' if goal is None else f'{goal:.2f}x'} |")


if __name__ == "__main__":
    main()
