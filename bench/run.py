"""Benchmark of paradis_fast against the plain PyTorch ways, for every op and a training step.

    python bench/run.py [--quick] [--out DIR] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--threads N]
                        [--no-compile] [--random N [--seed S]]

For each layer of the suite (bench/suites.py) and each of forward and forward+backward, the median
time of (a) the slimmable-style loop, (b) the best single-call plain alternative (grouped or
block-masked convolution; BatchNorm over the switches stacked as channels), (c) torch.compile of
(a), (d) paradis_fast (the dispatching default backend), and the bound: one dense torch.mm with the
same FLOPs. Then the training step of ParaDiS MobileNet v1 (small_input) and ResNet20, all
switches at once (d) against one forward+backward per switch (a). Methods are timed round-robin in
one run, so the ratios hold under load. The process keeps freed memory for every method alike, as
the trainer's does (--release-freed-memory: glibc's default, which page-faults fresh activations).
With --dtype bf16 or fp16 every method runs under torch.autocast in that dtype (float32 weights, the
BatchNorms' inputs in the low dtype as a convolution under autocast gives them), the bound is the
dense matmul in that dtype, and the training step is also timed in float32 for the step's speed-up.
With --random N, N random conv and N random BN layers (suites.random_conv_layers, each with its own
switch set, named in the table) replace the suite's, so that the speed is measured beyond the suite.
Prints the ratio table and writes results.csv, machine.json and results.png to --out.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import statistics
import sys
import time

# Kineto prints its USDT markers (profiler_start / profiler_stop) and stage lines to stderr at every
# profile (paradis_op_calls); levels 0-5 print some of them, 6 none. Read when the profiler starts; set
# before torch loads so that any first use sees it. A level set by the caller wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helper modules next to this file

import plain  # noqa: E402
import suites  # noqa: E402
import timing  # noqa: E402
from paradis_fast import SwitchSet  # noqa: E402
from paradis_fast import models  # noqa: E402
from paradis_fast.nn import DepthwiseConv2d  # noqa: E402
from paradis_fast.ops import backends, sliced_conv2d, switch_batch_norm, use_backend  # noqa: E402
from paradis_fast.train import InplaceDistillationLoss  # noqa: E402
from paradis_fast import memory  # noqa: E402

SLIMMABLE_LOOP = "slimmable_loop"
FP32_STEP = "d:fp32"  # (d)'s training step in float32, timed beside the --dtype run
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def conv_flops(layer: suites.ConvLayer, switches: SwitchSet) -> int:
    blocks = plain.blocks_by_switch(switches, layer.c_in, layer.c_out)
    macs = sum((o1 - o0) * (i1 - i0) for switch in blocks for i0, i1, o0, o1 in switch)
    return 2 * macs * layer.kernel**2 * layer.batch * layer.out_size**2


NHWC = "@nhwc"  # a method whose name ends so runs on channels_last copies of the inputs


def method_kind(name: str) -> str:
    """The table column of a method: a, b (any b:... variant), c, d or mm, whatever its layout."""
    base = name.split("@")[0]
    return "b" if base.startswith("b:") else base


def layout_inputs(inputs, grad_out):
    """The inputs as given (NCHW), and channels_last copies of x (the first input) and grad_out."""
    x = inputs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return {False: (inputs, grad_out), True: ((x, *inputs[1:]), grad_out.contiguous(memory_format=torch.channels_last))}


def autocast(args):
    """The precision every method runs in: torch.autocast in --dtype, or plain float32."""
    return torch.autocast(args.device, dtype=args.autocast or torch.float32, enabled=args.autocast is not None)


def fwd_and_fwd_bwd(fns, inputs, grad_out, args):
    """Per method: a forward without autograd, and a forward+backward into its inputs."""
    variants = layout_inputs(inputs, grad_out)

    def forward(name, fn):
        inputs = variants[name.endswith(NHWC)][0]

        def run():
            with torch.no_grad(), autocast(args):
                fn(*inputs)

        return run

    def forward_backward(name, fn):
        inputs, grad = variants[name.endswith(NHWC)]

        def run():
            for t in inputs:
                t.grad = None
            with autocast(args):
                y = fn(*inputs)
            y.backward(grad)

        return run

    return (
        {name: forward(name, fn) for name, fn in fns.items()},
        {name: forward_backward(name, fn) for name, fn in fns.items()},
    )


def model_layout(args) -> str:
    """(d) runs in the layout the models run in: channels_last on CPU (Switchable.input_layout)."""
    return NHWC if args.device == "cpu" else ""


def given_layout_method(args, fn) -> dict:
    """(e): (d) on the NCHW inputs as given, as a user calling paradis_fast.ops directly passes them;
    only where (d) runs channels_last (CPU), else (d) is that already."""
    return {"e": fn} if model_layout(args) else {}


def onednn_pointwise_hazard(args) -> bool:
    """On CPUs, oneDNN's weight gradient of channels_last 1x1 convolutions (torch 2.13) segfaults,
    aborts or hangs on some shapes, with AVX2 and with AVX-512 (plain PyTorch reproduces it;
    bench/README.md; paradis_fast avoids it): the plain ways whose backward reaches it are left
    out, and run NCHW only."""
    return args.device == "cpu"


def onednn_breaks_on(layer: suites.ConvLayer, args) -> bool:
    """Whether the channels_last (b) variants of a layer are left out (onednn_pointwise_hazard)."""
    return layer.kernel == 1 and onednn_pointwise_hazard(args)


def conv_methods(layer: suites.ConvLayer, switches: SwitchSet, args):
    blocks = plain.blocks_by_switch(switches, layer.c_in, layer.c_out)
    masks = plain.block_masks(torch.ones(layer.c_out, layer.c_in, device=args.device, dtype=args.dtype), blocks)
    stride, padding = layer.stride, layer.padding
    loop = lambda x, w: plain.loop_conv(x, w, blocks, stride, padding)  # noqa: E731
    b_variants = {"b:masked": lambda x, w: plain.masked_conv(x, w, masks, stride, padding)}
    if all(plain.equal_widths(switch) for switch in blocks):
        b_variants["b:grouped"] = lambda x, w: plain.grouped_conv(x, w, blocks, stride, padding)
    nhwc_variants = {} if onednn_breaks_on(layer, args) else {**b_variants, "b:loop": loop}
    fns = {
        "a": loop,
        **b_variants,
        **{name + NHWC: fn for name, fn in nhwc_variants.items()},
        "d" + model_layout(args): lambda x, w: sliced_conv2d(x, w, None, switches, stride, padding),
    }
    fns.update(given_layout_method(args, fns["d" + model_layout(args)]))
    if args.compile:
        torch._dynamo.reset()  # a fresh cache per layer: the loop's code object is shared by all layers
        fns["c"] = torch.compile(fns["a"], dynamic=False)
    extra = {}
    grouped_mm_applies = layer.kernel == 1 and stride == 1 and all(plain.equal_widths(s) for s in blocks)
    if args.device == "cuda" and grouped_mm_applies and hasattr(torch, "_grouped_mm"):
        extra["b:grouped_mm_bf16"] = lambda x, w: plain.grouped_mm_conv1x1(x.bfloat16(), w.bfloat16(), blocks).float()
    return fns, extra


def runnable(fns, inputs, grad_out, args):
    """The extra methods that run on this machine (torch._grouped_mm needs a recent GPU)."""
    kept = {}
    for name, fn in fns.items():
        try:
            with autocast(args):
                y = fn(*inputs)
            y.backward(grad_out)
            kept[name] = fn
        except RuntimeError as error:
            print(f"  {name} skipped: {str(error).splitlines()[0]}", file=sys.stderr)
    return kept


def bn_methods(layer: suites.BNLayer, switches: SwitchSet, args):
    covered = plain.bn_covered(switches, layer.channels)
    S, C = len(switches), layer.channels
    stats = [
        torch.zeros(S, C, device=args.device, dtype=args.dtype),
        torch.ones(S, C, device=args.device, dtype=args.dtype),
    ]
    loop = lambda x, w, b: plain.loop_bn_relu(x, w, b, *stats, covered)  # noqa: E731
    stacked = lambda x, w, b: plain.stacked_bn_relu(x, w, b, *stats)  # noqa: E731
    fns = {
        "a": loop,
        "b:stacked": stacked,
        "b:stacked" + NHWC: stacked,
        "b:loop" + NHWC: loop,
        "d" + model_layout(args): lambda x, w, b: switch_batch_norm(
            x, w, b, *stats, switches, training=True, activation="relu"
        ),
    }
    fns.update(given_layout_method(args, fns["d" + model_layout(args)]))
    if args.compile:
        torch._dynamo.reset()
        fns["c"] = torch.compile(fns["a"], dynamic=False)
    return fns


def time_layer(kind, name, fns, inputs, grad_out, flops, args, extra=None):
    """Rows of results for one layer: both passes, every method, plus the dense-mm bound."""
    fns = {**fns, **(extra or {})}
    fwd, fwd_bwd = fwd_and_fwd_bwd(fns, inputs, grad_out, args)
    mm_flops = 0
    if flops:
        mm, mm_flops = timing.dense_mm(flops, args.device, args.autocast or args.dtype)
        fwd["mm"] = mm
        fwd_bwd["mm"] = lambda: (mm(), mm(), mm())  # backward = 2 GEMMs of the forward's FLOPs
    rows = []
    for phase, group, work, bound_work in (
        ("fwd", fwd, flops, mm_flops),
        ("fwd+bwd", fwd_bwd, 3 * flops, 3 * mm_flops),
    ):
        medians = timing.interleaved_medians(group, args.device, args.reps)
        for method, seconds in medians.items():
            rows.append(
                dict(
                    kind=kind,
                    name=name,
                    phase=phase,
                    method=method,
                    median_ms=seconds * 1e3,
                    flops=bound_work if method == "mm" else work,
                )
            )
    return rows


def conv_inputs(layer: suites.ConvLayer, switches: SwitchSet, args):
    """x and the weight of a conv layer (requiring grad), and a gradient of its output; seeded per layer."""
    g = torch.Generator(device=args.device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=args.device, dtype=args.dtype)

    x = randn(len(switches) * layer.batch, layer.c_in, layer.size, layer.size).requires_grad_()
    w = randn(layer.c_out, layer.c_in, layer.kernel, layer.kernel).requires_grad_()
    grad_out = randn(x.shape[0], layer.c_out, layer.out_size, layer.out_size)
    return (x, w), grad_out


def own_switches(layer, switches: SwitchSet) -> SwitchSet:
    """The layer's own switch set (a random layer's), else the run's."""
    return SwitchSet(layer.switches) if layer.switches else switches


