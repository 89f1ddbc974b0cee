"""Where serving gets a switch's parts: cut from a model in memory, or read from exported part files.

``python -m paradis_fast export --format parts`` writes a directory of plain ``torch.save`` files
that ``torch.load(weights_only=True)`` reads: for each exported switch, ``<switch>/part{j}.pt``
holds part j of `split` as its own weights (state dict) and its structure (each module's class,
plain attributes such as a conv's stride, which parameters it has), and ``<switch>/fusion.pt``
what the fusing device adds (the meeting layer's bias, WDSR's skip branch) the same way;
``manifest.json`` lists them with the model's builder name, kwargs and switch set, the input
shape, dtype and accuracy. Loading rebuilds the module around the weights without running any
constructor (building the model, even on the meta device, would import torch._dynamo for its
arithmetic there: ~150 MB), so a device holds its part's weights and nothing of the rest of the
network. Every switch the server may re-plan to must be in the directory.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..nn import Switchable
from ..switches import Switch, SwitchLike, SwitchSet, SwitchSetLike
from .export import MANIFEST, fusion_entry, part_entries
from .plan import part_flops
from .split import Fusion, Split, split

__all__ = ["export_parts", "PartsDir", "ModelParts", "parts_of", "part_file"]

PARTS_FORMAT = "parts"
# What says which file a part file is, checked against the manifest when loaded: the model's
# builder, kwargs and switch set (also in the manifest), the switch and the part (index or "fusion").
MODEL_KEYS = ("model", "kwargs", "switches")
HEADER_KEYS = (*MODEL_KEYS, "switch", "part")
MODULE_INTERNALS = frozenset(vars(nn.Module()))  # training flag, registries, hooks: nn.Module.__init__'s
CLASS_PACKAGES = ("torch.nn.", "paradis_fast.")  # the only classes a part file may name


def part_file(switch: SwitchLike, part: int | str) -> str:
    """The file of part `part` (or ``"fusion"``) of `switch`, relative to the directory."""
    folder = str(Switch.parse(switch)).replace("/", "_")  # 3x1/3 -> 3x1_3
    return f"{folder}/{'fusion' if part == 'fusion' else f'part{part}'}.pt"


@torch.no_grad()
def export_parts(
    model: Switchable,
    switches: SwitchSetLike,
    input_shape: Sequence[int],
    out_dir: str | os.PathLike,
    name: str,
    kwargs: Mapping[str, Any],
    accuracy: Mapping[str, float] | None = None,
) -> dict:
    """Write the part files and fusion file of every switch in `switches` and ``manifest.json``
    into `out_dir` (`model` was built by ``paradis_fast.models.<name>(switches=..., **kwargs)``);
    return the manifest. The manifest is written last: a directory without one is incomplete."""
    # through JSON, so the header kept in every file equals the manifest's
    fields = json.loads(json.dumps(dict(model=name, kwargs=dict(kwargs), switches=[str(s) for s in model.switches])))
    splits = [split(model, switch) for switch in SwitchSet.of(switches)]  # every switch checked before writing
    dtype = next(model.parameters()).dtype
    image = torch.randn(2, *input_shape, dtype=dtype)
    exported = {}
    for result in splits:
        switch = str(result.switch)
        files = [part_file(switch, j) for j in range(len(result.parts))]
        parts, partials = part_entries(result, input_shape, image, files)
        fusion, _ = fusion_entry(result, partials, image, part_file(switch, "fusion"))
        os.makedirs(os.path.dirname(os.path.join(out_dir, fusion["file"])), exist_ok=True)
        for part, module in [*enumerate(result.parts), ("fusion", result.fusion)]:
            header = fields | dict(switch=switch, part=part)
            saved = header | dict(structure=_structure(module), state_dict=module.state_dict())
            torch.save(saved, os.path.join(out_dir, part_file(switch, part)))
        exported[switch] = dict(parts=parts, fusion=fusion)
    manifest = dict(
        format=PARTS_FORMAT,
        **fields,
        input_shape=["batch", *input_shape],
        dtype=str(dtype).removeprefix("torch."),
        accuracy=None if accuracy is None else dict(accuracy),
        exported=exported,
    )
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


class ModelParts:
    """The parts of a model in memory, each switch cut by `split` on first use (serving from a
    checkpoint: every device holds the whole model)."""

    def __init__(self, model: Switchable):
        self.model, self.switches = model, list(model.switches)
        self._splits: dict[Switch, Split] = {}

    def _split(self, switch: SwitchLike) -> Split:
        switch = Switch.parse(switch)
        if switch not in self._splits:
            self._splits[switch] = split(self.model, switch)
        return self._splits[switch]

    def part(self, switch: SwitchLike, j: int) -> nn.Module:
        return self._split(switch).parts[j]

    def fusion(self, switch: SwitchLike) -> Fusion:
        return self._split(switch).fusion

    def flops(self, input_shape: Sequence[int]) -> dict[Switch, tuple[int, ...]]:
        return part_flops(self.model, self.switches, input_shape)


class PartsDir:
    """An exported parts directory. A part or fusion is loaded from its own file when first asked
    for, and only the last part and the last fusion asked for are held: a device that re-planning
    moves to another part drops the one it ran, so it never holds more than one part's weights.
    `log` gets a line per file loaded."""

    def __init__(self, path: str | os.PathLike, log: Callable[[str], None] | None = None):
        self.path, self.log = os.fspath(path), log
        self.manifest = _read_manifest(self.path)
        self.exported = {Switch.parse(s): entry for s, entry in self.manifest["exported"].items()}
        self.switches = list(self.exported)
        self.input_shape = list(self.manifest["input_shape"][1:])
        self.accuracy = self.manifest["accuracy"]
        for entry in self.exported.values():
            for file in [p["file"] for p in entry["parts"]] + [entry["fusion"]["file"]]:
                if not os.path.isfile(os.path.join(self.path, file)):
                    raise UserError(f"{self.path}: {file} is missing (listed in {MANIFEST})")
        self._held: dict[str, tuple[str, nn.Module]] = {}  # "part"/"fusion" -> (file, module)

    def _entry(self, switch: Switch) -> dict:
        if switch not in self.exported:
            held = ", ".join(str(s) for s in self.switches)
            raise UserError(f"{self.path} holds the parts of switches {held}, not {switch}; export it with --switch")
        return self.exported[switch]

    def part(self, switch: SwitchLike, j: int) -> nn.Module:
        switch = Switch.parse(switch)
        return self._load(switch, j, self._entry(switch)["parts"][j]["file"])

    def fusion(self, switch: SwitchLike) -> Fusion:
        switch = Switch.parse(switch)
        return self._load(switch, "fusion", self._entry(switch)["fusion"]["file"])

    def flops(self, input_shape: Sequence[int]) -> dict[Switch, tuple[int, ...]]:
        if list(input_shape) != self.input_shape:
            raise UserError(
                f"{self.path} was exported for images of shape {self.input_shape}, not {list(input_shape)}; "
                "export it again with --input-shape"
            )
        return {s: tuple(p["flops"] for p in entry["parts"]) for s, entry in self.exported.items()}

    def _load(self, switch: Switch, part: int | str, file: str) -> nn.Module:
        kind = "fusion" if part == "fusion" else "part"
        held = self._held.get(kind)
        if held is not None and held[0] == file:
            return held[1]
        self._held.pop(kind, None)  # free the part no longer run before loading the next
        path = os.path.join(self.path, file)
        expected = {key: self.manifest[key] for key in MODEL_KEYS} | dict(switch=str(switch), part=part)
        structure, state = _read_part(path, expected)
        try:
            module = _rebuild(structure, state).eval()
        except ValueError as error:
            raise UserError(f"{path}: cannot be rebuilt ({error})") from error
        if self.log is not None:
            what = kind if part == "fusion" else f"part {part}"
            size = sum(t.nbytes for t in (*module.parameters(), *module.buffers()))
            self.log(f"loaded {what} of switch {switch} from {path} ({size} bytes)")
        self._held[kind] = (file, module)
        return module


def parts_of(model: Switchable | ModelParts | PartsDir) -> ModelParts | PartsDir:
    """`model` itself if it already gives parts, else its `ModelParts`."""
    return model if isinstance(model, (ModelParts, PartsDir)) else ModelParts(model)


def _read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    try:
        with open(file) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no {MANIFEST}; write the directory with export --format parts") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{file}: cannot be read as JSON ({error})") from error
    got = manifest.get("format") if isinstance(manifest, dict) else None
    if got != PARTS_FORMAT:
        raise UserError(
            f"{file}: not a parts manifest (format {got!r}); write the directory with export --format parts"
        )
    missing = {*MODEL_KEYS, "input_shape", "accuracy", "exported"} - set(manifest)
    if missing:
        raise UserError(f"{file}: not a parts manifest (missing {', '.join(sorted(missing))})")
    return manifest


def _read_part(path: str, expected: dict) -> tuple[dict, dict[str, Tensor]]:
    """The structure and state dict in a part file, after checking its header against the manifest."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:  # removed since the directory was opened
        raise UserError(f"{path}: cannot be read ({error.strerror or error})") from error
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise UserError(f"{path}: not a file written by torch.save ({type(error).__name__})") from error
    if not isinstance(saved, dict) or not {*HEADER_KEYS, "structure", "state_dict"} <= set(saved):
        raise UserError(f"{path}: not a part file written by export --format parts")
    differs = [
        f"{key} {saved[key]!r}, manifest {expected[key]!r}" for key in HEADER_KEYS if saved[key] != expected[key]
    ]
    if differs:
        raise UserError(f"{path}: does not match {MANIFEST} ({'; '.join(differs)})")
    return saved["structure"], saved["state_dict"]


