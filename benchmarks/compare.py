"""Per-sample clipping side by side: gradalign, torch.func, Opacus (hooks, ghost clipping), FastDP.

    python -m benchmarks.compare                                  # the table (about 12 minutes on 1 thread)
    python -m benchmarks.compare --quick                          # smoke run: 3 rounds, no memory
    python -m benchmarks.compare --fastdp ~/src/fast-differential-privacy
    python -m benchmarks.compare --models transformer --methods gradalign opacus_ghost --rounds 41

The workload is per-sample clipping (DP-SGD without noise): g_i the gradient of sample i's loss,
w_i = min(1, C / |g_i|), the update (1/B) sum_i w_i g_i written to p.grad. Each method (see
clip_methods.py) runs it on its own copy of the same model and batch, as its library's
documentation shows; a plain forward + backward of the mean loss runs beside them.

Every number is a ratio to the plain step of the same run: time is the median over `--rounds`
rounds, every method timed in each round in a random order (timing.time_variants), on
`--threads` torch threads (1 by default); memory is the extra peak memory of one step in a
fresh process (timing.peak_memory_mb: on CPU the largest total size of the tensor storages the
step's operators create and hold at once, counted exactly by a dispatch mode).

Correctness: C is the median per-sample gradient norm (half the samples clipped), and every
method's update is checked against the float64 reference of clip_check.py (torch.func vmap(grad)
on a float64 copy of the model, clipped, summed): a relative error above clip_check.TOLERANCE
(1e-4; float32 methods that compute the right sum stay near 1e-6), a missing parameter, a NaN
is marked **wrong**. A library that declines the model when it is set up, or raises
NotImplementedError, **refuses** it; any other exception in its step is a **crash**. The notes
under the table give each message. Wrong results are timed all the same. A batch with a sample at
a kink of the model (a ReLU pre-activation within float32 rounding of 0, where float32 and float64
take different branches; clip_check.AtKink) has no reference: the next seed's batch is drawn, and
the printout says so.

Models (benchmarks/models.py; --models takes any name there):
  wide_mlp     MLP 784-1024-1024-10, B 256
  transformer  nn.TransformerEncoder classifier: token and position nn.Embedding (vocab 1000),
               d 256, 4 heads, 4 layers, MLP 1024, pre-norm, T 64, mean-pooled, linear head, B 32
  gpt2_d256    Hugging Face GPT2LMHeadModel from a config (no download): 4 layers, d 256, 4 heads,
               vocab 1000, T 64, tied input and output embeddings, SDPA, B 8; per-sample loss the
               mean over its next-token predictions; skipped where transformers is missing

Optional installs (none is a dependency of gradalign; the constraint keeps the installed torch):
  Opacus        pip install -c <(echo "torch==$(python -c 'import torch; print(torch.__version__)')") opacus
                (or `make install-compare`)
  transformers  pip install -e '.[test]'   (for gpt2_d256)
  FastDP        git clone https://github.com/awslabs/fast-differential-privacy, then
                --fastdp PATH/TO/fast-differential-privacy (nothing is installed; it needs scipy
                and transformers, and imports from the checkout). Without --fastdp, or when it
                does not import, its column says why it did not run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import warnings
from dataclasses import dataclass

import torch

from benchmarks import clip_check, clip_methods
from benchmarks.compare_report import environment, print_report
from benchmarks.models import BATCHES, LANGUAGE_MODELS, MODELS, batch, build_model, per_sample_losses
from benchmarks.timing import memory_in_subprocess, peak_memory_mb, time_variants

DEFAULT_MODELS = ["wide_mlp", "transformer", "gpt2_d256"]
COMPARED = ["gradalign", "gradalign_low", "vmap", "opacus", "opacus_ghost", "fastdp"]


@dataclass
class Outcome:
    """One method on one model. status: ok, wrong, refuses, crash or not run; note: why."""
    status: str
    note: str | None = None
    error: float | None = None  # relative error to the reference
    seconds: float | None = None
    time_ratio: float | None = None
    memory_mb: float | None = None
    memory_ratio: float | None = None


@dataclass
class ModelRun:
    """One model's results: the clip threshold C, the batch's seed, {method: Outcome}, and why
    earlier batches were drawn again (a sample at a kink: clip_check.AtKink)."""
    clip: float
    seed: int
    outcomes: dict[str, Outcome]
    redrawn: list[str]


def setup(kind: str, B: int, device: torch.device, seed: int = 0):
    """(model, inputs, targets) of `kind`, the same in every process: the model from seed 0, the
    batch drawn after it (seed 0) or from `seed`."""
    torch.manual_seed(0)
    model = build_model(kind).to(device)
    if seed:
        torch.manual_seed(seed)
    x, y = batch(kind, B, device)
    return model, x, y


def referenced_batch(kind: str, B: int, device: torch.device, tries: int = 10):
    """(model, x, y, reference, seed, [why each earlier seed was dropped]): the first batch
    (seeds 0, 1, ...) with no sample at a kink."""
    redrawn = []
    for seed in range(tries):
        model, x, y = setup(kind, B, device, seed)
        try:
            return (model, x, y, clip_check.reference(model, lambda out, t: per_sample_losses(kind, out, t), x, y),
                    seed, redrawn)
        except clip_check.AtKink as err:
            redrawn.append(f"batch seed {seed}: {err}")
            print(f"  {kind}: {redrawn[-1]}; drawing another batch", file=sys.stderr)
    raise RuntimeError(f"{kind}: {tries} batches with a sample at a kink: " + "; ".join(redrawn))


def try_method(name: str, kind: str, model, x, y, ref: clip_check.Reference, fastdp: str | None):
    """(Method or None, Outcome): built, two steps run, the second's update checked."""
    try:
        method = clip_methods.build(name, kind, model, x, y, ref.clip, fastdp_path=fastdp)
    except clip_methods.NotInstalled as err:
        return None, Outcome("not run", str(err))
    except clip_methods.Refused as err:
        return None, Outcome("refuses", str(err))
    try:
        method.step()
        method.step()
    except Exception as err:  # noqa: BLE001 - the library's failure is the result
        status = "refuses" if isinstance(err, NotImplementedError) else "crash"
        return None, Outcome(status, f"{type(err).__name__}: {err}")
    gradient = method.gradient()
    problem = clip_check.check(gradient, ref)
    error = None if problem and problem.startswith(("no gradient", "wrong shape")) else \
        clip_check.relative_error(gradient, ref)
    if problem and method.changed is not None:
        problem += "; " + changed_note(kind, model, method.changed, x, y, ref.clip)
    method.clear()
    note = "; ".join(text for text in (method.remark, problem) if text) or None
    return method, Outcome("wrong" if problem else "ok", note, error)


