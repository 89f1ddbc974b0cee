"""SwitchBatchNorm2d: private BatchNorm statistics and affine parameters per switch (or one affine
row shared by every switch, for universally slimmable networks)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..switches import SwitchSetLike
from .switchable import Switchable


class SwitchBatchNorm2d(Switchable):
    """BatchNorm2d with ``[S, C]`` parameters and buffers (row s for switch s), activation fused.

    The state dict keys are those of nn.BatchNorm2d. ``momentum=None`` gives the cumulative
    average, per switch, as in PyTorch. After `share_affine` every switch uses one affine row.
    """

    def __init__(
        self,
        num_features: int,
        switches: SwitchSetLike,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        activation: str | None = None,
    ):
        super().__init__(switches)
        if activation not in (None, "relu", "relu6"):
            raise ValueError(f"unknown activation {activation!r}; choose None, 'relu' or 'relu6'")
        self.check_slices(num_features, f"SwitchBatchNorm2d({num_features})")
        self.num_features, self.eps, self.momentum, self.activation = num_features, eps, momentum, activation
        shape = (len(self.switches), num_features)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_var", torch.ones(shape))
        self.register_buffer("num_batches_tracked", torch.zeros(len(self.switches), dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    @property
    def shares_affine(self) -> bool:
        return self.weight.shape[0] < len(self.switches)

    def share_affine(self) -> None:
        """Keep one affine row (row 0) for every switch, the statistics per switch: a universally
        slimmable network's width w uses the covered prefix of the full-width gamma and beta (Yu &
        Huang 2019). The state dict keeps the ``[S, C]`` tables, the row repeated, so its
        checkpoints load into an ordinary model (deployment) as they are."""
        self.weight = nn.Parameter(self.weight.detach()[:1].clone())
        self.bias = nn.Parameter(self.bias.detach()[:1].clone())

    def affine_row(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Switch row `row`'s affine weight and bias, ``[C]`` each (the one shared row after
        `share_affine`): what inference with that switch applies, e.g. to fold it into a conv."""
        if not 0 <= row < len(self.switches):
            raise IndexError(f"row {row} out of range for {len(self.switches)} switches")
        row = 0 if self.shares_affine else row
        return self.weight[row], self.bias[row]

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``[S, C]`` tables the op reads; a shared row is repeated (copied: the backends' kernels
        may assume contiguous tables) and its gradient is the sum over the switches."""
        if not self.shares_affine:
            return self.weight, self.bias
        rows = len(self.switches)
        return self.weight.expand(rows, -1).contiguous(), self.bias.expand(rows, -1).contiguous()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.shares_affine:
            for name, table in zip(("weight", "bias"), self._affine()):
                destination[prefix + name] = table if keep_vars else table.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        if self.shares_affine:
            for name in ("weight", "bias"):
                table = state_dict.get(prefix + name)
                if table is None or table.shape != (len(self.switches), self.num_features):
                    continue  # missing or misshapen: the stock loader reports it
                if not torch.equal(table, table[:1].expand_as(table)):
                    errors.append(f"{prefix}{name}: the switches' rows differ, but this layer shares one row")
                state_dict[prefix + name] = table[:1]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize(x, self.activation, None)

    def add_activate(self, x: torch.Tensor, residual: torch.Tensor, activation: str | None = "relu") -> torch.Tensor:
        """activation(self(x) + residual): a residual block's tail, the add and the activation in the
        BatchNorm kernel's own pass where the backend fuses them. Only for a BatchNorm without an
        activation of its own (which would come before the addition)."""
        if self.activation is not None:
            raise ValueError(f"add_activate: this BatchNorm applies {self.activation!r} itself, before any residual")
        if activation not in (None, "relu", "relu6"):
            raise ValueError(f"unknown activation {activation!r}; choose None, 'relu' or 'relu6'")
        return self._normalize(x, activation, residual)

    def _normalize(self, x: torch.Tensor, activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
        momentum = self.momentum
        if self.training:
            if self.active_rows == tuple(range(len(self.switches))):  # every switch, in order
                counts = self.num_batches_tracked.add_(1)
            else:
                rows = torch.tensor(self.active_rows, device=self.num_batches_tracked.device)
                self.num_batches_tracked.index_add_(0, rows, torch.ones_like(rows))
                counts = self.num_batches_tracked[rows]
            if momentum is None:
                momentum = 1.0 / counts.float()
        weight, bias = self._affine()
        return ops.switch_batch_norm(
            x,
            weight,
            bias,
            self.running_mean,
            self.running_var,
            self.active,
            self.training,
            momentum,
            self.eps,
            activation,
            rows=self.active_rows,
            residual=residual,
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
        if self.activation:
            text += f", activation={self.activation!r}"
        if self.shares_affine:
            text += ", shared affine"
        return f"{text}, switches=[{self.switches}]"