def run_conv(args, run_switches):
    rows = []
    for layer in args.conv_layers:
        switches = own_switches(layer, run_switches)
        inputs, grad_out = conv_inputs(layer, switches, args)
        fns, extra = conv_methods(layer, switches, args)
        extra = runnable(extra, inputs, grad_out, args)
        started = time.perf_counter()
        rows += time_layer("sliced_conv2d", layer.name, fns, inputs, grad_out, conv_flops(layer, switches), args, extra)
        print(f"  {layer.name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return rows


def bn_inputs(layer: suites.BNLayer, switches: SwitchSet, args):
    """x (as a convolution's output), per-switch weight and bias (requiring grad), and a gradient of the output."""
    S = len(switches)
    x = torch.randn(
        S * layer.batch,
        layer.channels,
        layer.size,
        layer.size,
        device=args.device,
        dtype=args.autocast or args.dtype,  # a convolution's output
        requires_grad=True,
    )
    w = (1 + 0.1 * torch.randn(S, layer.channels, device=args.device, dtype=args.dtype)).requires_grad_()
    b = (0.1 * torch.randn(S, layer.channels, device=args.device, dtype=args.dtype)).requires_grad_()
    return (x, w, b), torch.randn_like(x)


def run_bn(args, run_switches):
    rows = []
    for layer in args.bn_layers:
        switches = own_switches(layer, run_switches)
        inputs, grad_out = bn_inputs(layer, switches, args)
        # memory-bound: no GEMM bound
        rows += time_layer(
            "switch_batch_norm+relu", layer.name, bn_methods(layer, switches, args), inputs, grad_out, 0, args
        )
    return rows


def build_model(name: str, switches: SwitchSet, device: str):
    if name == "mobilenet_v1":
        model = models.mobilenet_v1(num_classes=10, switches=switches, small_input=True)
    else:
        model = models.resnet20(num_classes=10, switches=switches)
    return model.to(device).train()


def paradis_op_calls(model, x, target, criterion, args) -> str:
    """How many of the paradis op calls of one training step ran, forward and backward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with autocast(args):
            loss = criterion(model(x), target)
        loss.backward()
    names = [event.name for event in prof.events()]
    report = [
        f"{op}: {names.count(f'paradis::{op}')} forward, {names.count(f'paradis::{op}_backward')} backward calls"
        for op in ("sliced_conv2d", "switch_batch_norm")
    ]
    depthwise = sum(isinstance(m, DepthwiseConv2d) for m in model.modules())
    if depthwise:
        report.append(
            f"depthwise_conv2d: {names.count('paradis::depthwise_conv2d_backward')}/{depthwise} backward "
            "calls through the op (images of <= 16 pixels, strided layers, low precision on CPU; the rest are "
            "F.conv2d's)"
        )
    return "; ".join(report)


def per_switch_step(model, x, target, switches: SwitchSet, args, backward: bool, channels_last: bool):
    """(a): one forward(+backward) per switch, per-switch loops inside each layer (the SLIMMABLE_LOOP
    backend), NCHW as slimmable implementations run; (b) the same loop channels_last."""
    model.channels_last = channels_last
    with use_backend(SLIMMABLE_LOOP):
        for switch in switches:
            model.set_active([switch])
            with autocast(args):
                loss = F.cross_entropy(model(x)[0], target)
            if backward:
                loss.backward()
    model.set_active(None)
    model.channels_last = None


def paradis_step(model, x, target, criterion, args, backward: bool, low_precision: bool = True):
    """(d): all switches in one forward(+backward), in the model's own layout (channels_last on CPU),
    under --dtype autocast unless low_precision is False."""
    with torch.autocast(args.device, enabled=low_precision and args.autocast is not None, dtype=args.autocast):
        loss = criterion(model(x), target)
    if backward:
        loss.backward()


def run_train(args, switches):
    rows, notes = [], []
    for name in suites.TRAIN_MODELS:
        model = build_model(name, switches, args.device)
        x = torch.randn(suites.TRAIN_BATCH, 3, 32, 32, device=args.device, dtype=args.dtype)
        target = torch.randint(0, 10, (suites.TRAIN_BATCH,), device=args.device)
        criterion = InplaceDistillationLoss(teacher=switches.widest)
        loop = functools.partial(per_switch_step, model, x, target, switches, args)
        paradis = functools.partial(paradis_step, model, x, target, criterion, args)
        groups = {
            phase: {
                "a": functools.partial(loop, backward, False),
                **(
                    {}
                    if backward and onednn_pointwise_hazard(args)
                    else {"b:loop" + NHWC: functools.partial(loop, backward, True)}
                ),
                "d" + model_layout(args): functools.partial(paradis, backward),
                **({FP32_STEP: functools.partial(paradis, backward, False)} if args.autocast else {}),
            }
            for phase, backward in (("fwd", False), ("fwd+bwd", True))
        }
        for phase, group in groups.items():
            model.zero_grad(set_to_none=True)
            medians = timing.interleaved_medians(group, args.device, args.train_reps, warmup=1)
            if FP32_STEP in medians:
                d = min(t for m, t in medians.items() if method_kind(m) == "d")
                notes.append(
                    f"{name} training step {phase}: (d) under {args.dtype_name} autocast {d * 1e3:.1f} ms, in float32 "
                    f"{medians[FP32_STEP] * 1e3:.1f} ms: {medians[FP32_STEP] / d:.2f}x"
                )
            for method, seconds in medians.items():
                rows.append(
                    dict(
                        kind="train step",
                        name=f"{name} b{suites.TRAIN_BATCH}",
                        phase=phase,
                        method=method,
                        median_ms=seconds * 1e3,
                        flops=0,
                    )
                )
        notes.append(
            f"paradis op calls in the {name} training step: {paradis_op_calls(model, x, target, criterion, args)}"
        )
    return rows, notes


def ratio_table(rows):
    """Per (kind, name, phase): the median of each method and d's speedup over a, b (best), c."""
    table = {}
    for r in rows:
        entry = table.setdefault((r["kind"], r["name"], r["phase"]), {"flops": 0})
        method = method_kind(r["method"])
        entry[method] = min(entry.get(method, float("inf")), r["median_ms"])
        if method == "d":
            entry["flops"] = r["flops"]
        if method == "mm":
            entry["mm_flops"] = r["flops"]
    for entry in table.values():
        for m in ("a", "b", "c"):
            for ours in ("d", "e"):
                if m in entry and ours in entry:
                    entry[f"{ours}_vs_{m}"] = entry[m] / entry[ours]
        if entry.get("flops") and "d" in entry:
            entry["gflops"] = entry["flops"] / entry["d"] / 1e6
            if "mm" in entry:
                entry["mm_gflops"] = entry["mm_flops"] / entry["mm"] / 1e6
                entry["frac_mm"] = entry["gflops"] / entry["mm_gflops"]
    return table


def fmt(value, spec):
    width = int(spec.split(".")[0])
    return format(value, spec) if value is not None else "-".rjust(width)


def print_table(table, out=None):
    """The ratio table, to out (None: the sys.stdout of the call, as print has it)."""
    width = max([30, *(len(name) + 1 for _, name, _ in table)])  # random layers' names are long
    header = (
        f"{'op':<24}{'layer':<{width}}{'pass':<9}{'a ms':>9}{'b ms':>9}{'c ms':>9}{'d ms':>9}"
        f"{'d/a':>7}{'d/b':>7}{'d/c':>7}{'GF/s':>7}{'%mm':>6}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for (kind, name, phase), e in table.items():
        print(
            f"{kind:<24}{name:<{width}}{phase:<9}"
            + "".join(fmt(e.get(m), "9.2f") for m in ("a", "b", "c", "d"))
            + "".join(fmt(e.get(f"d_vs_{m}"), "7.2f") for m in ("a", "b", "c"))
            + fmt(e.get("gflops"), "7.0f")
            + fmt(100 * e["frac_mm"] if "frac_mm" in e else None, "6.0f"),
            file=out,
        )


def summary(table):
    """Medians over each suite of the speedups and of the fraction of the dense-GEMM rate, and the worst
    speedup (the minimum), since a median hides the layers where (d) loses."""
    lines = []
    for kind in dict.fromkeys(k for k, _, _ in table):
        for phase in ("fwd", "fwd+bwd"):
            entries = [e for (k, _, p), e in table.items() if k == kind and p == phase]
            parts = []
            for m in ("a", "b", "c"):
                values = [e[f"d_vs_{m}"] for e in entries if f"d_vs_{m}" in e]
                if values:
                    parts.append(f"d vs {m} {statistics.median(values):.2f}x (worst {min(values):.2f}x)")
            fracs = [e["frac_mm"] for e in entries if "frac_mm" in e]
            if fracs:
                parts.append(f"{100 * statistics.median(fracs):.0f}% of dense mm")
            for m in ("a", "b"):
                values = [e[f"e_vs_{m}"] for e in entries if f"e_vs_{m}" in e]
                if values:
                    parts.append(f"e vs {m} {statistics.median(values):.2f}x (worst {min(values):.2f}x)")
            lines.append(f"{kind} {phase} (median of {len(entries)}): " + ", ".join(parts))
    return lines


def headroom(table, baseline="a", target=2.0, kind="sliced_conv2d"):
    """Whether a median target of `target` x over `baseline` is reachable: on how many layers (d)
    would need a higher rate (target times the baseline's) than its best on any layer of the run.
    Where the baseline already runs at 1 / target of the machine's rate, no kernel can be target
    times as fast."""
    lines = []
    for phase in ("fwd", "fwd+bwd"):
        entries = {
            n: e for (k, n, p), e in table.items() if k == kind and p == phase and baseline in e and "gflops" in e
        }
        if not entries:
            continue
        best = max(entries, key=lambda n: entries[n]["gflops"])
        rate = entries[best]["gflops"]
        beyond = sum(target * e["flops"] / e[baseline] / 1e6 > rate for e in entries.values())
        lines.append(
            f"{kind} {phase}: {target:g}x over ({baseline}) needs more than (d)'s best rate of the run "
            f"({rate:.0f} GF/s, {best.strip()}) on {beyond} of {len(entries)} layers "
            f"(a median of {target:g}x needs {len(entries) // 2 + 1} at {target:g}x)"
        )
    return lines


# What each speed-up bar compares (d) paradis_fast with, in the plot's legend.
BASELINES = {
    "a": "(a) a loop over switches and sub-networks, as slimmable code runs",
    "b": "(b) the fastest other plain PyTorch way (grouped or masked conv, stacked BN, loop channels_last)",
    "c": "(c) torch.compile of the loop (a)",
}


def plot(table, path):
    """results.png: per layer and training step (forward+backward), the speed-up of (d) over each
    baseline the run timed, and (d)'s fraction of the dense-matmul rate."""
    from matplotlib.figure import Figure

    keys = [k for k in table if k[2] == "fwd+bwd"]
    labels = [f"{name}" for _, name, _ in keys]
    drawn = [m for m in BASELINES if any(f"d_vs_{m}" in table[k] for k in keys)]
    fig = Figure(figsize=(max(8, 0.6 * len(keys)), 9))
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / max(len(drawn), 1)
    for i, m in enumerate(drawn):
        values = [table[k].get(f"d_vs_{m}", float("nan")) for k in keys]  # nan: no bar where (m) did not run
        offset = (i - (len(drawn) - 1) / 2) * width
        axes[0].bar([j + offset for j in range(len(keys))], values, width, label=f"over {BASELINES[m]}")
    axes[0].axhline(1, color="k", lw=0.8)
    axes[0].set_ylabel("speed-up of (d) paradis_fast (x),\nforward+backward, median time")
    if drawn:  # above the bars, which may reach any height
        axes[0].legend(
            title="speed-up of (d) paradis_fast", fontsize=8, title_fontsize=8, loc="lower left", bbox_to_anchor=(0, 1)
        )
    axes[1].bar(range(len(keys)), [100 * table[k].get("frac_mm", 0) for k in keys], color="tab:green")
    axes[1].axhline(60, color="r", ls="--", lw=0.8, label="60% target")
    axes[1].set_ylabel("(d)'s rate, % of a dense torch.mm\nof the same FLOPs")
    axes[1].set_xlabel("layer (op, shape, input size) or training step, forward+backward")
    axes[1].legend(fontsize=8)
    axes[1].set_xticks(range(len(keys)))
    axes[1].set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="6 conv layers, 2 BN layers, 3 repeats, no torch.compile (33 s on 2 quiet cores; minutes beside other work)",
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", default=None, help="force a paradis backend for (d) (default: automatic choice)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="fp32, or every method under torch.autocast in bf16 / fp16 (float32 weights) (default fp32)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip (c), torch.compile of the loop"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per method (default 5 quick, 9 full)")
    parser.add_argument(
        "--random",
        type=int,
        default=0,
        metavar="N",
        help="N random conv and N random BN layers, each with its own switch set, instead of the suite's",
    )
    parser.add_argument("--seed", type=int, default=0, help="the seed the --random layers are drawn from (default 0)")
    memory.add_release_argument(parser)  # every method alike; kept by default, as the trainer does
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.quick:
        args.compile = False
    args.reps = args.reps or (3 if args.quick else 9)
    args.train_reps = 2 if args.quick else 5
    if args.random:
        args.conv_layers = suites.random_conv_layers(args.random, args.seed)
        args.bn_layers = suites.random_bn_layers(args.random, args.seed)
    else:
        args.conv_layers = suites.QUICK_CONV_LAYERS if args.quick else suites.CONV_LAYERS
        args.bn_layers = suites.QUICK_BN_LAYERS if args.quick else suites.BN_LAYERS
    args.dtype_name, args.autocast = args.dtype, DTYPES[args.dtype]  # what the methods compute in
    args.dtype = torch.float32  # of the inputs and weights
    return args


def precision(args) -> str:
    return f"{args.dtype_name} autocast" if args.autocast else "float32"


def register_slimmable_loop(device: str):
    """The per-switch loops of plain.py as the paradis backend SLIMMABLE_LOOP, unless registered already."""
    if SLIMMABLE_LOOP not in backends.available_backends(device=device):
        backends.register_backend(
            backends.Backend(
                SLIMMABLE_LOOP, ("cpu", "cuda"), backends.OPS, implementation=plain.SlimmableLoop, automatic=False
            )
        )


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    memory.configure(args)
    register_slimmable_loop(args.device)  # the training-step baseline
    switches = SwitchSet(suites.SWITCHES)
    os.makedirs(args.out, exist_ok=True)
    info = timing.machine(args.device)
    info["command"] = " ".join(["python bench/run.py", *sys.argv[1:]])
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    if not args.compile:
        print(
            "(c) torch.compile of the loop: skipped"
            + (" in --quick (compiling every layer takes minutes)" if args.quick else "")
        )
    started = time.perf_counter()
    with use_backend(args.backend):  # (d)'s backend, for its backward passes too (None: automatic choice)
        rows = run_conv(args, switches) + run_bn(args, switches)
        train_rows, notes = run_train(args, switches)
    rows += train_rows
    table = ratio_table(rows)
    switch_note = ", ".join(suites.SWITCHES) + (" (training step; each random layer its own)" if args.random else "")
    print(
        f"\nmedian times (ms) and speedups of (d) paradis_fast over (a) loop, (b) best single-call plain way, "
        f"(c) torch.compile(a); switches {switch_note}; {precision(args)}; (a) NCHW, (b) best of NCHW "
        f"and channels_last, (d) {'channels_last' if model_layout(args) else 'NCHW'} as the models run"
        + (", (e) = (d) on the NCHW inputs as given\n" if model_layout(args) else "\n")
    )
    print_table(table)
    lines = summary(table) + headroom(table, "a", 2.0) + headroom(table, "b", 1.5)
    lines += notes
    print("\n" + "\n".join(lines))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    info["summary"] = lines
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "machine.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        print_table(table, f)
        print("\n" + "\n".join(lines), file=f)
    plot(table, os.path.join(args.out, "results.png"))
    print(f"wrote {args.out}/results.csv, table.txt, machine.json, results.png")


if __name__ == "__main__":
    main()
