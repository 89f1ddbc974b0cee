"""Model memory of each serving process: its part's file (``serve --parts``) against the checkpoint.

MobileNet v1 at 224 px (width 1.0, 1000 classes: the paper's network), switches 2x0.5 and 4x0.25.
For every rank a fresh process loads what ``python -m paradis_fast.deploy.serve`` loads there,
with the server's malloc setting (freed memory kept, unless ``--release-freed-memory``): with
``--parts`` its part's file, rank 0 also the fusion's; with ``--checkpoint`` the whole checkpoint,
then the switch's `split` (the same on every rank). Reported per process: the bytes of the
parameters and buffers it holds (distinct storages) and the growth of its resident set while
loading (/proc/self/statm, after imports), each against the part's share of the weights (the
bytes of its parameters, `Split.stats`). The growth is measured after the process has loaded a
one-tensor file, and again without that ("cold": it then includes what torch's first `torch.load`
in a process sets up, ~1 MB, whatever the file). Issue 21's target: a rank's model memory <= 1.2x
its part's share.

    python bench/part_memory.py [--switches 2x0.5,4x0.25] [--release-freed-memory]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import tempfile

import torch

from paradis_fast import memory
from paradis_fast.deploy import load_checkpoint, save_checkpoint, split
from paradis_fast.deploy.parts import PartsDir, export_parts
from paradis_fast.models import mobilenet_v1

SWITCHES = ("1x1.0", "2x0.5", "4x0.25")
KWARGS = dict(num_classes=1000, width_mult=1.0, small_input=False)
SHAPE = (3, 224, 224)
TARGET = 1.2


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensor_bytes(modules) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers."""
    storages = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _load(source: str, path: str, switch: str, rank: int) -> list[torch.nn.Module]:
    """What the server's rank `rank` holds for its model."""
    if source == "parts":
        parts = PartsDir(path)
        return [parts.part(switch, rank), *([parts.fusion(switch)] if rank == 0 else [])]
    model, _ = load_checkpoint(path)
    return [model, split(model, switch)]


def measure(source: str, path: str, switch: str, rank: int, release: bool, warm: str | None) -> tuple[int, int]:
    """In a fresh process: (tensor bytes held, resident set growth) of loading rank `rank`'s model,
    after loading the file `warm` if given."""
    torch.set_num_threads(1)
    if not release:
        memory.cache_freed_memory()
    if warm is not None:
        torch.load(warm, weights_only=True)
    gc.collect()
    before = _resident()
    held = _load(source, path, switch, rank)
    gc.collect()
    return _tensor_bytes(held), _resident() - before


def _in_fresh_process(*args) -> tuple[int, int]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--switches", default="2x0.5,4x0.25")
    memory.add_release_argument(p)
    args = p.parse_args(argv)
    switches = args.switches.split(",")
    torch.manual_seed(0)
    model = mobilenet_v1(switches=SWITCHES, **KWARGS).eval()
    full = _tensor_bytes([model])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, parts, warm = (os.path.join(tmp, name) for name in ("model.pt", "parts", "warm.pt"))
        save_checkpoint(checkpoint, model, "mobilenet_v1", KWARGS, input_shape=SHAPE)
        export_parts(model, switches, SHAPE, parts, "mobilenet_v1", KWARGS)
        torch.save(torch.zeros(1), warm)
        shares = {s: [p.param_bytes for p in split(model, s).stats(SHAPE)] for s in switches}
        del model
        rows = []
        for switch in switches:
            old = _in_fresh_process("checkpoint", checkpoint, switch, 0, args.release_freed_memory, warm)
            for rank, share in enumerate(shares[switch]):
                held, grown = _in_fresh_process("parts", parts, switch, rank, args.release_freed_memory, warm)
                _, cold = _in_fresh_process("parts", parts, switch, rank, args.release_freed_memory, None)
                rows.append((switch, rank, share, held, grown, cold, *old))
    print(
        f"MobileNet v1 {SHAPE[1]} px, width 1.0, 1000 classes: full ParaDiS model {_mb(full)} MB (parameters, buffers)"
    )
    print("MB; x: / the part's share of the weights (its parameters' bytes)")
    header = (
        "| switch | rank | part's share | --parts: held | x | RSS growth | x | cold RSS growth | x "
        "| --checkpoint: held | RSS growth |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    met = True
    for switch, rank, share, held, grown, cold, old_held, old_grown in rows:
        met &= max(held, grown) <= TARGET * share
        cells = [switch, rank, _mb(share), _mb(held), f"{held / share:.2f}", _mb(grown), f"{grown / share:.2f}"]
        cells += [_mb(cold), f"{cold / share:.2f}", _mb(old_held), _mb(old_grown)]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"target, held and RSS growth <= {TARGET}x the part's share: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
