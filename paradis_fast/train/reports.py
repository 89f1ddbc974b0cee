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


def plot_history(out: str, history: list[dict], metric: str) -> list[str]:
    """``plots/<switch>.png``: the switch's validation metric over epochs. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = os.path.join(out, "plots")
    os.makedirs(folder, exist_ok=True)
    paths = []
    epochs = [row["epoch"] for row in history]
    for switch in history[0]["switches"] if history else []:
        figure, axes = plt.subplots(figsize=(4, 3))
        axes.plot(epochs, [row["switches"][switch] for row in history], marker="o")
        axes.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"switch {switch}")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        path = os.path.join(folder, f"{file_name(switch)}.png")
        figure.savefig(path, dpi=80)
        plt.close(figure)
        paths.append(path)
    return paths