def changed_note(kind: str, model, changed, x, y, clip: float) -> str:
    """How far the model a library made computes from the given one, and whether the library's
    update is right for the model it made (its own float64 reference)."""
    other, gradient = changed
    with torch.no_grad():
        out, out_other = model(x), other(x)
    moved = ((out_other - out).abs().max() / out.abs().max()).item()
    try:
        own_ref = clip_check.reference(other, lambda o, t: per_sample_losses(kind, o, t), x, y, clip=clip)
    except clip_check.AtKink as err:
        return f"the model it ran computes another function (outputs up to {moved:.0%} of the largest output " \
               f"away); no reference for that model on this batch ({err})"
    own = clip_check.check(gradient(), own_ref)
    return (f"the model it ran computes another function (outputs up to {moved:.0%} of the largest output away); "
            + ("its update is right for that model" if own is None else f"for that model too: {own}")
            + f" (relative error {clip_check.relative_error(gradient(), own_ref):.1e})")


def memory(kind: str, B: int, name: str, clip: float, seed: int, args) -> float:
    """Extra peak MB of one step of `name`, in a fresh process (see measure_memory)."""
    extra = ["--threads", str(args.threads), "--device", args.device] + (["--fastdp", args.fastdp] if args.fastdp else [])
    return memory_in_subprocess("benchmarks.compare", [kind, str(B), name, repr(clip), str(seed), *extra])


