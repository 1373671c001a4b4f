"""Engine cost against a plain forward+backward of the mean loss, and against materialising routes.

    python -m benchmarks.engine                 # full table (several minutes on 2 CPU cores)
    python -m benchmarks.engine --quick         # fewer rounds, no memory column
    python -m benchmarks.engine --models vit_plain vit --variants norms gasw --interleave --threads 1

Models: the seed MLP and the Conv1d net of experiments.models on mnist1d-shaped inputs, and a
small ViT on 3x16x16 images (4x4 patches: 16 tokens, D=64, 4 nn.TransformerEncoder layers of 4
heads, MLP 256, pre-norm): `vit` with a cls token and a position embedding owned by its root
module (raw parameters, watched at their point of use), `vit_plain` the same without them
(mean-pooled), and `vit_embedding` the same 17 tokens from nn.Embedding children, to price the
raw parameters and the extra token apart. `--interleave` times the models' variants together,
round by round, and adds each variant's ratio to the same variant of the first model.
    python -m benchmarks.engine --models resnet_gn   # a small ResNet with GroupNorm, B = 32
    python -m benchmarks.engine --models gpt2 --variants norms gasw --threads 1   # needs transformers
    python -m benchmarks.engine --models lstm_lm --variants clip gasw "opacus dplstm clip" --quick

`gpt2` is a Hugging Face GPT2LMHeadModel from a small config (4 layers, d = 128, 4 heads, vocab
1000, 64 tokens, input and output embeddings tied, SDPA attention), B = 16, with per-sample
losses averaged over each sample's next-token predictions (ga.token_losses); skipped, with a
message, where transformers is not installed.

Variants, each on its own copy of the model (same weights, same batch):
  plain        forward, mean cross-entropy, backward
  norms        engine.backward(losses); stats.norms
  clip         engine.backward(losses, weights=w, release=True) with w_i = min(1, C/|g_i|):
               per-sample norms and the clipped p.grad in one backward (the per-sample clipping
               workload), each layer's factors freed once its part of p.grad is written
  gasw         engine.backward(losses, weights=GASW(2), release=True): norms, cosines, weighted p.grad
  clip kept, gasw kept   the same without release (the statistics keep every layer's factors)
  clip low, gasw low     the same with memory="low": each layer reduced to norms (and cosines) inside the
               backward, its output gradient not kept; p.grad from a second backward of sum_i w_i l_i
  gaga         engine.backward(losses); stats.grad_sq_sum
  vmap gasw    torch.func vmap(grad) per-sample gradients, then the GASW statistics and p.grad
  opacus gasw  Opacus GradSampleModule grad_sample, then the same (when opacus is installed)
  opacus dplstm clip  lstm_lm only: Opacus's DPLSTM in place of nn.LSTM, GradSampleModule's per-sample
               gradients, then the clipped p.grad (the per-sample clipping workload, as `clip`)
  backpack gasw BackPACK BatchGrad, then the same (when backpack is installed)
Memory: extra peak memory of one step in a fresh process, above the memory held once the previous
step's gradients are freed (CPU: the largest total size of the tensor storages the step's operators
create and hold at once, counted by a dispatch mode; CUDA: max_memory_allocated), as a ratio to
the plain step.
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import sys
import warnings

import torch
import torch.nn.functional as F

import gradalign as ga
from benchmarks.models import (BATCHES, MODELS, LSTMLanguageModel, batch, build_model, clip_weights,
                               per_sample_losses)
from benchmarks.timing import memory_in_subprocess, peak_memory_mb, print_table, time_variants

def gasw_from_materialised(grads: dict, params: dict, gamma: float = 2.0) -> None:
    """GASW statistics and p.grad from materialised per-sample gradients {name: (B, ...)}."""
    B = next(iter(grads.values())).shape[0]
    mean = {n: g.mean(0) for n, g in grads.items()}
    sq_norms = sum(g.flatten(1).square().sum(1) for g in grads.values())
    dots = sum(g.flatten(1) @ mean[n].flatten() for n, g in grads.items())
    cos = dots / (sq_norms.sqrt() * sum(m.square().sum() for m in mean.values()).sqrt())
    raw = cos.clamp_min(0).pow(gamma)
    w = raw * B / raw.sum()
    for n, p in params.items():
        p.grad = torch.tensordot(w, grads[n], dims=1) / B


def opacus_dplstm_clip(base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """Opacus's per-sample clipping of the LSTM language model: the same weights with DPLSTM in place
    of nn.LSTM, GradSampleModule's grad_sample, then p.grad = (1/B) sum_i min(1, C/|g_i|) g_i."""
    from opacus import GradSampleModule
    model = LSTMLanguageModel(recurrent="opacus").to(device)
    for name in ("embed", "rnn", "out"):  # DPLSTM takes nn.LSTM's state dict (its own load_state_dict)
        getattr(model, name).load_state_dict(getattr(base, name).state_dict())
    op_model = GradSampleModule(model, loss_reduction="sum")
    params = [p for p in op_model.parameters() if p.requires_grad]

    def step():
        op_model.zero_grad(set_to_none=True)
        per_sample_losses("lstm_lm", op_model(x), y).sum().backward()
        grads = [p.grad_sample for p in params]
        norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
        w = (1.0 / norms).clamp(max=1.0)
        for p, g in zip(params, grads):
            p.grad = torch.tensordot(w, g, dims=1) / x.shape[0]
            p.grad_sample = None
    step.params = params
    return step


