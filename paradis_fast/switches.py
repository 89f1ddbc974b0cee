"""Switches: how a layer's channels are split into contiguous per-device slices (DESIGN §1).

Widths are exact fractions, so slice boundaries are exact and two layers with the same channel
count always slice identically (residual additions line up).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Iterable, Iterator, Sequence, Union

from .errors import UserError

__all__ = ["Switch", "SwitchSet", "SwitchLike", "SwitchSetLike"]

_NUMBER = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*(\d+)\s*)?$")


def _parse_width(text: str, spec: str) -> Fraction:
    match = _NUMBER.match(text)
    if match is None:
        raise UserError(f"bad switch spec {spec!r}: {text.strip()!r} is not a width (use 0.25 or 1/4)")
    numerator, denominator = match.groups()
    if denominator is not None and int(denominator) == 0:
        raise UserError(f"bad switch spec {spec!r}: division by zero in width {text.strip()!r}")
    width = Fraction(numerator) / (int(denominator) if denominator else 1)
    if not 0 < width <= 1:
        raise UserError(f"bad switch spec {spec!r}: width {text.strip()} is not in (0, 1]")
    return width


def _format_width(width: Fraction) -> str:
    """Decimal when the fraction has a finite decimal expansion (0.25, 1.0), else 'a/b'."""
    twos = fives = 0
    denominator = width.denominator
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    if denominator != 1:
        return f"{width.numerator}/{width.denominator}"
    digits = max(twos, fives, 1)
    scaled = width * 10**digits
    whole, frac = divmod(int(scaled), 10**digits)
    return f"{whole}.{frac:0{digits}d}"


class Switch:
    """An ordered list of sub-network widths, one per device; see DESIGN §1.

    >>> Switch.parse("2x0.5").slices(10)
    [(0, 5), (5, 10)]
    """

    __slots__ = ("_widths", "_hash")  # immutable; the hash is kept: every op call looks its plan up by it

    def __init__(self, widths: Union[str, "Switch", Iterable[Union[Fraction, int, str]]]):
        if isinstance(widths, (str, Switch)):  # Switch("2x0.5") parses rather than iterating characters
            widths = Switch.parse(widths).widths
        widths = tuple(Fraction(w) for w in widths)
        if not widths:
            raise UserError("bad switch: a switch needs at least one width")
        for w in widths:
            if not 0 < w <= 1:
                raise UserError(f"bad switch: width {w} is not in (0, 1]")
        if sum(widths) > 1:
            raise UserError(f"bad switch {_spell(widths)!r}: widths sum to {sum(widths)} > 1")
        self._widths, self._hash = widths, hash(widths)

    @classmethod
    def parse(cls, text: Union[str, "Switch"]) -> "Switch":
        """Parse 'KxW', 'W1+W2+...' or a bare 'W' (= '1xW'); W is a decimal or 'a/b'."""
        if isinstance(text, Switch):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a switch is spelled as a str such as '2x0.5', got {type(text).__name__}")
        spec = text.strip()
        if not spec:
            raise UserError("bad switch spec '': empty")
        if "x" in spec.lower():
            count, _, width = spec.lower().partition("x")
            if not count.strip().isdigit() or int(count) == 0:
                raise UserError(f"bad switch spec {text!r}: {count.strip()!r} is not a positive device count")
            widths = [_parse_width(width, text)] * int(count)
        else:
            widths = [_parse_width(part, text) for part in spec.split("+")]
        if sum(widths) > 1:
            raise UserError(f"bad switch spec {text!r}: widths sum to {sum(widths)} > 1")
        return cls(widths)

    @property
    def widths(self) -> tuple[Fraction, ...]:
        return self._widths

    @property
    def num_devices(self) -> int:
        return len(self._widths)

    @property
    def total_width(self) -> Fraction:
        return sum(self._widths, Fraction(0))

    def boundaries(self, channels: int) -> list[int]:
        """b_0 = 0 and b_j = floor(C * (w_1 + ... + w_j) + 1/2), exactly."""
        bounds, cumulative = [0], Fraction(0)
        for w in self._widths:
            cumulative += w
            bounds.append(int(channels * cumulative + Fraction(1, 2)))
        return bounds

    def slices(self, channels: int, layer: str | None = None) -> list[tuple[int, int]]:
        """Channel range [start, stop) of each sub-network for a layer of `channels` channels."""
        if not isinstance(channels, int) or channels < 1:
            raise UserError(f"channel count must be a positive int, got {channels!r}")
        bounds = self.boundaries(channels)
        pairs = list(zip(bounds[:-1], bounds[1:]))
        for j, (start, stop) in enumerate(pairs):
            if start == stop:
                where = f"layer {layer} with " if layer else ""
                raise UserError(
                    f"switch {self} leaves sub-network {j} an empty slice of {where}{channels} channels; "
                    "use more channels or wider sub-networks"
                )
        return pairs

    def covered(self, channels: int) -> int:
        """Number of leading channels the switch covers (the rest are zero)."""
        return self.boundaries(channels)[-1]

    def __str__(self) -> str:
        return _spell(self._widths)

    def __repr__(self) -> str:
        return f"Switch('{self}')"

    def __eq__(self, other) -> bool:
        if isinstance(other, Switch):
            return self._widths == other._widths
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash


def _spell(widths: Sequence[Fraction]) -> str:
    if all(w == widths[0] for w in widths):
        return f"{len(widths)}x{_format_width(widths[0])}"
    return "+".join(_format_width(w) for w in widths)


SwitchLike = Union[str, Switch]


class SwitchSet(Sequence[Switch]):
    """The ordered, duplicate-free switches a model supports; index s selects switch s's BatchNorm."""

    __slots__ = ("_switches", "_index", "_hash")  # immutable, hash kept as Switch's

    def __init__(self, switches: Iterable[SwitchLike]):
        if isinstance(switches, (str, Switch)):
            switches = [switches]
        parsed = tuple(Switch.parse(s) for s in switches)
        if not parsed:
            raise UserError("empty switch set: give at least one switch such as '1x1.0'")
        index: dict[Switch, int] = {}
        for i, switch in enumerate(parsed):
            if switch in index:
                raise UserError(f"switch {switch} appears twice in the switch set (positions {index[switch]} and {i})")
            index[switch] = i
        self._switches, self._index, self._hash = parsed, index, hash(parsed)

    @classmethod
    def of(cls, switches: "SwitchSetLike") -> "SwitchSet":
        return switches if isinstance(switches, SwitchSet) else cls(switches)

    def index(self, switch: SwitchLike, *_) -> int:  # type: ignore[override]
        """Position of a switch, given as a `Switch` or its spelling."""
        key = Switch.parse(switch)
        if key not in self._index:
            raise UserError(f"switch {key} is not in the switch set {self}")
        return self._index[key]

    @property
    def widest(self) -> int:
        """Index of the teacher: the largest total width, then the widest single sub-network."""
        return max(range(len(self)), key=lambda i: (self[i].total_width, max(self[i].widths), -i))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return SwitchSet(self._switches[i])
        return self._switches[i]

    def __len__(self) -> int:
        return len(self._switches)

    def __iter__(self) -> Iterator[Switch]:
        return iter(self._switches)

    def __contains__(self, switch) -> bool:
        try:
            return Switch.parse(switch) in self._index
        except (TypeError, ValueError):
            return False

    def __eq__(self, other) -> bool:
        if isinstance(other, SwitchSet):
            return self._switches == other._switches
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return ", ".join(str(s) for s in self._switches)

    def __repr__(self) -> str:
        return f"SwitchSet([{', '.join(repr(str(s)) for s in self._switches)}])"


SwitchSetLike = Union[SwitchSet, Sequence[SwitchLike], SwitchLike]
