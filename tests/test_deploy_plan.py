"""plan(): the switch whose slowest device finishes first; the checkpoint format; the plan CLI."""

from __future__ import annotations

import itertools

import pytest
import torch

from paradis_fast import Switch, models
from paradis_fast.deploy import load_checkpoint, part_flops, plan, save_checkpoint, split

SWITCHES = ["1x1.0", "2x0.5", "4x0.25", "0.5+0.25+0.25", "3x1/3", "0.3+0.7"]


def brute_force_time(flops, capacities):
    """Slowest device's time of the best injective placement of parts on devices, by enumeration."""
    return min(
        max(f / capacities[d] for f, d in zip(flops, devices))
        for devices in itertools.permutations(range(len(capacities)), len(flops))
    )


@pytest.mark.parametrize("capacities", [[1], [2, 1, 1], [1, 3], [1, 1, 1, 1], [1, 2, 4, 8, 0.5], [5, 1, 1, 1]])
def test_choice_is_the_fastest_placement(capacities):
    flops = {s: [float(w) ** 2 * 100 + 7 * j for j, w in enumerate(Switch.parse(s).widths)] for s in SWITCHES}
    result = plan(capacities, SWITCHES, flops=flops)
    fits = [s for s in SWITCHES if Switch.parse(s).num_devices <= len(capacities)]
    best = {s: brute_force_time(flops[s], capacities) for s in fits}
    assert {str(c.switch) for c in result.candidates} == set(fits)
    assert [str(s) for s in result.skipped] == [s for s in SWITCHES if s not in fits]
    for c in result.candidates:
        assert c.time == pytest.approx(best[str(c.switch)])  # sorted pairing is optimal
        assert len(set(c.devices)) == len(c.devices)  # one part per device
    assert result.choice.time == pytest.approx(min(best.values()))


def test_larger_parts_go_to_faster_devices():
    result = plan([1, 4, 2], ["0.5+0.25+0.25", "1x1.0"])
    choice = result.choice
    assert str(choice.switch) == "0.5+0.25+0.25"
    assert choice.devices[0] == 1  # the 0.5 part on the capacity-4 device
    assert choice.time == pytest.approx(0.25**2 / 1)  # a 0.25 part on the capacity-1 device is slowest


def test_ties_are_broken_by_accuracy():
    switches = ["2x0.5", "1x0.5"]  # on two equal devices both finish after 0.25
    assert str(plan([1, 1], switches).switch) == "2x0.5"  # no accuracy: switch-set order
    assert str(plan([1, 1], switches, accuracy={"2x0.5": 0.80, "1x0.5": 0.85}).switch) == "1x0.5"
    assert str(plan([1, 1], switches, accuracy={"2x0.5": 0.90, "1x0.5": 0.85}).switch) == "2x0.5"
    # accuracy never beats time
    assert str(plan([1, 1], ["1x1.0", "2x0.5"], accuracy={"1x1.0": 0.99, "2x0.5": 0.5}).switch) == "2x0.5"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="capacities must be positive"):
        plan([1, 0], SWITCHES)
    with pytest.raises(ValueError, match="no switch of .* fits 1 device"):
        plan([3], ["2x0.5", "4x0.25"])
    with pytest.raises(ValueError, match="need 2 part FLOPs for switch 2x0.5"):
        plan([1, 1], ["2x0.5"], flops={"2x0.5": [1.0]})


def test_part_flops_come_from_split():
    model = models.resnet20(10, ["1x1.0", "2x0.5"], width_mult=0.5)
    flops = part_flops(model, model.switches, (3, 8, 8))
    assert flops[Switch.parse("2x0.5")] == tuple(s.flops for s in split(model, "2x0.5").stats((3, 8, 8)))
    # sub-networks of half width cost about a quarter each (stem and classifier scale linearly)
    assert 0.2 < flops[Switch.parse("2x0.5")][0] / flops[Switch.parse("1x1.0")][0] < 0.3


def _checkpoint(tmp_path, accuracy=None):
    model = models.mobilenet_v1(10, ["1x1.0", "2x0.5", "0.5+0.25+0.25", "4x0.25"], width_mult=0.25, small_input=True)
    with torch.no_grad():  # something other than the initial state, to see it load
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    path = tmp_path / "model.pt"
    save_checkpoint(
        path,
        model,
        "mobilenet_v1",
        dict(num_classes=10, width_mult=0.25, small_input=True),
        input_shape=(3, 16, 16),
        accuracy=accuracy,
    )
    return model, path


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    model, path = _checkpoint(tmp_path, accuracy={"2x0.5": 0.9})
    raw = torch.load(path, weights_only=True)
    assert raw["model"] == "mobilenet_v1" and raw["switches"] == ["1x1.0", "2x0.5", "0.5+0.25+0.25", "4x0.25"]
    loaded, info = load_checkpoint(path)
    assert not loaded.training and info["input_shape"] == [3, 16, 16] and info["accuracy"] == {"2x0.5": 0.9}
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        save_checkpoint(tmp_path / "x.pt", model, "vgg", {})
    with pytest.raises(ValueError, match="accuracy given for switches"):
        save_checkpoint(tmp_path / "x.pt", model, "mobilenet_v1", {}, accuracy={"3x1/3": 0.5})
    torch.save({"state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a paradis_fast checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_plan_command_prints_the_choice_and_table(tmp_path, capsys):
    from paradis_fast.cli import main

    model, path = _checkpoint(tmp_path)
    main(["plan", "--capacities", "2,1,1", "--checkpoint", str(path)])
    out = capsys.readouterr().out
    expected = plan([2, 1, 1], model.switches, flops=part_flops(model, model.switches, (3, 16, 16)))
    assert f"run switch {expected.switch}" in out
    assert "4x0.25           needs 4 devices" in out
    assert len([line for line in out.splitlines() if line.startswith("*")]) == 1
    assert str(expected.switch) == "0.5+0.25+0.25"  # the unequal switch suits unequal devices
