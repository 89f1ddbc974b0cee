"""Serving over torch.distributed: torchrun with 2 and 4 gloo processes, and the fault-tolerant
coordinator surviving a killed and a hung worker, from the checkpoint and from exported part
files (each process opening only the files of the parts it runs). Every output is checked against
the single-process model for the switch that served it."""

from __future__ import annotations

import ast
import os
import shutil
import signal
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paradis_fast.cli import main as paradis
from paradis_fast.deploy import load_checkpoint, save_checkpoint, split
from paradis_fast.deploy.failover import Coordinator
from paradis_fast.deploy.parts import PartsDir
from paradis_fast.deploy.serve import DistributedSplit

from test_deploy_split import trained_model

SWITCHES = ["1x1.0", "2x0.5", "4x0.25", "3x1/3", "0.5+0.25+0.25"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, shape = trained_model("mobilenet_v1", SWITCHES)
    path = tmp_path_factory.mktemp("serve") / "model.pt"
    save_checkpoint(
        path, model.float(), "mobilenet_v1", dict(num_classes=7, width_mult=0.25, small_input=True), input_shape=shape
    )
    return path


def assert_served_correctly(model, image, output, switch):
    with torch.no_grad():
        expected = model.set_active([switch])(image)[0]
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "processes, options, switch",
    [
        (2, ["--switch", "2x0.5"], "2x0.5"),
        (4, ["--switch", "4x0.25"], "4x0.25"),
        (3, ["--fault-tolerant"], "3x1/3"),  # through the store; the switch planned for 3 equal devices
    ],
)
def test_torchrun_processes_equal_the_single_process_model(checkpoint, tmp_path, processes, options, switch):
    out = tmp_path / "served.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "paradis_fast.deploy.serve",
        "--checkpoint",
        str(checkpoint),
        *options,
        "--batches",
        "3",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served 3 batches of 2 images" in result.stdout
    model, _ = load_checkpoint(checkpoint)
    served = torch.load(out, weights_only=True)
    assert len(served) == 3
    for request in served:
        assert request["switch"] == switch
        assert_served_correctly(model, request["image"], request["output"], switch)


# The server, run by `python -c` so that the process records every .pt file it opens and prints
# their paths at exit: the proof that it reads only its own part files.
AUDITED_SERVE = """
import atexit, runpy, sys
opened = []
sys.addaudithook(lambda event, args: event == "open" and str(args[0]).endswith(".pt") and opened.append(str(args[0])))
atexit.register(lambda: print("opened", opened, flush=True))
runpy.run_module("paradis_fast.deploy.serve", run_name="__main__", alter_sys=True)
"""


def files_opened(stdout: str) -> list[list[str]]:
    """Each process's list of the .pt files it opened, as `AUDITED_SERVE` prints it."""
    lines = [line.removeprefix("opened ") for line in stdout.splitlines() if line.startswith("opened ")]
    return [ast.literal_eval(line) for line in lines]


def export_parts_without_checkpoint(checkpoint, out, switches: str):
    """Export `switches` of a copy of the checkpoint to `out`, then delete the copy."""
    copy = out.parent / "only-for-export.pt"
    shutil.copy(checkpoint, copy)
    paradis(["export", "--checkpoint", str(copy), "--format", "parts", "--switch", switches, "--out", str(out)])
    copy.unlink()


def test_torchrun_processes_serve_from_their_own_part_files(checkpoint, tmp_path):
    parts, out = tmp_path / "parts", tmp_path / "served.out"
    export_parts_without_checkpoint(checkpoint, parts, "2x0.5,1x1.0")
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("--no-python", sys.executable, "-c", AUDITED_SERVE),
        *("--parts", str(parts), "--switch", "2x0.5", "--batches", "3", "--batch-size", "2", "--out", str(out)),
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served 3 batches of 2 images" in result.stdout
    assert sorted(files_opened(result.stdout)) == [
        [f"{parts}/2x0.5/part0.pt", f"{parts}/2x0.5/fusion.pt"],  # the root
        [f"{parts}/2x0.5/part1.pt"],
    ]
    model, _ = load_checkpoint(checkpoint)
    served = torch.load(out, weights_only=True)
    assert [request["switch"] for request in served] == ["2x0.5"] * 3
    for request in served:
        assert_served_correctly(model, request["image"], request["output"], "2x0.5")


def decode(frame):
    return frame.to(torch.float32).div(255).sub(0.5)