def measure_memory(kind: str, B: int, name: str, clip: float, seed: int, device: torch.device,
                   fastdp: str | None) -> float:
    """Peak extra MB of a step of `name`, after one step that initialises what is lazy."""
    model, x, y = setup(kind, B, device, seed)
    method = clip_methods.build(name, kind, model, x, y, clip, fastdp_path=fastdp)
    return peak_memory_mb(method.step, device, method.clear)


def run_model(kind: str, B: int, args) -> ModelRun:
    """One model: the reference, the checks, the times, the memory."""
    device = torch.device(args.device)
    model, x, y, ref, seed, redrawn = referenced_batch(kind, B, device)
    plain, _ = try_method("plain", kind, model, x, y, ref, args.fastdp)
    steps, outcomes = {"plain": plain.step}, {}
    for name in args.methods:
        method, outcomes[name] = try_method(name, kind, model, x, y, ref, args.fastdp)
        if method is not None:
            steps[name] = method.step
        print(f"  {kind}: {name} {outcomes[name].status}" + (f" ({outcomes[name].note})" if outcomes[name].note else ""),
              file=sys.stderr)
    medians = time_variants(steps, rounds=args.rounds, warmup=1 if args.quick else 3)
    plain_mb = None if args.quick or args.no_memory else memory(kind, B, "plain", ref.clip, seed, args)
    for name, seconds in medians.items():
        if name == "plain":
            continue
        outcome = outcomes[name]
        outcome.seconds, outcome.time_ratio = seconds, seconds / medians["plain"]
        if plain_mb is not None:
            try:
                outcome.memory_mb = memory(kind, B, name, ref.clip, seed, args)
                outcome.memory_ratio = outcome.memory_mb / max(plain_mb, 1e-6)
            except Exception as err:  # noqa: BLE001 - say so in the table rather than lose the run
                print(f"  {kind}: {name} memory not measured: {err}", file=sys.stderr)
    outcomes["plain"] = Outcome("ok", seconds=medians["plain"], time_ratio=1.0, memory_mb=plain_mb,
                                memory_ratio=None if plain_mb is None else 1.0)
    return ModelRun(ref.clip, seed, outcomes, redrawn)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=COMPARED, choices=COMPARED)
    parser.add_argument("--batch", type=int, help="one batch size for every model (default: the table's, "
                                                  "wide_mlp 256, transformer 32, gpt2_d256 8)")
    parser.add_argument("--rounds", type=int, default=21, help="timing rounds (median over rounds)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up step, no memory")
    parser.add_argument("--no-memory", action="store_true", help="time and check only")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--fastdp", metavar="PATH", help="root of a fast-differential-privacy source checkout")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (float32)")
    parser.add_argument("--measure-memory", nargs=5, metavar=("MODEL", "B", "METHOD", "C", "SEED"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 3
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    warnings.filterwarnings("ignore")  # the libraries' deprecation and hook warnings
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        kind, B, name, clip, seed = args.measure_memory
        print(json.dumps(measure_memory(kind, int(B), name, float(clip), int(seed), torch.device(args.device),
                                        args.fastdp)))
        return
    if importlib.util.find_spec("transformers") is None and set(args.models) & set(LANGUAGE_MODELS):
        print("gpt2 skipped: transformers is not installed (pip install -e '.[test]')", file=sys.stderr)
        args.models = [m for m in args.models if m not in LANGUAGE_MODELS]
    header = environment(args, "python -m benchmarks.compare " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)))
    results = {}
    for kind in args.models:
        B = args.batch or BATCHES[kind][0]
        print(f"{kind}, B = {B} ...", file=sys.stderr)
        results[(kind, B)] = run_model(kind, B, args)
    print_report(header, results, args.methods, memory=not (args.quick or args.no_memory))


if __name__ == "__main__":
    main()
