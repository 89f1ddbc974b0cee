"""Small-scale reproduction of the ParaDiS paper's three claims, plus super-resolution.

    python bench/reproduce.py            # full: 3 seeds, <= 40 min on 2 cores
    python bench/reproduce.py --quick    # smoke run, <= 3 min (numbers not meaningful)
    python bench/reproduce.py --dataset imagefolder:/data/imagenet --image-size 224   # classification only
    python bench/reproduce.py --dataset imagefolder:/data/imagenet --image-size 224 --sr-dataset srfolder:/data/DIV2K

Classification: MobileNet v1 (small_input) on mnist5k, or --model on --dataset (any dataset the
trainer reads: cifar10:PATH, imagefolder:PATH at --image-size), switches 1x1.0, 2x0.5, 4x0.25 and
0.5+0.25+0.25, each method trained with every seed by the package's own trainer:
- claim 1: each ParaDiS switch vs the same structure trained individually (``--baseline individual``);
- claim 2: ParaDiS vs two width baselines at equal FLOPs per image: switch kxw (cost sum w_j^2 of
  the full network) vs 1xW with W = sqrt(sum w_j^2) (on a 1/32 grid) of a slimmable network
  (``--baseline slimmable``: private BatchNorm per width, trained at exactly the widths compared) and
  of a universally slimmable network (US-Net, ``--baseline universally-slimmable``: widths drawn from
  [0.25, 1] on the 1/32 grid, BatchNorm affine shared by all widths, each evaluated width's statistics
  calibrated on training batches);
- claim 3: ParaDiS kxw on k devices vs the 1xw that fits one such device (same cost per device),
  which is what one device can run when the network cannot be distributed, of the same slimmable
  network and US-Net.
Super-resolution: WDSR-A x2 on the bundled photos (or --sr-dataset srfolder:PATH, patches of
--sr-image-size HR pixels), PSNR of each switch vs bicubic upscaling and vs the structure trained
individually. --dataset without --sr-dataset runs the classification part only: the bundled photos
say nothing about the data given (--only super-resolution still runs them).

Writes reproduce.md (the tables), reproduce.json (every run's numbers) and reproduce.png to --out.
Jobs run in parallel worker processes (``--workers``, one thread each), each reading its data with
``--data-workers`` DataLoader processes (the trainer's ``--workers``). Every dataset is loaded once
before training, so a bad folder or option fails at once, in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paradis_fast.errors import reported_as_one_line  # noqa: E402
from paradis_fast.switches import Switch  # noqa: E402
from paradis_fast.train.baselines import equal_cost_width, relative_cost  # noqa: E402
from paradis_fast.train.experiment import SUPER_RESOLUTION  # noqa: E402

SWITCHES = ["1x1.0", "2x0.5", "4x0.25", "0.5+0.25+0.25"]
CLASSIFICATION_METHODS = ("paradis", "individual", "slimmable", "universally-slimmable")
SUPER_RESOLUTION_METHODS = ("paradis", "individual")
# Claims 2 and 3 compare each ParaDiS switch with these baselines' one-device widths 1xW (both
# evaluate every width the claims need: `slimmable_switches`, `UniversalWidths.evaluated`)
WIDTH_BASELINES = ("slimmable", "universally-slimmable")
LABELS = {"paradis": "ParaDiS", "universally-slimmable": "US-Net"}  # the others by their own name
CLASSIFIERS = {"mobilenet_v1": "MobileNet v1", "resnet20": "ResNet-20", "resnet50": "ResNet-50"}


@dataclass
class Profile:
    """Sizes of a reproduction run."""

    seeds: list = field(default_factory=lambda: [0, 1, 2])
    model: str = "mobilenet_v1"
    dataset: str = "mnist5k"
    data: dict = field(default_factory=dict)  # the dataset's loader arguments
    image_size: int | None = None  # image folders' side (None: the loader's default)
    data_workers: int = 0  # DataLoader processes of each run (TrainConfig.workers)
    width_mult: float = 0.25
    epochs: int = 8
    batch_size: int = 64
    sr_seeds: list = field(default_factory=lambda: [0, 1, 2])
    sr_dataset: str = "photos"
    sr_image_size: int | None = None  # srfolder's HR patch side (None: its default)
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
        model=profile.model,
        dataset=profile.dataset,
        image_size=profile.image_size,
        workers=profile.data_workers,
        switches=SWITCHES,
        width_mult=profile.width_mult,
        epochs=profile.epochs,
        batch_size=profile.batch_size,
        quiet=True,
        dataset_kwargs=profile.data,
    )
    resolve = dict(
        model="wdsr_a",
        dataset=profile.sr_dataset,
        image_size=profile.sr_image_size,
        workers=profile.data_workers,
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
            for method in CLASSIFICATION_METHODS:
                jobs.append(dict(classify, seed=seed, baseline=None if method == "paradis" else method))
    if "super-resolution" in tasks:
        for seed in profile.sr_seeds:
            for method in SUPER_RESOLUTION_METHODS:
                jobs.append(dict(resolve, seed=seed, baseline=None if method == "paradis" else method))
    return jobs


def _model_inputs(jobs: list[dict]) -> dict[str, dict]:
    """Each model's builder arguments for its data, from loading each dataset once before any training:
    a missing folder, a folder without images or an option the dataset does not take fails here."""
    from paradis_fast.train import TrainConfig
    from paradis_fast.train.datasets import load
    from paradis_fast.train.experiment import dataset_arguments, model_spec

    inputs = {}
    for job in jobs:
        if job["model"] not in inputs:
            config = TrainConfig(**job)
            inputs[job["model"]] = model_spec(config, load(config.dataset, **dataset_arguments(job)))[1]
    return inputs


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


def _task(config: dict) -> str:
    return "super-resolution" if config["model"] in SUPER_RESOLUTION else "classification"


def _collect(runs: list[dict], task: str) -> dict:
    """{method: {switch: [metric per seed]}} for one task."""
    table: dict = {}
    for r in runs:
        if _task(r["config"]) != task:
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


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _versus_widths(acc: dict, paradis: dict, width: str) -> dict:
    """Each of the `WIDTH_BASELINES` at its one-device width ``width`` (e.g. ``1x0.5``), and ParaDiS's
    lead over it in points (``delta``, by method)."""
    row = {"slimmable_switch": width}
    for method in WIDTH_BASELINES:
        if width not in acc[method]:
            raise ValueError(f"{method} did not evaluate {width}; it evaluated {', '.join(acc[method])}")
        row[method] = acc[method][width]
    row["delta"] = {method: _delta(paradis, row[method]) for method in WIDTH_BASELINES}
    return row


def analyse(runs: list[dict]) -> dict:
    """The claims' tables as rows of numbers (accuracy in %, PSNR in dB)."""
    acc = {m: {s: _stats(v, 100) for s, v in sw.items()} for m, sw in _collect(runs, "classification").items()}
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
                paradis=paradis,
                **_versus_widths(acc, paradis, equal),
            )
        )
        if switch.num_devices > 1:
            claim3.append(
                dict(
                    switch=name,
                    devices=switch.num_devices,
                    per_device=float(max(switch.widths)) ** 2,
                    paradis=paradis,
                    **_versus_widths(acc, paradis, _slim(max(switch.widths))),
                )
            )
    sr_runs = [r for r in runs if _task(r["config"]) == "super-resolution"]
    psnr = {m: {s: _stats(v, 1) for s, v in sw.items()} for m, sw in _collect(runs, "super-resolution").items()}
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
    seconds: dict = {}
    for r in runs:
        seconds.setdefault(_task(r["config"]), {}).setdefault(_method(r["config"]), []).append(r["seconds"])
    seconds = {task: {m: _stats(v, 1) for m, v in methods.items()} for task, methods in seconds.items()}
    return dict(claim1=claim1, claim2=claim2, claim3=claim3, super_resolution=super_resolution, seconds=seconds)


def _timing(seconds: dict, epochs: int) -> list[str]:
    """Each method's wall time per run, from which a larger dataset's epoch can be scaled."""
    cells = ", ".join(f"{_label(m)} {_cell(s)}" for m, s in seconds.items())
    us_net = (
        " US-Net calibrates every evaluated width's BatchNorm each epoch;" if "universally-slimmable" in seconds else ""
    )
    return [
        "",
        f"Seconds per run ({epochs} epochs with data loading and validation, one thread each; individual "
        f"trains its {len(SWITCHES)} structures one after another;{us_net} mean ± std over seeds): {cells}.",
    ]


def _width_table(title: str, columns: list[str], rows: list[dict], cells) -> list[str]:
    """Claim 2 or 3 as markdown: ``columns`` and ``cells(row)`` (the switch's own), then the width
    the `WIDTH_BASELINES` are evaluated at, ParaDiS's and each baseline's accuracy there, and
    ParaDiS's lead over each baseline."""
    header = [*columns, "width", "ParaDiS", *map(_label, WIDTH_BASELINES)]
    header += [f"Δ {_label(m)}" for m in WIDTH_BASELINES]
    lines = ["", title, "", _markdown_row(header), "|" + "---|" * len(header)]
    for r in rows:
        accuracies = [_cell(r["paradis"]), *(_cell(r[m]) for m in WIDTH_BASELINES)]
        deltas = [f"{r['delta'][m]:+.2f}" for m in WIDTH_BASELINES]
        lines.append(_markdown_row([*cells(r), r["slimmable_switch"], *accuracies, *deltas]))
    return lines


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(tables: dict, profile: Profile, command: str, minutes: float, inputs: dict) -> str:
    """The tables; ``inputs`` holds each model's builder arguments (`_model_inputs`)."""
    lines = [f"Command: `{command}` ({minutes:.1f} min)."]
    if tables["claim1"]:
        small = "small_input, " if inputs[profile.model].get("small_input") else ""
        size = f" at {profile.image_size} px" if profile.image_size else ""
        lines += [
            f"{CLASSIFIERS[profile.model]} ({small}width {profile.width_mult}) on {profile.dataset}{size}, "
            f"{profile.epochs} epochs, batch {profile.batch_size}, {len(profile.seeds)} seeds: validation top-1 "
            "accuracy in %, mean ± std over seeds.",
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
        baselines = " and ".join(_label(m) for m in WIDTH_BASELINES)
        lines += _width_table(
            f"Claim 2: ParaDiS kxw vs {baselines} 1xW at equal FLOPs per image, W = sqrt(sum w_j^2)",
            ["switch", "FLOPs (x full)"],
            tables["claim2"],
            lambda r: [r["switch"], f"{r['flops']:.3f}"],
        )
        lines += _width_table(
            f"Claim 3: ParaDiS kxw on k devices vs {baselines} 1xw on one device (same cost per device)",
            ["switch", "devices", "cost per device (x full)"],
            tables["claim3"],
            lambda r: [r["switch"], str(r["devices"]), f"{r['per_device']:.4f}"],
        )
        lines += _timing(tables["seconds"]["classification"], profile.epochs)
    if tables["super_resolution"]:
        data = "the bundled photos" if profile.sr_dataset == "photos" else profile.sr_dataset
        lines += [
            "",
            f"Super-resolution: WDSR-A x2 (n_feats {max(8, int(32 * profile.sr_width_mult))}, "
            f"{profile.sr_blocks} blocks) on {data}, {profile.sr_epochs} epochs, "
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
        lines += _timing(tables["seconds"]["super-resolution"], profile.sr_epochs)
    return "\n".join(lines) + "\n"


def plot(tables: dict, profile: Profile, path: str) -> None:
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
                *((f"{_label(m)}, equal FLOPs", [r[m] for r in tables["claim2"]]) for m in WIDTH_BASELINES),
            ]
            title = f"{CLASSIFIERS[profile.model]} on {profile.dataset}"
            _bars(ax, SWITCHES, bars, "validation accuracy (%)", title)
        else:
            rows = tables["super_resolution"]
            _bars(
                ax,
                SWITCHES,
                [("ParaDiS", [r["paradis"] for r in rows]), ("individual", [r["individual"] for r in rows])],
                "validation PSNR (dB)",
                f"WDSR-A x2 on {profile.sr_dataset}",
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
    inputs = _model_inputs(jobs)
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
    text = markdown(tables, profile, command, minutes, inputs)
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
    plot(tables, profile, os.path.join(out, "reproduce.png"))
    log(text)
    return tables


# Profile fields that a flag of the same name replaces when given
OVERRIDES = ("model", "dataset", "image_size", "data_workers", "epochs", "batch_size", "sr_dataset", "sr_image_size")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (<= 3 min); numbers not meaningful")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, quick: 2)")
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes (default 2)")
    parser.add_argument("--out", default="runs/reproduce", help="folder for reproduce.md/.json/.png")
    parser.add_argument("--only", choices=TASKS, default=None, help="run one task's part (default: both)")
    parser.add_argument("--model", choices=list(CLASSIFIERS), help="classifier (default mobilenet_v1)")
    parser.add_argument(
        "--dataset",
        help="classification data, e.g. imagefolder:PATH or cifar10:PATH (default mnist5k); "
        "without --sr-dataset only the classification part runs",
    )
    parser.add_argument("--image-size", type=int, help="image folders' side in pixels (default 224)")
    parser.add_argument("--epochs", type=int, help="classification epochs (default 8, quick: 1)")
    parser.add_argument("--batch-size", type=int, help="classification batch (default 64)")
    parser.add_argument(
        "--data-workers", type=int, help="DataLoader processes per training run (the trainer's --workers; default 0)"
    )
    parser.add_argument("--sr-dataset", help="super-resolution data, srfolder:PATH (default: the bundled photos)")
    parser.add_argument("--sr-image-size", type=int, help="srfolder's HR training patch in pixels (default 96)")
    return parser


def settings(argv: list[str]) -> tuple[argparse.Namespace, Profile, tuple[str, ...]]:
    """The flags, profile and tasks that the command line ``argv`` asks for."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.sr_image_size is not None and args.sr_dataset is None:
        parser.error("--sr-image-size is the patch of --sr-dataset srfolder:PATH; give --sr-dataset")
    given = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    if args.seeds is not None:
        given.update(seeds=list(range(args.seeds)), sr_seeds=list(range(args.seeds)))
    if args.sr_dataset is not None:
        given.update(sr_data={})  # the photos' patch counts; a folder gives one patch per photo and epoch
    profile = dataclasses.replace(PROFILES["quick" if args.quick else "full"], **given)
    if args.only:
        return args, profile, (args.only,)
    return args, profile, ("classification",) if args.dataset and not args.sr_dataset else TASKS


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, profile, tasks = settings(argv)
    with reported_as_one_line("reproduce.py"):
        reproduce(profile, args.out, args.workers, shlex.join(["python", "bench/reproduce.py", *argv]), tasks=tasks)


if __name__ == "__main__":
    main()
