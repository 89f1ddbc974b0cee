"""Small-scale reproduction of the ParaDiS paper's three claims, plus super-resolution.

    python bench/reproduce.py            # full: 3 seeds, <= 40 min on 2 cores
    python bench/reproduce.py --quick    # smoke run, <= 3 min (numbers not meaningful)

Classification: MobileNet v1 (small_input) on mnist5k, switches 1x1.0, 2x0.5, 4x0.25 and
0.5+0.25+0.25, each method trained with every seed by the package's own trainer:
- claim 1: each ParaDiS switch vs the same structure trained individually (``--baseline individual``);
- claim 2: ParaDiS vs a universally slimmable network (``--baseline slimmable``) at equal FLOPs per
  image: switch kxw (cost sum w_j^2 of the full network) vs slimmable 1xW with W = sqrt(sum w_j^2);
- claim 3: ParaDiS kxw on k devices vs the slimmable 1xw that fits one such device (same cost per
  device), which is what one device can run when the network cannot be distributed.
Super-resolution: WDSR-A x2 on the bundled photos, PSNR of each switch vs bicubic upscaling and
vs the structure trained individually.

Writes reproduce.md (the tables), reproduce.json (every run's numbers) and reproduce.png to --out.
Jobs run in parallel worker processes (``--workers``, one thread each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paradis_fast.switches import Switch  # noqa: E402
from paradis_fast.train.baselines import equal_cost_width, relative_cost  # noqa: E402

SWITCHES = ["1x1.0", "2x0.5", "4x0.25", "0.5+0.25+0.25"]


@dataclass
class Profile:
    """Sizes of a reproduction run."""

    seeds: list = field(default_factory=lambda: [0, 1, 2])
    dataset: str = "mnist5k"
    data: dict = field(default_factory=dict)  # the dataset's loader arguments
    width_mult: float = 0.25
    epochs: int = 8
    batch_size: int = 64
    sr_seeds: list = field(default_factory=lambda: [0, 1, 2])
    sr_width_mult: float = 0.5
    sr_blocks: int = 4
    sr_epochs: int = 20
    sr_lr: float = 2e-3
    sr_data: dict = field(default_factory=lambda: dict(patch=48, train_patches=512, val_patches=64))


PROFILES = {
    "full": Profile(),
    "quick": Profile(
        seeds=[0, 1],
        epochs=1,
        sr_seeds=[0],
        sr_blocks=1,
        sr_epochs=1,
        sr_data=dict(patch=32, train_patches=128, val_patches=32),
    ),
}


TASKS = ("classification", "super-resolution")


def _jobs(profile: Profile, tasks=TASKS) -> list[dict]:
    """Every training run of the reproduction's ``tasks``, as TrainConfig fields."""
    classify = dict(
        model="mobilenet_v1",
        dataset=profile.dataset,
        switches=SWITCHES,
        width_mult=profile.width_mult,
        epochs=profile.epochs,
        batch_size=profile.batch_size,
        quiet=True,
        dataset_kwargs=profile.data,
    )
    resolve = dict(
        model="wdsr_a",
        dataset="photos",
        switches=SWITCHES,
        width_mult=profile.sr_width_mult,
        epochs=profile.sr_epochs,
        batch_size=16,
        optimizer="adamw",
        lr=profile.sr_lr,
        quiet=True,
        model_kwargs=dict(n_blocks=profile.sr_blocks),
        dataset_kwargs=profile.sr_data,
    )
    jobs = []
    if "classification" in tasks:
        for seed in profile.seeds:
            for method in ("paradis", "individual", "slimmable"):
                jobs.append(dict(classify, seed=seed, baseline=None if method == "paradis" else method))
    if "super-resolution" in tasks:
        for seed in profile.sr_seeds:
            for method in ("paradis", "individual"):
                jobs.append(dict(resolve, seed=seed, baseline=None if method == "paradis" else method))
    return jobs


def _train(fields: dict) -> dict:
    import torch

    from paradis_fast.train import TrainConfig, run
    from paradis_fast.memory import cache_freed_memory

    torch.set_num_threads(1)
    cache_freed_memory()  # as the trainer's CLI does
    start = time.perf_counter()
    result = run(TrainConfig(**fields), log=lambda line: None)
    return {"config": fields, "result": result, "seconds": time.perf_counter() - start}


def _method(config: dict) -> str:
    return config["baseline"] or "paradis"


