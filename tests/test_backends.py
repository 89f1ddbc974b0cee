"""Backend choice (DESIGN §4): automatic, forced by use_backend(name) or PARADIS_BACKEND, and the
errors of a forced backend that cannot run."""

from __future__ import annotations

import pytest
import torch

from paradis_fast.ops import (
    Backend,
    available_backends,
    backend_for,
    backends,
    forced_backend,
    reference,
    register_backend,
    sliced_conv2d,
    switch_batch_norm,
    use_backend,
)

CPU = torch.device("cpu")
OPS = ("sliced_conv2d", "switch_batch_norm")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """These tests decide what is forced; a PARADIS_BACKEND of the caller's environment must not leak in."""
    monkeypatch.delenv("PARADIS_BACKEND", raising=False)


def _automatic(op: str) -> str:
    """What automatic choice must pick on CPU tensors: the C++ kernels when built, else the reference."""
    return "cpu" if "cpu" in available_backends(op, "cpu") else "reference"


def kernels_for(op: str, device: torch.device) -> str:
    return backend_for(op, device).name


def _conv_inputs():
    return torch.randn(4, 6, 5, 5), torch.randn(8, 6, 3, 3), torch.randn(8)


def _bn_inputs():
    return torch.randn(4, 7, 3, 3), torch.randn(2, 7), torch.randn(2, 7), torch.zeros(2, 7), torch.ones(2, 7)


def test_available_backends_lists_reference():
    for op in (None, *OPS):
        names = available_backends(op)
        assert "reference" in names
        assert set(names) <= {backend.name for backend in backends.BACKENDS}
        assert "cuda" not in available_backends(op, "cpu"), "the cuda backend cannot run CPU tensors"
    assert set(available_backends("sliced_conv2d")) | set(available_backends("switch_batch_norm")) == set(
        available_backends()
    )


@pytest.mark.parametrize("op", OPS)
def test_automatic_choice(op):
    assert forced_backend() is None
    assert kernels_for(op, CPU) == _automatic(op)


@pytest.mark.parametrize("op", OPS)
def test_use_backend_forces_reference(op):
    with use_backend("reference"):
        assert forced_backend() == "reference"
        assert kernels_for(op, CPU) == "reference"
    assert forced_backend() is None
    assert kernels_for(op, CPU) == _automatic(op)


def test_use_backend_reaches_the_implementation(monkeypatch):
    """The ops really run the forced backend (observed through spies on the reference module), and
    autograd differentiates it: no kernel of the paradis op library runs."""
    calls = []
    for name in ("sliced_conv2d", "switch_batch_norm"):
        original = getattr(reference, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, name, spy)
    with use_backend("reference"), torch.profiler.profile() as prof:
        x, w, b = (t.requires_grad_() for t in _conv_inputs())
        sliced_conv2d(x, w, b, ["2x0.5", "1x1.0"], padding=1).sum().backward()
        x, w, b, rm, rv = _bn_inputs()
        x.requires_grad_()
        switch_batch_norm(x, w, b, rm, rv, ["2x0.5", "1x1.0"], True).square().sum().backward()
    assert calls == ["sliced_conv2d", "switch_batch_norm"]
    assert not [event.name for event in prof.events() if event.name.startswith("paradis")]


