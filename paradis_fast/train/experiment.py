"""One training run from its settings: data, model, loss, optimizer, DDP, checkpoints and reports.

`run(TrainConfig(...))` is what ``python -m paradis_fast train`` and ``bench/reproduce.py`` call.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ..errors import UserError
from ..models._common import scaled
from ..switches import SwitchSet
from . import baselines, datasets, distributed, reports
from .calibrate import calibrate_batch_norm
from .checkpoint import build_model, checkpoint_fields, save
from .loss import InplaceDistillationLoss, SuperResolutionLoss
from .precision import Precision, default_precision
from .trainer import Trainer, make_optimizer, psnr, warmup_cosine

CLASSIFIERS = ("mobilenet_v1", "resnet20", "resnet50")
SUPER_RESOLUTION = ("wdsr_a", "wdsr_b")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Settings of one run; the CLI's flags map onto these fields one to one."""

    model: str = "mobilenet_v1"
    switches: list = field(default_factory=lambda: ["1x1.0", "2x0.5", "4x0.25"])
    dataset: str = "digits"
    width_mult: float = 0.75  # narrower networks miss 0.90 on 4x0.25 in 4 epochs on digits (bench/README.md)
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # None: `default_lr`
    warmup: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    distill_weight: float | None = None  # None: 1 for classifiers, 0 for super-resolution (see loss.py)
    temperature: float = 1.0
    seed: int = 0
    out: str | None = None
    resume: bool = False
    baseline: str | None = None
    slimmable_widths: list | None = None
    quiet: bool = False
    precision: str | None = None  # fp32, bf16 or fp16; None: bf16 where the device computes it fast
    model_kwargs: dict = field(default_factory=dict)  # extra builder arguments, e.g. {"n_blocks": 4}
    dataset_kwargs: dict = field(default_factory=dict)  # extra loader arguments, e.g. {"patch": 32}
    image_size: int | None = None  # image folders' side (None: the loader's default); others take none
    scale: int | None = None  # super-resolution factor (None: the loader's default, 2)
    workers: int = 0  # DataLoader worker processes; 0 reads the data in the training process


def dataset_arguments(config: dict) -> dict:
    """`datasets.load`'s keyword arguments for a run's config (as a dict, also a checkpoint's):
    ``dataset_kwargs`` plus ``image_size`` and ``scale`` where given."""
    given = {name: config.get(name) for name in ("image_size", "scale") if config.get(name) is not None}
    return {**config.get("dataset_kwargs", {}), **given}


def _input_shape(split: datasets.Split) -> torch.Size:
    """One training input's shape, read without advancing the global generator that random crops
    draw from: a resumed run must draw what an uninterrupted one does."""
    with torch.random.fork_rng(devices=[]):
        return split.train[0][0].shape


def model_spec(config: TrainConfig, split: datasets.Split) -> tuple[str, dict]:
    """Builder name and keyword arguments (without switches) for the data at hand."""
    name = config.model
    if name in SUPER_RESOLUTION:
        if split.task != "super_resolution":
            raise UserError(f"{name} is a super-resolution model; dataset {config.dataset!r} is for classification")
        n_feats = scaled(32, config.width_mult)
        kwargs = dict(scale=split.scale, n_feats=n_feats, block_feats=4 * n_feats, in_channels=split.in_channels)
    elif name in CLASSIFIERS:
        if split.task != "classification":
            raise UserError(f"{name} is a classifier; dataset {config.dataset!r} is for {split.task.replace('_', '-')}")
        size = _input_shape(split)[-1]
        kwargs = dict(
            num_classes=split.num_classes, width_mult=config.width_mult, in_channels=split.in_channels, input_size=size
        )
        if name != "resnet20":
            kwargs["small_input"] = size < 64
    else:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(CLASSIFIERS + SUPER_RESOLUTION)}")
    return name, {**kwargs, **config.model_kwargs}


def trained_switches(config: TrainConfig) -> list[str]:
    """The model's switch set: the given switches, or the slimmable baselines' ``1xW`` widths."""
    if config.baseline == "universally-slimmable":
        return [str(s) for s in baselines.UniversalWidths(config.switches, config.slimmable_widths).switches]
    if config.baseline != "slimmable":
        return [str(s) for s in SwitchSet(config.switches)]
    if config.slimmable_widths:
        return [f"1x{w}" for w in config.slimmable_widths]
    return [str(s) for s in baselines.slimmable_switches(config.switches)]