def make_variants(kind: str, B: int, device: torch.device, only: str | None = None,
                  names: list[str] | None = None) -> dict:
    """The variants' step functions; `only` builds just that one (for memory measurement),
    `names` just those."""
    torch.manual_seed(0)
    base = build_model(kind).to(device)
    x, y = batch(kind, B, device)
    variants = {}

    plain = copy.deepcopy(base)

    def plain_step():
        plain.zero_grad(set_to_none=True)
        per_sample_losses(kind, plain(x), y).mean().backward()
    plain_step.params = list(plain.parameters())
    variants["plain"] = plain_step

    def engine_step(statistic):
        model = copy.deepcopy(base)
        engine = ga.PerSampleGradients(model)

        def step():
            model.zero_grad(set_to_none=True)
            losses = per_sample_losses(kind, model(x), y)
            statistic(engine, losses)
        step.params = list(model.parameters())
        return step

    variants["norms"] = engine_step(lambda e, l: e.backward(l).norms)
    variants["clip"] = engine_step(lambda e, l: e.backward(l, weights=clip_weights, release=True))
    variants["gasw"] = engine_step(lambda e, l: e.backward(l, weights=ga.GASW(2.0), release=True))
    variants["clip kept"] = engine_step(lambda e, l: e.backward(l, weights=clip_weights))
    variants["gasw kept"] = engine_step(lambda e, l: e.backward(l, weights=ga.GASW(2.0)))
    variants["clip low"] = engine_step(lambda e, l: e.backward(l, weights=clip_weights, memory="low"))
    variants["gasw low"] = engine_step(lambda e, l: e.backward(l, weights=ga.GASW(2.0), memory="low"))
    variants["gaga"] = engine_step(lambda e, l: e.backward(l).grad_sq_sum)

    vmap_model = copy.deepcopy(base)
    vmap_params = dict(vmap_model.named_parameters())
    loss = functools.partial(per_sample_losses, kind)
    def vmap_step():
        gasw_from_materialised(ga.reference_gradients(vmap_model, x, y, loss), vmap_params)
    vmap_step.params = list(vmap_params.values())
    variants["vmap gasw"] = vmap_step

    if importlib.util.find_spec("opacus"):
        from opacus import GradSampleModule
        op_model = GradSampleModule(copy.deepcopy(base), loss_reduction="sum")
        op_params = {n: p for n, p in op_model.named_parameters()}

        def opacus_step():
            op_model.zero_grad(set_to_none=True)
            F.cross_entropy(op_model(x), y, reduction="sum").backward()
            gasw_from_materialised({n: p.grad_sample for n, p in op_params.items()}, op_params)
            for p in op_params.values():
                p.grad_sample = None
        opacus_step.params = list(op_params.values())
        variants["opacus gasw"] = opacus_step

    if kind == "lstm_lm" and importlib.util.find_spec("opacus"):
        variants["opacus dplstm clip"] = opacus_dplstm_clip(base, x, y, device)

    if importlib.util.find_spec("backpack"):
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
        bp_model = extend(copy.deepcopy(base), use_converter=True)
        bp_loss = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
        bp_params = dict(bp_model.named_parameters())

        def backpack_step():
            bp_model.zero_grad(set_to_none=True)
            with backpack(BatchGrad()):
                bp_loss(bp_model(x), y).backward()
            gasw_from_materialised({n: p.grad_batch for n, p in bp_params.items()}, bp_params)
        backpack_step.params = list(bp_params.values())
        variants["backpack gasw"] = backpack_step
    if only is not None:
        return {only: variants[only]}
    if names is not None:
        variants = {n: v for n, v in variants.items() if n in names}
    for name in ("opacus gasw", "opacus dplstm clip", "backpack gasw"):  # optional libraries may not support the model
        try:
            variants.get(name, lambda: None)()
        except Exception as err:  # noqa: BLE001 - report and leave the variant out
            print(f"  {name} left out for {kind}: {type(err).__name__}: {err}", file=sys.stderr)
            variants.pop(name)
    return variants


