"""Write a split switch as one file per part plus the fusion and a JSON manifest.

Formats: ``torch-export`` (``torch.export.save``, ``.pt2``; load with ``torch.export.load``) and
``onnx`` (``torch.onnx.export`` with the dynamo exporter; needs the ``onnx`` and ``onnxscript``
packages). The batch dimension is dynamic. The manifest says how the files compose:
``output = fusion(sum_j part_j(image)[, image])``. The ``parts`` format, whose files the server
runs (plain state dicts, several switches), is `paradis_fast.deploy.parts`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import warnings
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .split import Split

__all__ = ["export", "FORMATS", "MANIFEST"]

FORMATS = {"torch-export": ".pt2", "onnx": ".onnx"}
MANIFEST = "manifest.json"


# Messages of torch that exporting a split triggers and that say nothing wrong about its files; silenced
# only around the export calls (_quiet), never for the rest of the process.
_IGNORED_WARNINGS = (
    # torch.export.save takes a weight that is not row-major contiguous for a slice of a larger tensor:
    # the parts' channels_last stem weights cover their whole storage, so the bytes written are complete.
    (UserWarning, r"No complete tensor found in the group"),
    # torch's own pytree deprecation, raised when torch.onnx copies its tree specs.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # torch.onnx: the fusion's inputs share the one batch axis, which keeps the name "batch" as asked.
    (UserWarning, r"# The axis name: .* will not be used, since it shares the same shape constraints"),
)
# logger name -> start of the messages dropped: torch.onnx logs every torchvision op it cannot register.
_IGNORED_LOGS = {"torch.onnx._internal.exporter._registration": "torchvision is not installed"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Drop the messages above while exporting; every other warning and log record passes."""
    filters = [
        (logging.getLogger(name), lambda record, prefix=prefix: not record.getMessage().startswith(prefix))
        for name, prefix in _IGNORED_LOGS.items()
    ]
    with warnings.catch_warnings():
        for category, message in _IGNORED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger, drop in filters:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger, drop in filters:
                logger.removeFilter(drop)


def _input_names(module: nn.Module, inputs: tuple) -> list[str]:
    return list(inspect.signature(module.forward).parameters)[: len(inputs)]


def _write(module: nn.Module, inputs: tuple, path: str, fmt: str) -> None:
    batch = torch.export.Dim("batch", min=1)
    names = _input_names(module, inputs)
    dynamic_shapes = {name: {0: batch} for name in names}
    with _quiet():
        if fmt == "torch-export":
            torch.export.save(torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes), path)
        else:
            torch.onnx.export(
                module,
                inputs,
                path,
                dynamo=True,
                input_names=names,
                output_names=["output"],
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
            )


def part_entries(split: Split, input_shape: Sequence[int], image: Tensor, files: Sequence[str]) -> tuple[list, list]:
    """Each part's manifest entry (file, inputs, width, `PartStats`, output shape) and its partial
    output of `image`; shared by every export format."""
    entries, partials = [], []
    for j, (part, stats) in enumerate(zip(split.parts, split.stats(input_shape))):
        partial = part(image)
        partials.append(partial)
        entries.append(
            dict(
                file=files[j],
                inputs=_input_names(part, (image,)),
                width=str(split.switch.widths[j]),
                params=stats.params,
                flops=stats.flops,
                bytes_sent=stats.bytes_sent,
                output_shape=["batch", *partial.shape[1:]],
            )
        )
    return entries, partials


def fusion_entry(split: Split, partials: Sequence[Tensor], image: Tensor, file: str) -> tuple[dict, tuple]:
    """The fusion's manifest entry (file, inputs, how the files compose) and its example inputs."""
    takes_image = split.fusion.skip is not None
    inputs = (torch.stack(list(partials)).sum(0),) + ((image,) if takes_image else ())
    rule = "output = fusion(total=sum_j part_j(input=image)" + (", image=image)" if takes_image else ")")
    return dict(file=file, inputs=_input_names(split.fusion, inputs), rule=rule), inputs


@torch.no_grad()
def export(
    split: Split,
    input_shape: Sequence[int],
    out_dir: str | os.PathLike,
    fmt: str = "torch-export",
    model_name: str | None = None,
) -> dict:
    """Write ``part{j}`` files, the ``fusion`` file and ``manifest.json`` into `out_dir`; return the manifest."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    os.makedirs(out_dir, exist_ok=True)
    dtype = next(split.parameters()).dtype
    image = torch.randn(2, *input_shape, dtype=dtype)
    suffix = FORMATS[fmt]
    parts, partials = part_entries(split, input_shape, image, [f"part{j}{suffix}" for j in range(len(split.parts))])
    for part, entry in zip(split.parts, parts):
        _write(part, (image,), os.path.join(out_dir, entry["file"]), fmt)
    fusion, fusion_inputs = fusion_entry(split, partials, image, f"fusion{suffix}")
    _write(split.fusion, fusion_inputs, os.path.join(out_dir, fusion["file"]), fmt)
    manifest = dict(
        format=fmt,
        model=model_name,
        switch=str(split.switch),
        input_shape=["batch", *input_shape],
        dtype=str(dtype).removeprefix("torch."),
        parts=parts,
        fusion=fusion,
    )
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest
