"""The installed package: imports from anywhere, falls back without the extension, CLI, README/CI."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_imports_from_outside_the_repository(tmp_path):
    done = _python(
        "import paradis_fast, paradis_fast.kernels, paradis_fast.ops as ops\n"
        "print(paradis_fast.__file__); print(paradis_fast.kernels.__file__)\n"
        "print(ops.available_backends('switch_batch_norm'))",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    package, kernels, backends = done.stdout.splitlines()
    assert pathlib.Path(package).parent == ROOT / "paradis_fast"
    assert pathlib.Path(kernels).parent == ROOT / "kernels"
    assert "cpu" in backends, f"the C++ extension did not load: {done.stderr}"


def test_without_extension_reference_backend_serves_and_says_so_once(tmp_path):
    done = _python(
        "import sys, warnings, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'paradis_fast._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "x = torch.randn(4, 3, 5, 5)\n"
        "w, b = torch.ones(2, 3), torch.zeros(2, 3)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import paradis_fast as pf\n"
        "    for _ in range(3):\n"
        "        pf.ops.switch_batch_norm(x, w, b, torch.zeros(2, 3), torch.ones(2, 3), ['1x1.0', '2x0.5'], True)\n"
        "print(sum('not built' in str(c.message) for c in caught), pf.ops.available_backends())",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "['reference']"]


def test_cli_trains_and_writes_metrics(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "paradis_fast",
            "train",
            "--epochs",
            "1",
            "--width-mult",
            "0.25",
            "--switches",
            "1x1.0,2x0.5",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["switches"]) == {"1x1.0", "2x0.5"}
    assert all(0 <= m["accuracy"] <= 1 for m in metrics["switches"].values())
    assert "final validation accuracy" in done.stdout


def test_cli_help_and_bad_switch():
    assert (
        "train"
        in subprocess.run([sys.executable, "-m", "paradis_fast", "--help"], capture_output=True, text=True).stdout
    )
    done = subprocess.run(
        [sys.executable, "-m", "paradis_fast", "train", "--switches", "2x0.75"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "sum to 3/2 > 1" in done.stderr


def _readme_command(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split(heading, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return block.strip()


def test_ci_runs_the_readme_test_command():
    command = _readme_command("Run the tests")
    assert command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("heading", ["Run the main job", "Run the tests"])
def test_readme_commands_install_the_cpu_torch(heading):
    assert "pip install torch==2.13.0" in _readme_command(heading)


@pytest.mark.parametrize(
    "preset, first_import, expected",
    [
        ({}, "paradis_fast", "1000"),
        ({"GOMP_SPINCOUNT": "7"}, "paradis_fast", "7"),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "paradis_fast", None),
        ({}, "torch", None),  # libgomp already loaded: setting it would mislead
    ],
)
def test_openmp_spin_count_default_only_where_it_takes_effect(tmp_path, preset, first_import, expected):
    code = f"import os, {first_import}, paradis_fast; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = _python(code, tmp_path, env={**env, **preset})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(expected)