def _structure(module: nn.Module) -> dict:
    """What rebuilds `module` around its state dict: its class, its own attributes (plain values:
    a conv's stride, a block's residual scale), the shape of each of its parameters and buffers
    (None where unset), and the structures of its children."""
    return dict(
        cls=(type(module).__module__, type(module).__qualname__),
        attrs={k: v for k, v in vars(module).items() if k not in MODULE_INTERNALS},
        parameters={name: None if p is None else list(p.shape) for name, p in module._parameters.items()},
        buffers={name: None if b is None else list(b.shape) for name, b in module._buffers.items()},
        children={name: _structure(child) for name, child in module.named_children()},
    )


def _module_class(module: str, qualname: str) -> type[nn.Module]:
    if not f"{module}.".startswith(CLASS_PACKAGES):
        raise ValueError(f"class {module}.{qualname} is not one of torch.nn or paradis_fast")
    try:
        cls = importlib.import_module(module)
        for name in qualname.split("."):
            cls = getattr(cls, name)
    except (ImportError, AttributeError):
        raise ValueError(f"no class {module}.{qualname}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{module}.{qualname} is not a module class")
    return cls


def _rebuild(structure: dict, state: dict[str, Tensor], prefix: str = "") -> nn.Module:
    """The module `_structure` describes, holding the tensors of `state`; no constructor runs, as
    for an unpickled module (`state` must hold exactly its tensors)."""

    def take(name: str, shape: list[int]) -> Tensor:
        if prefix + name not in state:
            raise ValueError(f"no weights for {prefix + name}")
        tensor = state.pop(prefix + name)
        if list(tensor.shape) != shape:
            raise ValueError(f"{prefix + name} has shape {list(tensor.shape)}, the module {shape}")
        return tensor

    cls = _module_class(*structure["cls"])
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__dict__.update(structure["attrs"])
    for name, shape in structure["parameters"].items():
        module._parameters[name] = None if shape is None else nn.Parameter(take(name, shape), requires_grad=False)
    for name, shape in structure["buffers"].items():
        module._buffers[name] = None if shape is None else take(name, shape)
    for name, child in structure["children"].items():
        module._modules[name] = _rebuild(child, state, f"{prefix}{name}.")
    if not prefix and state:
        raise ValueError(f"weights of no module: {', '.join(state)}")
    return module
