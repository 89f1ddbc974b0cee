"""What a training run leaves in its output folder: metrics.json, history.csv, one plot per switch."""

from __future__ import annotations

import csv
import json
import os
import re


def metrics(scores: dict[str, float], metric: str, **extra) -> dict:
    """``{"switches": {switch: {metric: value}}, **extra}``."""
    return {"switches": {switch: {metric: value} for switch, value in scores.items()}, **extra}


def write_metrics(out: str, data: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(data, f, indent=2)


def write_history(out: str, history: list[dict], metric: str) -> None:
    """One CSV row per epoch: epoch, loss, images/s, lr, then ``<metric>:<switch>`` per switch."""
    if not history:
        return
    switches = list(history[0]["switches"])
    with open(os.path.join(out, "history.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "loss", "images_per_s", "lr", *(f"{metric}:{s}" for s in switches)])
        for row in history:
            writer.writerow(
                [row["epoch"], row["loss"], row["images_per_s"], row["lr"], *(row["switches"][s] for s in switches)]
            )


def file_name(switch: str) -> str:
    """A switch spelling made safe for a file name ('3x1/3' -> '3x1_3')."""
    return re.sub(r"[^0-9A-Za-z.+x-]", "_", switch)


def history_figure(history: list[dict], switch: str, metric: str):
    """A matplotlib Figure of one switch's validation metric over epochs, built without pyplot (no global
    backend or figure state of the caller changes). Each epoch is a marked point on an integer epoch
    axis; a 1-epoch run shows its one point with its value beside it."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    values = [row["switches"][switch] for row in history]
    figure = Figure(figsize=(4, 3))
    axes = figure.add_subplot()
    axes.plot(epochs, values, marker="o")
    if len(epochs) == 1:
        axes.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        axes.set_xticks(epochs)
        axes.annotate(f"{values[0]:.4g}", (epochs[0], values[0]), xytext=(6, 6), textcoords="offset points")
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"switch {switch}")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_history(out: str, history: list[dict], metric: str) -> list[str]:
    """``plots/<switch>.png``: the switch's validation metric over epochs (history_figure). Returns the paths."""
    folder = os.path.join(out, "plots")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for switch in history[0]["switches"] if history else []:
        path = os.path.join(folder, f"{file_name(switch)}.png")
        history_figure(history, switch, metric).savefig(path, dpi=80)
        paths.append(path)
    return paths