def serve_frames(rank, world, path, port, frames, results):
    """One of `world` gloo processes: rank 1 is the root; uint8 frames travel, each rank decodes."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _ = load_checkpoint(path)
        runner = DistributedSplit(split(model, "2x0.5"), root=1, preprocess=decode)
        outputs = [runner(frame.clone() if rank == 1 else torch.zeros_like(frame)) for frame in frames]
        if rank == 1:
            results.put([output.numpy() for output in outputs])  # by value: the process ends
    finally:
        dist.destroy_process_group()


def test_distributed_split_decodes_broadcast_frames_on_every_rank(checkpoint):
    """A non-zero root, uint8 frames with a decode step, and requests of two shapes interleaved,
    so that both the first request of a shape and the later (gather posted before the root's own
    part) ones are checked."""
    generator = torch.Generator().manual_seed(2)
    model, info = load_checkpoint(checkpoint)
    frames = [
        torch.randint(0, 256, (batch, *info["input_shape"]), dtype=torch.uint8, generator=generator)
        for batch in (1, 3, 1, 3, 1)
    ]
    results = mp.get_context("spawn").SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(serve_frames, (2, str(checkpoint), port, frames, results), nprocs=2, start_method="spawn")
    outputs = results.get()
    assert len(outputs) == len(frames)
    for frame, output in zip(frames, outputs):
        assert_served_correctly(model, decode(frame), torch.from_numpy(output), "2x0.5")


def test_torchrun_rejects_a_switch_with_another_device_count(checkpoint):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "paradis_fast.deploy.serve",
        "--checkpoint",
        str(checkpoint),
        "--switch",
        "4x0.25",
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "switch 4x0.25 has 4 parts but the process group has 2 ranks" in result.stderr


def test_coordinator_survives_a_killed_and_a_hung_worker(checkpoint):
    """Rank 0 (this process) coordinates ranks 1-3; rank 3 is killed, later rank 2 hangs.

    The 8 s timeout leaves live workers ample time on a loaded 2-core machine."""
    model, info = load_checkpoint(checkpoint)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    workers = {
        rank: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "paradis_fast.deploy.serve",
                "--checkpoint",
                str(checkpoint),
                "--fault-tolerant",
                "--rank",
                str(rank),
                "--world-size",
                "4",
                "--store-port",
                str(store.port),
            ],
            env=ENV,
        )
        for rank in (1, 2, 3)
    }
    log = []
    try:
        coordinator = Coordinator(
            store, model, workers, info["input_shape"], timeout=8.0, startup=120.0, log=log.append
        )
        generator = torch.Generator().manual_seed(1)
        answers = []
        for i in range(12):
            if i == 4:
                workers[3].kill()  # a device dies between requests: the next one is sent to it
            if i == 8:
                os.kill(workers[2].pid, signal.SIGSTOP)  # a device stops answering
            image = torch.randn(2, *info["input_shape"], generator=generator)
            answer = coordinator.infer(image)
            answers.append(answer)
            assert_served_correctly(model, image, answer.output, str(answer.switch))
        coordinator.close()
        os.kill(workers[2].pid, signal.SIGCONT)
        for rank in (1, 2):
            assert workers[rank].wait(timeout=60) == 0
    finally:
        for process in workers.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
    served = [(str(a.switch), tuple(sorted(a.ranks)), a.retries) for a in answers]
    assert served[:4] == [("4x0.25", (0, 1, 2, 3), 0)] * 4
    assert served[4] == ("3x1/3", (0, 1, 2), 1)  # re-planned for the 3 survivors, same request answered
    assert served[5:8] == [("3x1/3", (0, 1, 2), 0)] * 3
    assert served[8] == ("2x0.5", (0, 1), 1)
    assert served[9:] == [("2x0.5", (0, 1), 0)] * 3
    assert any("ranks [3] sent no partial output within 8.0s" in line for line in log)


def test_coordinator_rejects_a_switch_that_does_not_fit(checkpoint):
    model, info = load_checkpoint(checkpoint)
    store = dist.HashStore()
    with pytest.raises(ValueError, match="switch 2x0.5 needs 2 devices, 1 are live"):
        Coordinator(store, model, [], info["input_shape"], switch="2x0.5", log=lambda _: None)
    with pytest.raises(ValueError, match="timeout must be positive"):
        Coordinator(store, model, [], info["input_shape"], timeout=0)


def test_coordinator_fails_over_onto_other_part_files(checkpoint, tmp_path):
    """Rank 0 (this process) and workers 1, 2 serve 3x1/3 from part files; rank 2 is killed and
    the switch re-planned to 2x0.5, so rank 1 loads its part of 2x0.5 from that part's file."""
    parts = tmp_path / "parts"
    export_parts_without_checkpoint(checkpoint, parts, "3x1/3,2x0.5")
    model, info = load_checkpoint(checkpoint)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    workers = {
        rank: subprocess.Popen(
            [
                *(sys.executable, "-c", AUDITED_SERVE, "--parts", str(parts), "--fault-tolerant"),
                *("--rank", str(rank), "--world-size", "3", "--store-port", str(store.port)),
            ],
            env=ENV,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 2)
    }
    log = []
    try:
        coordinator = Coordinator(
            store,
            PartsDir(parts, log=log.append),
            workers,
            info["input_shape"],
            timeout=8.0,
            startup=120.0,
            log=log.append,
        )
        generator = torch.Generator().manual_seed(1)
        answers = []
        for i in range(4):
            if i == 2:
                workers[2].kill()
            image = torch.randn(2, *info["input_shape"], generator=generator)
            answers.append(coordinator.infer(image))
            assert_served_correctly(model, image, answers[-1].output, str(answers[-1].switch))
        coordinator.close()
        stdout, _ = workers[1].communicate(timeout=60)
        assert workers[1].returncode == 0
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
    served = [(str(a.switch), sorted(a.ranks), a.retries) for a in answers]
    assert served == [("3x1/3", [0, 1, 2], 0)] * 2 + [("2x0.5", [0, 1], 1), ("2x0.5", [0, 1], 0)]
    placed = {str(a.switch): a.ranks for a in answers}  # the rank of each part

    def file(switch, rank=None):
        name = "fusion" if rank is None else f"part{placed[switch].index(rank)}"
        return f"{parts}/{switch.replace('/', '_')}/{name}.pt"

    assert files_opened(stdout) == [[file("3x1/3", 1), file("2x0.5", 1)]]  # the checkpoint: never
    assert f"rank 1: loaded part {placed['2x0.5'].index(1)} of switch 2x0.5 from {file('2x0.5', 1)}" in stdout
    loaded = [line.split(" from ")[1].split(" (")[0] for line in log if line.startswith("loaded")]
    assert loaded == [file("3x1/3", 0), file("3x1/3"), file("2x0.5", 0), file("2x0.5")]
