"""paradis_fast.switches: parsing, canonical spelling, exact slicing (DESIGN §1) and switch sets."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from paradis_fast import Switch, SwitchSet


def independent_bounds(widths, channels):
    bounds, total = [0], Fraction(0)
    for w in widths:
        total += w
        bounds.append(math.floor(channels * total + Fraction(1, 2)))
    return bounds


# ------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "text, widths",
    [
        ("1x1.0", [1]),
        ("2x0.5", [Fraction(1, 2)] * 2),
        ("4x0.25", [Fraction(1, 4)] * 4),
        ("3x1/3", [Fraction(1, 3)] * 3),
        ("2x.5", [Fraction(1, 2)] * 2),
        ("2X0.5", [Fraction(1, 2)] * 2),
        (" 2 x 0.5 ", [Fraction(1, 2)] * 2),
        ("0.5+0.25+0.25", [Fraction(1, 2), Fraction(1, 4), Fraction(1, 4)]),
        ("0.3+0.7", [Fraction(3, 10), Fraction(7, 10)]),
        ("1/3+2/3", [Fraction(1, 3), Fraction(2, 3)]),
        ("0.5 + 1/4", [Fraction(1, 2), Fraction(1, 4)]),
        ("0.5", [Fraction(1, 2)]),
        ("1", [1]),
        ("1/10", [Fraction(1, 10)]),
        ("2/4", [Fraction(1, 2)]),
        ("0.125", [Fraction(1, 8)]),
        ("10x0.1", [Fraction(1, 10)] * 10),
    ],
)
def test_parse_widths_are_exact_fractions(text, widths):
    switch = Switch.parse(text)
    assert switch.widths == tuple(widths)
    assert all(type(w) is Fraction for w in switch.widths)
    assert switch.num_devices == len(widths)
    assert switch.total_width == sum(widths)
    assert type(switch.total_width) is Fraction


def test_decimal_widths_are_not_floats():
    # 0.1 + 0.2 + 0.7 == 1 exactly only with fractions (as floats it is 0.9999999999999999 < 1)
    switch = Switch.parse("0.1+0.2+0.7")
    assert switch.total_width == 1
    assert switch.widths == (Fraction(1, 10), Fraction(1, 5), Fraction(7, 10))
    assert switch.slices(10) == [(0, 1), (1, 3), (3, 10)]


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("2x.5", "2x0.5"),
        ("1/10", "1x0.1"),
        ("0.5+0.25+0.25", "0.5+0.25+0.25"),
        ("0.5+0.5", "2x0.5"),
        ("0.25+0.25+0.25+0.25", "4x0.25"),
        ("1", "1x1.0"),
        ("1x1", "1x1.0"),
        ("1.0", "1x1.0"),
        ("0.50", "1x0.5"),
        ("3x1/3", "3x1/3"),
        ("1/3+1/3+1/3", "3x1/3"),
        ("2/6", "1x1/3"),
        ("1/3+1/6", "1/3+1/6"),
        ("0.3+0.7", "0.3+0.7"),
        ("4x1/4", "4x0.25"),
        ("1/8", "1x0.125"),
        ("1/1024", "1x0.0009765625"),
        ("1/1048576", "1x0.00000095367431640625"),  # exact decimal, never a float's 9.5e-07
        ("0.5 + 0.25", "0.5+0.25"),
    ],
)
def test_canonical_spelling_round_trips(text, canonical):
    switch = Switch.parse(text)
    assert str(switch) == canonical
    assert Switch.parse(str(switch)) == switch
    assert str(Switch.parse(canonical)) == canonical
    assert repr(switch) == f"Switch('{canonical}')"


def test_random_switches_round_trip_through_their_spelling():
    rng = random.Random(7)
    for _ in range(400):
        widths, budget = [], Fraction(1)
        for _ in range(rng.randint(1, 5)):
            w = Fraction(rng.randint(1, 12), rng.choice((1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 25, 100)))
            if 0 < w <= min(1, budget):
                widths.append(w)
                budget -= w
        if not widths:
            continue
        if rng.random() < 0.3:
            widths = [widths[0]] * max(1, min(len(widths), int(1 / widths[0])))
        switch = Switch(widths)
        spelled = str(switch)
        again = Switch.parse(spelled)
        assert again == switch and again.widths == tuple(widths), spelled
        assert str(again) == spelled
        assert hash(again) == hash(switch)


def test_equality_and_hash():
    assert Switch("2x0.5") == Switch.parse("0.5+0.5")
    assert hash(Switch("2x0.5")) == hash(Switch.parse("0.5+0.5"))
    assert Switch.parse("2x0.5") != "2x0.5"  # a spelling is not a Switch (hashes must agree with ==)
    assert "2x0.5" in SwitchSet(["0.5+0.5"])  # but a set looks switches up by spelling
    assert Switch.parse("2x0.5") != Switch.parse("1x1.0")
    assert Switch.parse("0.25+0.5") != Switch.parse("0.5+0.25")  # order is device order
    assert Switch.parse("1x0.5") != Switch.parse("2x0.5")
    assert len({Switch.parse(t) for t in ("2x0.5", "0.5+0.5", "2x.5", "2x1/2", "1x1.0", "1")}) == 2
    assert Switch([Fraction(1, 2), "1/4", 0.25]) == Switch.parse("0.5+0.25+0.25")
    assert Switch.parse(Switch.parse("3x1/3")) == Switch.parse("3x1/3")


def test_switch_from_widths_validates():
    with pytest.raises(ValueError, match="at least one width"):
        Switch([])
    with pytest.raises(ValueError, match=r"not in \(0, 1\]"):
        Switch([Fraction(0)])
    with pytest.raises(ValueError, match=r"not in \(0, 1\]"):
        Switch([Fraction(-1, 2)])
    with pytest.raises(ValueError, match=r"not in \(0, 1\]"):
        Switch([Fraction(3, 2)])
    with pytest.raises(ValueError, match="sum to 5/4 > 1"):
        Switch([Fraction(3, 4), Fraction(1, 2)])


@pytest.mark.parametrize(
    "text, message",
    [
        ("2x", r"'2x'.*'' is not a width"),
        ("abc", r"'abc' is not a width"),
        ("0x0.5", r"'0' is not a positive device count"),
        ("-1x0.5", r"not a positive device count"),
        ("1/0", r"division by zero"),
        ("0", r"width 0 is not in \(0, 1\]"),
        ("0.0", r"not in \(0, 1\]"),
        ("0/3", r"not in \(0, 1\]"),
        ("2x0", r"not in \(0, 1\]"),
        ("-0.5", r"'-0.5' is not a width"),
        ("1.5", r"width 1.5 is not in \(0, 1\]"),
        ("3/2", r"not in \(0, 1\]"),
        ("0.75+0.5", r"sum to 5/4 > 1"),
        ("3x0.5", r"sum to 3/2 > 1"),
        ("0.5+", r"'' is not a width"),
        ("0.5,0.5", r"is not a width"),
        ("", r"empty"),
        ("   ", r"empty"),
        ("1e-1", r"is not a width"),
    ],
)
def test_malformed_spellings_raise_value_error_naming_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        Switch.parse(text)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError, match="spelled as a str"):
        Switch.parse(0.5)


# ------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize(
    "text, channels, expected",
    [
        ("1x1.0", 7, [(0, 7)]),
        ("2x0.5", 10, [(0, 5), (5, 10)]),
        ("2x0.5", 5, [(0, 3), (3, 5)]),  # 2.5 + 1/2 rounds to 3: ties go up, exactly
        ("4x0.25", 5, [(0, 1), (1, 3), (3, 4), (4, 5)]),
        ("3x1/3", 5, [(0, 2), (2, 3), (3, 5)]),
        ("0.3+0.7", 5, [(0, 2), (2, 5)]),
        ("0.5+0.25+0.25", 13, [(0, 7), (7, 10), (10, 13)]),
        ("1x0.5", 7, [(0, 4)]),
        ("2x0.25", 13, [(0, 3), (3, 7)]),
    ],
)
def test_slices_known_values(text, channels, expected):
    switch = Switch.parse(text)
    assert switch.slices(channels) == expected
    assert switch.covered(channels) == expected[-1][1]
    assert switch.boundaries(channels) == [0] + [stop for _, stop in expected]


def test_slices_follow_the_rounding_rule_exactly_for_random_widths():
    rng = random.Random(2024)
    checked = 0
    for _ in range(300):
        k = rng.randint(1, 4)
        widths = [Fraction(rng.randint(1, 9), rng.choice((3, 7, 8, 10, 12, 40))) for _ in range(k)]
        if sum(widths) > 1 or any(w > 1 for w in widths):
            continue
        switch = Switch(widths)
        for channels in range(1, 201):
            bounds = independent_bounds(widths, channels)
            assert switch.boundaries(channels) == bounds
            if any(a == b for a, b in zip(bounds[:-1], bounds[1:])):
                with pytest.raises(ValueError, match="empty slice"):
                    switch.slices(channels)
                continue
            slices = switch.slices(channels)
            assert len(slices) == k
            assert slices[0][0] == 0 and slices[-1][1] == bounds[-1] <= channels
            assert all(a[1] == b[0] for a, b in zip(slices[:-1], slices[1:])), "slices are contiguous"
            assert all(start < stop for start, stop in slices)
            covered = [c for start, stop in slices for c in range(start, stop)]
            assert covered == list(range(bounds[-1])), "slices cover [0, b_k) once each"
            if switch.total_width == 1:
                assert bounds[-1] == channels
            checked += 1
    assert checked > 10000


def test_same_channel_count_slices_identically():
    a, b = Switch.parse("0.5+0.25+0.25"), Switch.parse("0.5+0.25+0.25")
    assert a.slices(37) == b.slices(37)
    assert Switch.parse("2x0.5").slices(37)[0] == Switch.parse("0.5+0.25+0.25").slices(37)[0]


def test_empty_slice_names_channels_and_switch():
    with pytest.raises(ValueError, match=r"4x0\.25.*empty slice.* 3 channels"):
        Switch.parse("4x0.25").slices(3)
    with pytest.raises(ValueError, match=r"layer conv3.* 3 channels"):
        Switch.parse("4x0.25").slices(3, layer="conv3")
    with pytest.raises(ValueError, match=r"1x0\.1.*4 channels"):
        Switch.parse("0.1").slices(4)


@pytest.mark.parametrize("channels", [0, -3, 2.0, "8"])
def test_slices_reject_bad_channel_counts(channels):
    with pytest.raises(ValueError, match="channel count"):
        Switch.parse("2x0.5").slices(channels)


# ----------------------------------------------------------------------------------- switch sets
def test_switch_set_is_ordered_and_indexable():
    ss = SwitchSet(["2x0.5", "1x1.0", "0.5+0.25+0.25", "1x0.5"])
    assert len(ss) == 4
    assert [str(s) for s in ss] == ["2x0.5", "1x1.0", "0.5+0.25+0.25", "1x0.5"]
    assert ss[0] == Switch.parse("2x0.5") and isinstance(ss[0], Switch)
    assert ss[-1] == Switch.parse("1x0.5")
    assert [str(s) for s in ss[1:3]] == ["1x1.0", "0.5+0.25+0.25"] and isinstance(ss[1:3], SwitchSet)
    assert ss.index("1x1.0") == 1
    assert ss.index("0.5+0.5") == 0  # any spelling
    assert ss.index(Switch.parse("0.5+0.25+0.25")) == 2
    assert ss.index("0.5") == 3
    with pytest.raises(ValueError, match="not in the switch set"):
        ss.index("4x0.25")
    assert "2x.5" in ss and Switch.parse("1") in ss
    assert "4x0.25" not in ss and "garbage" not in ss and 3 not in ss
    assert SwitchSet(["2x0.5", "1x1.0"]) == SwitchSet(["0.5+0.5", "1"])
    assert SwitchSet(["2x0.5", "1x1.0"]) != SwitchSet(["1x1.0", "2x0.5"])
    assert hash(SwitchSet(["2x0.5", "1x1.0"])) == hash(SwitchSet(["0.5+0.5", "1"]))
    assert SwitchSet.of(ss) is ss
    assert list(SwitchSet("2x0.5")) == [Switch.parse("2x0.5")]


def test_switch_set_rejects_duplicates_and_empty():
    with pytest.raises(ValueError, match=r"2x0\.5 appears twice.*positions 0 and 2"):
        SwitchSet(["2x0.5", "1x1.0", "0.5+0.5"])
    with pytest.raises(ValueError, match="empty switch set"):
        SwitchSet([])
    with pytest.raises(ValueError, match="bad switch spec"):
        SwitchSet(["2x0.5", "oops"])


@pytest.mark.parametrize(
    "switches, widest",
    [
        (["1x1.0"], 0),
        (["2x0.5", "1x1.0", "4x0.25"], 1),
        (["1x0.5", "2x0.25", "0.3+0.7"], 2),  # largest total width first
        (["0.5+0.25+0.25", "0.3+0.7", "4x0.25"], 1),  # then the widest single sub-network
        (["0.5+0.25+0.25", "2x0.5"], 0),
        (["2x0.25", "1x0.5"], 1),
        (["0.25+0.5", "0.5+0.25"], 0),  # ties on both: the first
    ],
)
def test_widest_is_the_teacher(switches, widest):
    assert SwitchSet(switches).widest == widest