def val_loader(dataset, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of 256, or of ``dataset.eval_batch_size`` (1 for whole images of different sizes)."""
    batch_size = getattr(dataset, "eval_batch_size", 256)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)


def _loaders(split: datasets.Split, config: TrainConfig, context: distributed.Context, generator: torch.Generator):
    per_rank = distributed.per_rank_batch(config.batch_size, context)
    if per_rank > len(split.train):
        raise UserError(f"batch size {config.batch_size} exceeds the {len(split.train)} training examples")
    if config.workers < 0:
        raise UserError(f"--workers {config.workers}: give 0 (read in the training process) or more")
    # workers are started afresh each epoch, seeded from `generator`, so a resumed run draws the same crops
    options = dict(num_workers=config.workers, pin_memory=context.device.type == "cuda")
    if context.distributed:
        sampler = DistributedSampler(
            split.train, context.world_size, context.rank, shuffle=True, seed=config.seed, drop_last=True
        )
        train = DataLoader(split.train, batch_size=per_rank, sampler=sampler, drop_last=True, **options)
    else:
        train = DataLoader(
            split.train, batch_size=per_rank, shuffle=True, drop_last=True, generator=generator, **options
        )
    return train, val_loader(split.val, **options)


CALIBRATION_BATCHES = 20


def _calibration(split: datasets.Split, config: TrainConfig, context: distributed.Context) -> Callable:
    """BatchNorm calibration of the active switches on `CALIBRATION_BATCHES` training batches, the
    same ones each time (a fresh generator), so a resumed run calibrates as an uninterrupted one."""
    batch_size = distributed.per_rank_batch(config.batch_size, context)

    def calibrate(model: torch.nn.Module) -> int:
        generator = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(split.train, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
        return calibrate_batch_norm(model, loader, CALIBRATION_BATCHES, context.device)

    return calibrate


def default_lr(optimizer: str, batch_size: int) -> float:
    """SGD: 0.05 per 32 images, scaled linearly with the batch (Goyal et al. 2017); AdamW: 1e-3."""
    return 1e-3 if optimizer == "adamw" else 0.05 * batch_size / 32


def _criterion(config: TrainConfig, task: str):
    if task == "super_resolution":
        return SuperResolutionLoss(distill_weight=config.distill_weight or 0.0)
    weight = 1.0 if config.distill_weight is None else config.distill_weight
    return InplaceDistillationLoss(
        distill_weight=weight, temperature=config.temperature, label_smoothing=config.label_smoothing
    )


def bicubic_psnr(split: datasets.Split) -> float:
    """Validation PSNR of plain bicubic upscaling, the floor for super-resolution."""
    if isinstance(split.val, TensorDataset):
        lr, hr = split.val.tensors
        return psnr(datasets.upscale(lr, split.scale), hr, shave=split.scale).mean().item()
    scores = [psnr(datasets.upscale(lr[None], split.scale), hr[None], shave=split.scale) for lr, hr in split.val]
    return torch.cat(scores).mean().item()  # image by image: whole images differ in size


def _silent(*_):
    pass


def _print(line: str) -> None:
    print(line, flush=True)  # each epoch's line shows at once, also when the output goes to a file


def build(config: TrainConfig, context: distributed.Context = distributed.Context(), log=_print):
    """The data, model and trainer of a run (resumed from ``config.out`` when ``config.resume``)."""
    torch.manual_seed(config.seed)
    split = datasets.load(config.dataset, seed=config.seed, **dataset_arguments(dataclasses.asdict(config)))
    name, kwargs = model_spec(config, split)
    switches = trained_switches(config)
    model = build_model(name, switches, kwargs).to(context.device)
    chooser, evaluated, calibrate = None, None, None
    if config.baseline == "slimmable":
        chooser = baselines.Sandwich(model.switches)
    elif config.baseline == "universally-slimmable":
        widths = baselines.UniversalWidths(config.switches, config.slimmable_widths)
        chooser, evaluated = baselines.Sandwich(widths.sampled), widths.evaluated
        if baselines.share_batch_norm_affine(model):  # WDSR has no BatchNorm: nothing to calibrate
            calibrate = _calibration(split, config, context)
    generator = torch.Generator().manual_seed(config.seed)
    train, val = _loaders(split, config, context, generator)
    lr = config.lr if config.lr is not None else default_lr(config.optimizer, config.batch_size)
    optimizer = make_optimizer(config.optimizer, model, lr, config.weight_decay)
    total = config.epochs * len(train)
    scheduler = warmup_cosine(optimizer, total, max(1, int(config.warmup * total)))
    trainer = Trainer(
        model,
        _criterion(config, split.task),
        optimizer,
        scheduler,
        train,
        val,
        split.task,
        split.scale,
        generator,
        module=distributed.wrap(model, context),
        choose_switches=chooser,
        progress=not config.quiet and context.is_main,
        log=log if context.is_main else _silent,
        device=context.device,
        precision=Precision(config.precision or default_precision(context.device), context.device),
        evaluate_switches=evaluated,
        calibrate=calibrate,
    )
    if config.resume:
        _resume(trainer, config, name, switches)
    return split, (name, kwargs), trainer


def _resume(trainer: Trainer, config: TrainConfig, name: str, switches: list[str]) -> None:
    if not config.out:
        raise UserError("--resume continues the run in --out DIR: give --out")
    path = os.path.join(config.out, CHECKPOINT)
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}; start without --resume")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["model"] != name or checkpoint["switches"] != switches:
        raise UserError(
            f"--resume: {path} holds {checkpoint['model']} with switches {checkpoint['switches']}, "
            f"not {name} with {switches}"
        )
    trainer.model.load_state_dict(checkpoint["state_dict"])
    trainer.load_state_dict(checkpoint)


def _checkpoint(trainer: Trainer, config: TrainConfig, spec: tuple[str, dict], input_shape) -> dict:
    scores = trainer.history[-1]["switches"] if trainer.history else None
    accuracy = scores if trainer.task == "classification" else None
    return {
        **checkpoint_fields(trainer.model, *spec, input_shape, accuracy),
        **trainer.state_dict(),
        "config": dataclasses.asdict(config),
    }


def _train(config: TrainConfig, context: distributed.Context, log) -> dict:
    split, spec, trainer = build(config, context, log)
    log(
        f"training {spec[0]} on {config.dataset} ({len(split.train)} train / {len(split.val)} val), "
        f"switches {', '.join(str(s) for s in trainer.model.switches)}, precision {trainer.precision}"
        + (f", baseline {config.baseline}" if config.baseline else "")
        + (f", {context.world_size} processes" if context.distributed else "")
    )
    input_shape = _input_shape(split)
    write = bool(config.out) and context.is_main
    if trainer.epoch >= config.epochs:
        log(
            f"nothing to train: {config.out} already holds {trainer.epoch} of {config.epochs} epochs "
            "(raise --epochs to train on); its results:"
        )

    def on_epoch_end(t: Trainer) -> None:
        if write:
            save(os.path.join(config.out, CHECKPOINT), _checkpoint(t, config, spec, input_shape))
            reports.write_history(config.out, t.history, t.metric)

    scores = trainer.fit(config.epochs, on_epoch_end)
    extra = dict(model=spec[0], dataset=config.dataset, baseline=config.baseline, epochs=config.epochs)
    if split.task == "super_resolution":
        extra["bicubic_psnr"] = bicubic_psnr(split)
    result = reports.metrics(scores, trainer.metric, **extra)
    if write:
        reports.write_metrics(config.out, result)
        reports.plot_history(config.out, trainer.history, trainer.metric)
    return result


def _individual(config: TrainConfig, context: distributed.Context, log) -> dict:
    """Each switch's structure trained alone; results gathered as if from one model."""
    merged = {}
    for switch in config.switches:
        out = os.path.join(config.out, "individual", reports.file_name(str(switch))) if config.out else None
        started = out is not None and os.path.isfile(os.path.join(out, CHECKPOINT))
        alone = dataclasses.replace(
            config, switches=[str(switch)], baseline=None, out=out, resume=config.resume and started
        )  # resume the runs that had begun
        result = _train(alone, context, log)
        merged.update(result["switches"])
    result = {**result, "switches": merged, "baseline": "individual"}
    if config.out and context.is_main:
        reports.write_metrics(config.out, result)
    return result


def run(config: TrainConfig, log=_print) -> dict:
    """Train as ``config`` says (under torchrun: data-parallel); returns the metrics.json content."""
    if config.baseline not in (None, *baselines.BASELINES):
        raise UserError(f"unknown baseline {config.baseline!r}; choose from {', '.join(baselines.BASELINES)}")
    context = distributed.setup()
    try:
        if config.baseline == "individual":
            return _individual(config, context, log)
        return _train(config, context, log)
    finally:
        distributed.teardown(context)