def measure_memory(kind: str, B: int, name: str, device: torch.device) -> float:
    """Peak extra memory of one variant's steps, in a process that ran nothing else.

    Two steps on a batch of 2 first, so that one-time initialisation (lazy imports, caches)
    is not counted; their own peak is negligible.
    """
    warm = make_variants(kind, 2, device, only=name)[name]
    warm(), warm()
    step = make_variants(kind, B, device, only=name)[name]
    return peak_memory_mb(step, device, lambda: [p.__setattr__("grad", None) for p in step.params])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds, no memory measurement")
    parser.add_argument("--rounds", type=int, default=21, help="timing rounds per variant (median over rounds)")
    parser.add_argument("--batches", type=int, nargs="+", help="default: 32 128 512, the ViTs 64, the ResNet 32")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),  # compare.py's models only when named
                        default=[m for m in MODELS if m not in ("transformer", "gpt2_d256", "transformer_d768")])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", help="only these variants (plain is always timed)")
    parser.add_argument("--interleave", action="store_true",
                        help="time every model's variants together (same B) and compare them to the first model's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measure-memory", nargs=3, metavar=("MODEL", "B", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="backpack|opacus|torch")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        kind, B, name = args.measure_memory
        print(json.dumps(measure_memory(kind, int(B), name, device)))
        return
    if importlib.util.find_spec("transformers") is None and any(m.startswith("gpt2") for m in args.models):
        print("gpt2 skipped: transformers is not installed (pip install -e '.[test]')", file=sys.stderr)
        args.models = [m for m in args.models if not m.startswith("gpt2")]
    rounds = 5 if args.quick else args.rounds
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{rounds} rounds; median ms per step and ratio to plain\n")
    rows = []
    names = None if args.variants is None else ["plain", *args.variants]
    groups = ([[(kind, B)] for kind in args.models for B in args.batches or BATCHES[kind]] if not args.interleave
              else [[(kind, B) for kind in args.models] for B in args.batches or BATCHES[args.models[0]]])
    for group in groups:
        variants = {(kind, B, name): step for kind, B in group
                    for name, step in make_variants(kind, B, device, names=names).items()}
        medians = time_variants(variants, rounds=rounds)
        memory = {}  # {(kind, B, name): peak MB}, each in a fresh process
        if not args.quick and not args.interleave:
            memory = {key: memory_in_subprocess("benchmarks.engine", [str(v) for v in key] + ["--device", args.device])
                      for key in variants}
        for (kind, B, name), seconds in medians.items():
            row = {"model": kind, "B": B, "variant": name, "ms": seconds * 1e3,
                   "x plain": seconds / medians[(kind, B, "plain")]}
            if args.interleave and (group[0][0], B, name) in medians:
                row["x first model"] = seconds / medians[(group[0][0], B, name)]
            if memory:
                row["peak MB"] = memory[(kind, B, name)]
                row["mem x plain"] = memory[(kind, B, name)] / max(memory[(kind, B, "plain")], 1e-3)
            rows.append(row)
        print(f"  done {', '.join(f'{kind} B={B}' for kind, B in group)}", file=sys.stderr)
    columns = (["model", "B", "variant", "ms", "x plain"] + (["x first model"] if args.interleave else [])
               + ([] if args.quick or args.interleave else ["peak MB", "mem x plain"]))
    print_table(rows, columns)


if __name__ == "__main__":
    main()