def test_registered_backend_is_forced_by_name_and_never_chosen_automatically(monkeypatch):
    calls = []

    class Loop:
        @staticmethod
        def sliced_conv2d(*args):
            calls.append("sliced_conv2d")
            return reference.sliced_conv2d(*args)

    monkeypatch.setattr(backends, "BACKENDS", list(backends.BACKENDS))
    register_backend(Backend("loop", ("cpu",), ("sliced_conv2d",), implementation=Loop, automatic=False))
    with pytest.raises(ValueError, match="already registered"):
        register_backend(Backend("loop", ("cpu",), ("sliced_conv2d",), implementation=Loop))
    assert "loop" in available_backends("sliced_conv2d") and "loop" not in available_backends("switch_batch_norm")
    assert kernels_for("sliced_conv2d", CPU) == _automatic("sliced_conv2d")
    x = torch.randn(4, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    with use_backend("loop"):
        y = sliced_conv2d(x, torch.randn(8, 6, 3, 3), None, ["2x0.5", "1x1.0"], padding=1)
        with pytest.raises(RuntimeError, match=r"'loop' cannot run switch_batch_norm on cpu: it does not implement"):
            switch_batch_norm(*_bn_inputs(), ["2x0.5", "1x1.0"], True)
    assert calls == ["sliced_conv2d"]
    assert y.is_contiguous(memory_format=torch.channels_last), "a Python backend's y comes back in x's layout"


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown paradis backend 'fastest'.*choose from.*'reference'"):
        with use_backend("fastest"):
            pass
    assert forced_backend() is None


def test_environment_variable_forces(monkeypatch):
    monkeypatch.setenv("PARADIS_BACKEND", "reference")
    assert forced_backend() == "reference"
    for op in OPS:
        assert kernels_for(op, CPU) == "reference"
    monkeypatch.setenv("PARADIS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"'cuda' cannot run sliced_conv2d on cpu: it runs on cuda tensors"):
        sliced_conv2d(*_conv_inputs(), ["1x1.0"])
    with use_backend("reference"):  # use_backend wins over the environment
        assert kernels_for("sliced_conv2d", CPU) == "reference"
    monkeypatch.setenv("PARADIS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"unknown paradis backend 'nonsense'.*choose from"):
        kernels_for("sliced_conv2d", CPU)
    monkeypatch.setenv("PARADIS_BACKEND", "")
    assert forced_backend() is None
    assert kernels_for("sliced_conv2d", CPU) == _automatic("sliced_conv2d")


@pytest.mark.parametrize("op", OPS)
def test_forced_backend_that_cannot_run_says_why(op):
    with use_backend("cuda"):
        with pytest.raises(
            RuntimeError, match=rf"paradis backend 'cuda' cannot run {op} on cpu: it runs on cuda tensors, not cpu"
        ):
            kernels_for(op, CPU)
        with pytest.raises(RuntimeError, match=r"'cuda' cannot run .* on cpu"):
            if op == "sliced_conv2d":
                sliced_conv2d(*_conv_inputs(), ["2x0.5"])
            else:
                switch_batch_norm(*_bn_inputs(), ["2x0.5", "1x1.0"], True)


@pytest.mark.parametrize("op", OPS)
def test_forced_cpu_backend_runs_or_says_why(op):
    """'cpu' works where the C++ extension serves the op; elsewhere forcing it is an error with the reason."""
    if "cpu" in available_backends(op, "cpu"):
        with use_backend("cpu"):
            assert kernels_for(op, CPU) == "cpu"
    else:
        reason = backends.backend("cpu").unavailable_reason(op, CPU)
        assert reason and ("not built" in reason or "no CPU kernel" in reason)
        with use_backend("cpu"), pytest.raises(RuntimeError, match=r"'cpu' cannot run " + op):
            kernels_for(op, CPU)


def test_use_backend_none_restores_automatic_choice():
    with use_backend("cuda"):
        with use_backend(None):
            assert forced_backend() is None
            assert kernels_for("sliced_conv2d", CPU) == _automatic("sliced_conv2d")
            y = sliced_conv2d(*_conv_inputs(), ["2x0.5"], padding=1)
            assert y.shape == (4, 8, 5, 5)
        assert forced_backend() == "cuda"


def test_nesting_restores_the_outer_backend():
    assert forced_backend() is None
    with use_backend("reference"):
        with use_backend("cuda"):
            assert forced_backend() == "cuda"
            with use_backend("reference"):
                assert forced_backend() == "reference"
            assert forced_backend() == "cuda"
        assert forced_backend() == "reference"
        with pytest.raises(KeyError):
            with use_backend("cuda"):
                raise KeyError("boom")
        assert forced_backend() == "reference", "an exception inside the block must restore the outer backend"
    assert forced_backend() is None


@pytest.mark.parametrize("backend", available_backends("sliced_conv2d"))
def test_every_conv_backend_agrees_with_reference(backend):
    _, w, b = _conv_inputs()
    switches = ["2x0.5", "0.5+0.25+0.25", "1x0.5"]
    x = torch.randn(12, 6, 5, 5)
    with use_backend("reference"):
        expected = sliced_conv2d(x, w, b, switches, padding=1)
    with use_backend(backend):
        got = sliced_conv2d(x, w, b, switches, padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", available_backends("switch_batch_norm"))
def test_every_bn_backend_agrees_with_reference(backend):
    x, w, b, rm, rv = _bn_inputs()
    with use_backend("reference"):
        rm_r, rv_r = rm.clone(), rv.clone()
        expected = switch_batch_norm(x, w, b, rm_r, rv_r, ["2x0.5", "1x0.5"], True, activation="relu")
    with use_backend(backend):
        got = switch_batch_norm(x, w, b, rm, rv, ["2x0.5", "1x0.5"], True, activation="relu")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv_r, rtol=1e-6, atol=1e-6)
