"""Ending a gloo process group for good in the multi-process tests (dist_scenarios.py, the
Lightning DDP script in lightning_modules.py).

A gloo group still alive when the interpreter exits runs its worker threads into the
interpreter's shutdown. A worker that frees the last collectives there aborts the process with
SIGABRT ("terminate called without an active exception"): their tensors, or the Python context
torch stashes for collectives issued inside a backward (DDP's all-reduces), need the GIL, and a
thread that asks for the GIL during shutdown is ended through a C++ destructor that may not throw.
It happens a few runs in a hundred, when the process exits within milliseconds of its last
collective. `end_process_group` drops the group while the interpreter runs (destroy_process_group
frees it and joins its threads, provided nothing else holds it) and checks that no gloo thread
is left, so that a holder of the group fails every run instead of a few.

The garbage is collected BEFORE destroy_process_group, while torch.distributed still holds the
group: a DDP model collected later may drop the group's last reference from its reducer, whose
destructor joins the gloo threads without releasing the GIL, which a worker freeing a collective
waits for: a deadlock (seen on main as a test_distributed.py run hanging for 20 minutes).
destroy_process_group itself frees the group with the GIL released.

What holds a group: DDP models (collected here: they sit in reference cycles), and
torch.distributed.nn when first imported after init_process_group (its functions take
`group=group.WORLD` as a default argument, evaluated at import; DDP's constructor imports it
through torch._dynamo): import it before init_process_group. gradalign's engines, statistics and
GWA monitors hold a group by weak reference (engine/distributed.WeakGroup), so they never do.
"""
from __future__ import annotations

import gc
import os

import torch.distributed as dist
import torch.distributed.nn  # noqa: F401 - imported before any init_process_group (see above)


def gloo_threads() -> int:
    """The gloo threads of this process (a live gloo group runs two workers and a tcp loop);
    0 where /proc cannot tell."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return 0
    names = []
    for t in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, t, "comm")) as f:
                names.append(f.read())
        except OSError:  # the thread ended meanwhile
            pass
    return sum(n.startswith(("pt_gloo", "gloo")) for n in names)


def end_process_group(where: str, before: int = 0, *, check: bool = True) -> None:
    """Collect garbage, destroy every process group, and raise if a gloo thread outlives it
    (`before`: the gloo threads this process had before the group was created, e.g. in a pytest
    process where an earlier test left a group alive; check=False: no thread check, where
    something outside our control holds the group: after fully_shard, gloo threads outlive it and
    what holds them is not found yet)."""
    gc.collect()
    dist.destroy_process_group()
    left = gloo_threads() - before if check else 0
    if left > 0:
        raise RuntimeError(f"{where}: {left} gloo threads outlived destroy_process_group: something still holds "
                           "the process group (a DDP model, an engine, statistics or a monitor holding it strongly, "
                           "or torch.distributed.nn first imported after init_process_group)")
