"""plan(): the fastest switch, or the most accurate within a latency budget, counting communication
and memory; the checkpoint format; the plan CLI."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from paradis_fast import Switch, models
from paradis_fast.deploy import load_checkpoint, part_costs, part_flops, plan, save_checkpoint, split

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


POOL = [*SWITCHES, "1x0.5", "0.25+0.75"]


def expected_choice(capacities, switches, accuracy, flops, budget, min_accuracy, bandwidth, exchanged, memory, sizes):
    """(switch, time) by the rules, trying every switch and every placement of its parts on the
    devices; None when no switch qualifies, "over budget" when none meets the budget."""
    times = {}
    for s in switches:
        k = Switch.parse(s).num_devices
        if k > len(capacities) or (min_accuracy is not None and accuracy.get(s, -math.inf) < min_accuracy):
            continue
        comm = exchanged[s] / bandwidth if bandwidth is not None and exchanged is not None and k > 1 else 0.0
        fitting = [
            max(f / capacities[d] for f, d in zip(flops[s], devices))
            for devices in itertools.permutations(range(len(capacities)), k)
            if memory is None or all(b <= memory[d] for b, d in zip(sizes[s], devices))
        ]
        if fitting:
            times[s] = min(fitting) + comm
    if not times:
        return None
    if budget is None:
        best = min(times, key=lambda s: (times[s], -accuracy.get(s, -math.inf)))
    elif not any(t <= budget for t in times.values()):
        return "over budget"
    else:
        best = max((s for s in times if times[s] <= budget), key=lambda s: (accuracy.get(s, -math.inf), -times[s]))
    return best, times[best]


def table_rows(table: str) -> dict[str, str]:
    """The table's rows by switch (rows start with the choice's mark or a space)."""
    return {line[1:].split()[0]: line for line in table.splitlines() if line[:1] in "* "}


def test_choice_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    outcomes = {"fastest": 0, "within budget": 0, "over budget": 0, "none qualifies": 0, "memory moved a part": 0}
    for _ in range(200):
        capacities = [rng.uniform(0.5, 4) for _ in range(rng.randint(1, 4))]
        switches = rng.sample(POOL, rng.randint(1, len(POOL)))
        flops = {s: [rng.uniform(1, 100) for _ in Switch.parse(s).widths] for s in switches}
        sizes = {s: [rng.uniform(1, 8) for _ in Switch.parse(s).widths] for s in switches}
        accuracy = {s: rng.uniform(0.5, 1) for s in switches if rng.random() < 0.7}
        exchanged = rng.choice([None, {s: rng.uniform(0, 100) for s in switches}])
        bandwidth = rng.choice([None, rng.uniform(1, 20)])
        memory = rng.choice([None, rng.uniform(2, 10), [rng.uniform(2, 10) for _ in capacities]])
        per_device = [memory] * len(capacities) if isinstance(memory, float) else memory
        min_accuracy = rng.choice([None, None, rng.uniform(0.5, 0.9)])
        budget = rng.choice([None, rng.uniform(5, 150)])
        args = (capacities, switches, accuracy, flops, budget, min_accuracy, bandwidth, exchanged, per_device, sizes)
        expected = expected_choice(*args)
        kwargs = dict(
            min_accuracy=min_accuracy,
            latency_budget=budget,
            bandwidth=bandwidth,
            exchanged_bytes=exchanged,
            memory=memory,
            part_bytes=sizes if memory is not None else None,
        )
        if expected is None:
            outcomes["none qualifies"] += 1
            with pytest.raises(ValueError, match="no switch"):
                plan(capacities, switches, accuracy, flops, **kwargs)
        elif expected == "over budget":
            outcomes["over budget"] += 1
            with pytest.raises(ValueError, match="meets the latency budget"):
                plan(capacities, switches, accuracy, flops, **kwargs)
        else:
            outcomes["fastest" if budget is None else "within budget"] += 1
            choice = plan(capacities, switches, accuracy, flops, **kwargs).choice
            assert (choice.switch, choice.time) == (Switch.parse(expected[0]), pytest.approx(expected[1]))
            parts = flops[expected[0]]
            assert len(set(choice.devices)) == len(parts)
            if per_device is not None:
                assert all(b <= per_device[d] for b, d in zip(sizes[expected[0]], choice.devices))
                unconstrained = plan(capacities, [expected[0]], flops={expected[0]: parts}).choice
                outcomes["memory moved a part"] += choice.devices != unconstrained.devices
    assert min(outcomes.values()) >= 5, outcomes  # every rule was exercised


def test_a_latency_budget_buys_accuracy():
    switches, accuracy = ["1x1.0", "2x0.5", "4x0.25"], {"1x1.0": 0.92, "2x0.5": 0.90, "4x0.25": 0.84}
    assert str(plan([1, 1, 1, 1], switches, accuracy).switch) == "4x0.25"  # no budget: the fastest, 1/16
    result = plan([1, 1, 1, 1], switches, accuracy, latency_budget=0.3)
    assert str(result.switch) == "2x0.5" and result.choice.time == pytest.approx(0.25)
    rows = table_rows(result.table())
    assert rows["2x0.5"].startswith("*") and rows["2x0.5"].endswith("chosen: most accurate within budget")
    assert rows["1x1.0"].endswith("over budget") and rows["4x0.25"].endswith("less accurate")
    assert "latency budget 0.3" in result.table()
    assert str(plan([1, 1, 1, 1], switches, accuracy, latency_budget=1).switch) == "1x1.0"
    # without accuracy figures a budget keeps the fastest
    assert str(plan([1, 1, 1, 1], switches, latency_budget=1).switch) == "4x0.25"


def test_nothing_within_the_budget_names_the_fastest():
    with pytest.raises(
        ValueError, match=r"no switch meets the latency budget 0\.05: the fastest, 4x0\.25, takes 0\.0625"
    ):
        plan([1, 1, 1, 1], ["1x1.0", "2x0.5", "4x0.25"], latency_budget=0.05)


def test_memory_excludes_a_switch_and_moves_parts():
    sizes = {"1x1.0": [12.3e6], "2x0.5": [6e6, 6e6], "0.3+0.7": [2e6, 7e6]}
    result = plan([4, 1], sizes, memory=8e6, part_bytes=sizes)
    assert [str(c.switch) for c in result.excluded] == ["1x1.0"]
    assert result.excluded[0].why == "part 0 needs 12.3 MB > 8 MB"
    assert "part 0 needs 12.3 MB > 8 MB" in result.table() and "6 MB/8 MB" in result.table()
    # the fast device holds only 3 MB: the 0.7 part must go to the slow one, at 0.7 / 1
    result = plan([4, 1], ["0.3+0.7"], flops={"0.3+0.7": [0.3, 0.7]}, memory=[3e6, 8e6], part_bytes=sizes)
    assert result.choice.devices == (0, 1) and result.choice.time == pytest.approx(0.7)
    assert plan([4, 1], ["0.3+0.7"], flops={"0.3+0.7": [0.3, 0.7]}).choice.devices == (1, 0)
    # the table shows the fullest device, by share of its memory, not the largest part
    result = plan([1, 1], ["0.3+0.7"], memory=[8e6, 2e6], part_bytes={"0.3+0.7": [1.8e6, 6e6]})
    assert result.choice.devices == (1, 0) and result.choice.memory_use == (1.8e6, 2e6)
    assert "1.8 MB/2 MB" in result.table()
    with pytest.raises(ValueError, match="2x0.5: 2 parts need >= 6 MB, 1 device\\(s\\) hold that"):
        plan([4, 1], ["2x0.5"], memory=[8e6, 3e6], part_bytes=sizes)


def test_min_accuracy_excludes():
    accuracy = {"1x1.0": 0.9, "2x0.5": 0.61}
    result = plan([1, 1], ["1x1.0", "2x0.5", "0.3+0.7"], accuracy, min_accuracy=0.7)
    assert str(result.switch) == "1x1.0"
    assert {str(c.switch): c.why for c in result.excluded} == {
        "2x0.5": "accuracy 0.61 < 0.7",
        "0.3+0.7": "accuracy unknown",
    }
    assert "accuracy 0.61 < 0.7" in result.table() and "accuracy unknown" in result.table()
    with pytest.raises(ValueError, match="no switch is eligible: 2x0.5: accuracy 0.61 < 0.95"):
        plan([1, 1], ["2x0.5"], accuracy, min_accuracy=0.95)


def test_bandwidth_makes_four_devices_lose_to_two():
    switches, sent = ["1x1.0", "2x0.5", "4x0.25"], {"2x0.5": 40, "4x0.25": 120}
    assert str(plan([1] * 4, switches, exchanged_bytes=sent).switch) == "4x0.25"  # communication free
    result = plan([1] * 4, switches, bandwidth=200, exchanged_bytes=sent)
    assert str(result.switch) == "2x0.5" and result.choice.time == pytest.approx(0.25 + 40 / 200)
    four = next(c for c in result.candidates if str(c.switch) == "4x0.25")
    assert (four.compute, four.communication, four.time) == pytest.approx((1 / 16, 0.6, 1 / 16 + 0.6))
    one = next(c for c in result.candidates if str(c.switch) == "1x1.0")
    assert one.communication == 0  # one device exchanges nothing
    assert "bytes exchanged unknown" in plan([1] * 4, switches, bandwidth=200).table()


def test_without_the_new_arguments_nothing_changes():
    result = plan([2, 1, 1], SWITCHES, {"2x0.5": 0.9})
    assert str(result.switch) == "3x1/3" and result.choice.time == pytest.approx(1 / 9)  # 0.5+0.25+0.25: 1/8
    assert [str(s) for s in result.skipped] == ["4x0.25"] and not result.excluded
    for c in result.candidates:
        assert c.communication is None and c.time == c.compute and c.memory_use is None
    assert "comm: not modelled (no bandwidth given)" in result.table()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bandwidth=-1), "bandwidth must be a positive finite number, got -1"),
        (dict(bandwidth=math.nan), "bandwidth must be a positive finite number, got nan"),
        (dict(latency_budget=0), "latency_budget must be a positive finite number, got 0"),
        (dict(min_accuracy=math.inf), "min_accuracy must be a finite number, got inf"),
        (dict(memory=[1e6], part_bytes={}), "memory: 1 values for 2 devices; give one per device or one for all"),
        (dict(memory=[1e6, -1], part_bytes={}), "memory must be a positive finite number, got -1"),
        (dict(memory=1e6), "memory: give part_bytes too"),
        (dict(part_bytes={"2x0.5": [1.0]}), "part_bytes: need 2 part bytes for switch 2x0.5"),
        (dict(exchanged_bytes={}), "exchanged_bytes: no figure for switch 2x0.5"),
        (dict(exchanged_bytes={"2x0.5": math.nan}), "exchanged_bytes of switch 2x0.5 must be a non-negative finite"),
    ],
)
def test_bad_new_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        plan([1, 1], ["2x0.5"], **kwargs)


def test_memory_search_is_limited_to_eight_devices():
    sizes = {"1x1.0": [1.0]}
    assert plan([1] * 8, ["1x1.0"], memory=1, part_bytes=sizes).choice.devices == (0,)
    assert plan([1] * 9, ["1x1.0"]).choice.devices == (0,)  # no memory: no limit
    with pytest.raises(ValueError, match="at most 8 devices"):
        plan([1] * 9, ["1x1.0"], memory=1, part_bytes=sizes)


def test_part_costs_come_from_split():
    model = models.resnet20(10, ["1x1.0", "2x0.5", "0.3+0.7"], width_mult=0.5)
    costs = part_costs(model, model.switches, (3, 8, 8))
    for switch in model.switches:
        split_ = split(model, switch)
        stats = split_.stats((3, 8, 8))
        assert costs.flops[switch] == tuple(s.flops for s in stats)
        assert costs.part_bytes[switch] == tuple(4 * sum(p.numel() for p in part.parameters()) for part in split_.parts)
    assert costs.exchanged_bytes == {Switch.parse("1x1.0"): 0, Switch.parse("2x0.5"): 40, Switch.parse("0.3+0.7"): 40}


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
    assert [line.split() for line in out.splitlines() if "4x0.25" in line] == [
        ["4x0.25", *"-" * 6, "needs", "4", "devices"]
    ]
    assert len([line for line in out.splitlines() if line.startswith("*")]) == 1
    assert str(expected.switch) == "0.5+0.25+0.25"  # the unequal switch suits unequal devices


def test_plan_command_weighs_budget_bandwidth_and_memory(tmp_path, capsys):
    from paradis_fast.cli import main

    accuracy = {"1x1.0": 0.92, "2x0.5": 0.90, "0.5+0.25+0.25": 0.89, "4x0.25": 0.84}
    model, path = _checkpoint(tmp_path, accuracy)
    costs = part_costs(model, model.switches, (3, 16, 16))
    assert costs.part_bytes[Switch.parse("1x1.0")] == (851584,)  # float32 weights
    argv = ["plan", "--checkpoint", str(path), "--capacities", "2e9,1e9,1e9,1e9", "--bandwidth", "1MB"]
    main([*argv, "--latency-budget", "1e-3", "--memory", "500kB", "--min-accuracy", "0.85"])
    out = capsys.readouterr().out
    expected = plan(
        [2e9, 1e9, 1e9, 1e9],
        model.switches,
        accuracy,
        costs.flops,
        min_accuracy=0.85,
        latency_budget=1e-3,
        bandwidth=1e6,
        exchanged_bytes=costs.exchanged_bytes,
        memory=500e3,
        part_bytes=costs.part_bytes,
    )
    assert out == f"devices of capacity 2e+09, 1e+09, 1e+09, 1e+09: run switch 2x0.5\n{expected.table()}\n"
    rows = table_rows(out)
    assert rows["2x0.5"].startswith("*") and rows["2x0.5"].endswith("chosen: most accurate within budget")
    assert rows["1x1.0"].endswith("part 0 needs 852 kB > 500 kB")
    assert rows["4x0.25"].endswith("accuracy 0.84 < 0.85")
    assert "0.5+0.25+0.25" in rows and "comm = bytes exchanged per image / bandwidth 1 MB per time unit" in out
    # a tighter budget leaves only the faster unequal switch
    main([*argv, "--latency-budget", "4e-4"])
    assert "run switch 0.5+0.25+0.25" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--memory", "8XB"], "argument --memory: '8XB' is not a size such as 8MB, 512KiB or 8000000"),
        (["--bandwidth", "1MB,2MB"], "argument --bandwidth: '1MB,2MB': give one size, not a list"),
        (["--latency-budget", "-1"], "argument --latency-budget: '-1': must be a positive number"),
        (["--latency-budget", "1e-12"], "no switch meets the latency budget 1e-12: the fastest, 0.5+0.25+0.25, takes"),
        (["--memory", "1MB,1MB"], "memory: 2 values for 3 devices; give one per device or one for all"),
        (["--min-accuracy", "0.5"], "no switch is eligible: 1x1.0: accuracy unknown;"),
    ],
)
def test_plan_command_reports_bad_flags_in_one_line(tmp_path, capsys, flags, message):
    from paradis_fast.cli import main

    _, path = _checkpoint(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["plan", "--checkpoint", str(path), "--capacities", "2,1,1", *flags])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