def _collect(runs: list[dict], model: str) -> dict:
    """{method: {switch: [metric per seed]}} for one model family."""
    table: dict = {}
    for r in runs:
        if r["config"]["model"] != model:
            continue
        for switch, values in r["result"]["switches"].items():
            table.setdefault(_method(r["config"]), {}).setdefault(switch, []).extend(values.values())
    return table


def _stats(values: list[float], scale: float) -> dict:
    values = [v * scale for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _cell(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def _delta(a: dict, b: dict) -> float:
    return a["mean"] - b["mean"]


def _slim(width) -> str:
    return str(Switch([width]))


def analyse(runs: list[dict]) -> dict:
    """The claims' tables as rows of numbers (accuracy in %, PSNR in dB)."""
    acc = {m: {s: _stats(v, 100) for s, v in sw.items()} for m, sw in _collect(runs, "mobilenet_v1").items()}
    claim1, claim2, claim3 = [], [], []
    for name in SWITCHES if acc else ():
        switch = Switch.parse(name)
        paradis = acc["paradis"][name]
        claim1.append(
            dict(
                switch=name,
                paradis=paradis,
                individual=acc["individual"][name],
                delta=_delta(paradis, acc["individual"][name]),
            )
        )
        equal = _slim(equal_cost_width(switch))
        claim2.append(
            dict(
                switch=name,
                flops=float(relative_cost(switch)),
                slimmable_switch=equal,
                paradis=paradis,
                slimmable=acc["slimmable"][equal],
                delta=_delta(paradis, acc["slimmable"][equal]),
            )
        )
        if switch.num_devices > 1:
            one_device = _slim(max(switch.widths))
            claim3.append(
                dict(
                    switch=name,
                    devices=switch.num_devices,
                    per_device=float(max(switch.widths)) ** 2,
                    slimmable_switch=one_device,
                    paradis=paradis,
                    slimmable=acc["slimmable"][one_device],
                    delta=_delta(paradis, acc["slimmable"][one_device]),
                )
            )
    sr_runs = [r for r in runs if r["config"]["model"] == "wdsr_a"]
    psnr = {m: {s: _stats(v, 1) for s, v in sw.items()} for m, sw in _collect(runs, "wdsr_a").items()}
    super_resolution = []
    if sr_runs:
        bicubic = _stats([r["result"]["bicubic_psnr"] for r in sr_runs if _method(r["config"]) == "paradis"], 1)
        for name in SWITCHES:
            paradis = psnr["paradis"][name]
            super_resolution.append(
                dict(
                    switch=name,
                    paradis=paradis,
                    individual=psnr["individual"][name],
                    bicubic=bicubic,
                    vs_bicubic=_delta(paradis, bicubic),
                    vs_individual=_delta(paradis, psnr["individual"][name]),
                )
            )
    return dict(claim1=claim1, claim2=claim2, claim3=claim3, super_resolution=super_resolution)


def markdown(tables: dict, profile: Profile, command: str, minutes: float) -> str:
    lines = [f"Command: `{command}` ({minutes:.1f} min)."]
    if tables["claim1"]:
        lines += [
            f"MobileNet v1 (small_input, width {profile.width_mult}) on {profile.dataset}, {profile.epochs} "
            f"epochs, batch {profile.batch_size}, {len(profile.seeds)} seeds: validation top-1 accuracy in %, "
            "mean ± std over seeds.",
            "",
            "Claim 1: each ParaDiS switch vs its structure trained individually",
            "",
            "| switch | ParaDiS | individual | Δ |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['switch']} | {_cell(r['paradis'])} | {_cell(r['individual'])} | {r['delta']:+.2f} |"
            for r in tables["claim1"]
        ]
        lines += [
            "",
            "Claim 2: ParaDiS vs universally slimmable at equal FLOPs per image",
            "",
            "| switch | FLOPs (x full) | ParaDiS | slimmable | slimmable width | Δ |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['switch']} | {r['flops']:.3f} | {_cell(r['paradis'])} | {_cell(r['slimmable'])} | "
            f"{r['slimmable_switch']} | {r['delta']:+.2f} |"
            for r in tables["claim2"]
        ]
        lines += [
            "",
            "Claim 3: ParaDiS kxw on k devices vs slimmable 1xw on one device (same cost per device)",
            "",
            "| switch | devices | cost per device (x full) | ParaDiS | slimmable 1xw | Δ |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['switch']} | {r['devices']} | {r['per_device']:.4f} | {_cell(r['paradis'])} | "
            f"{_cell(r['slimmable'])} ({r['slimmable_switch']}) | {r['delta']:+.2f} |"
            for r in tables["claim3"]
        ]
    if tables["super_resolution"]:
        lines += [
            "",
            f"Super-resolution: WDSR-A x2 (n_feats {max(8, int(32 * profile.sr_width_mult))}, "
            f"{profile.sr_blocks} blocks) on the bundled photos, {profile.sr_epochs} epochs, "
            f"{len(profile.sr_seeds)} seeds: validation PSNR in dB",
            "",
            "| switch | ParaDiS | individual | bicubic | vs bicubic | vs individual |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['switch']} | {_cell(r['paradis'])} | {_cell(r['individual'])} | {r['bicubic']['mean']:.2f} | "
            f"{r['vs_bicubic']:+.2f} | {r['vs_individual']:+.2f} |"
            for r in tables["super_resolution"]
        ]
    return "\n".join(lines) + "\n"


def plot(tables: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("claim1", "super_resolution") if tables[name]]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, name in zip(axes[0], panels):
        if name == "claim1":
            bars = [
                ("ParaDiS", [r["paradis"] for r in tables["claim1"]]),
                ("individual", [r["individual"] for r in tables["claim1"]]),
                ("slimmable, equal FLOPs", [r["slimmable"] for r in tables["claim2"]]),
            ]
            _bars(ax, SWITCHES, bars, "validation accuracy (%)", "MobileNet v1 on MNIST (5k)")
        else:
            rows = tables["super_resolution"]
            _bars(
                ax,
                SWITCHES,
                [("ParaDiS", [r["paradis"] for r in rows]), ("individual", [r["individual"] for r in rows])],
                "validation PSNR (dB)",
                "WDSR-A x2 on photos",
            )
            ax.axhline(rows[0]["bicubic"]["mean"], color="gray", linestyle="--", label="bicubic")
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _bars(axes, labels, series, ylabel, title):
    width = 0.8 / len(series)
    for i, (name, stats) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        axes.bar(xs, [s["mean"] for s in stats], width, yerr=[s["std"] for s in stats], label=name, capsize=2)
    low = min(s["mean"] - s["std"] for _, stats in series for s in stats)
    high = max(s["mean"] + s["std"] for _, stats in series for s in stats)
    axes.set_ylim(low - 0.1 * (high - low + 1), high + 0.1 * (high - low + 1))
    axes.set_xticks(range(len(labels)), labels)
    axes.set(ylabel=ylabel, title=title)
    axes.legend(fontsize=7)


def reproduce(profile: Profile, out: str, workers: int, command: str, log=print, tasks=TASKS) -> dict:
    start = time.perf_counter()
    jobs = _jobs(profile, tasks)
    log(f"{len(jobs)} training runs on {workers} worker processes")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs = []
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for r in pool.map(_train, jobs):
                runs.append(r)
                log(
                    f"  done {_method(r['config'])} {r['config']['model']} seed {r['config']['seed']} "
                    f"({r['seconds']:.0f} s)"
                )
    else:
        runs = [_train(job) for job in jobs]
    tables = analyse(runs)
    minutes = (time.perf_counter() - start) / 60
    text = markdown(tables, profile, command, minutes)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "reproduce.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "reproduce.json"), "w") as f:
        json.dump(
            {
                "profile": dataclasses.asdict(profile),
                "command": command,
                "minutes": minutes,
                "tables": tables,
                "runs": runs,
            },
            f,
            indent=2,
        )
    plot(tables, os.path.join(out, "reproduce.png"))
    log(text)
    return tables


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (<= 3 min); numbers not meaningful")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, quick: 2)")
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes (default 2)")
    parser.add_argument("--out", default="runs/reproduce", help="folder for reproduce.md/.json/.png")
    parser.add_argument("--only", choices=TASKS, default=None, help="run one task's part (default: both)")
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    if args.seeds is not None:
        profile = dataclasses.replace(profile, seeds=list(range(args.seeds)), sr_seeds=list(range(args.seeds)))
    command = (
        "python bench/reproduce.py"
        + (" --quick" if args.quick else "")
        + (f" --seeds {args.seeds}" if args.seeds is not None else "")
        + (f" --only {args.only}" if args.only else "")
    )
    reproduce(profile, args.out, args.workers, command, tasks=(args.only,) if args.only else TASKS)


if __name__ == "__main__":
    main()
