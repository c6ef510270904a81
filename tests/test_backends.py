"""Backend selection, availability errors and the native build."""

import pathlib

import pytest
import torch

import vosops
from vosops import _backends, _native


def _inputs():
    return torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 5)


def test_native_extension_loaded():
    # CI builds the extension; a silent fallback to Python would hide a broken build.
    assert _native.LOADED, _native.LOAD_ERROR
    assert "flow_warp" in _backends._KERNELS["CPU"]


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    assert _backends.select("flow_warp", torch.device("cpu")) == "cpu"


def test_use_backend_context_manager_nests_and_restores():
    assert vosops.current_backend() == "auto"
    with vosops.use_backend("reference"):
        assert _backends.select("flow_warp", torch.device("cpu")) == "reference"
        with vosops.use_backend("cpu"):
            assert _backends.select("flow_warp", torch.device("cpu")) == "cpu"
        assert vosops.current_backend() == "reference"
    assert vosops.current_backend() == "auto"


def test_per_call_backend_beats_context():
    x, f = _inputs()
    with vosops.use_backend("reference"):
        assert _backends.select("flow_warp", x.device, "cpu") == "cpu"
        torch.testing.assert_close(vosops.flow_warp(x, f, backend="cpu"), vosops.flow_warp(x, f))


def test_unknown_backend_is_a_value_error():
    x, f = _inputs()
    with pytest.raises(ValueError, match="backend must be"):
        vosops.flow_warp(x, f, backend="metal")
    with pytest.raises(ValueError, match="backend must be"):
        with vosops.use_backend("metal"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_backend_on_cpu_tensors_explains():
    x, f = _inputs()
    with pytest.raises(vosops.BackendUnavailableError, match="CUDA tensors"):
        vosops.flow_warp(x, f, backend="cuda")


def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setattr(_backends, "TRITON_INTERPRET", False)
    x, f = _inputs()
    with pytest.raises(vosops.BackendUnavailableError, match="TRITON_INTERPRET"):
        vosops.flow_warp(x, f, backend="triton")


def test_missing_native_kernels_explain(monkeypatch):
    monkeypatch.setitem(_backends._KERNELS, "CPU", frozenset())
    x, f = _inputs()
    with pytest.raises(vosops.BackendUnavailableError, match="pip install --no-build-isolation"):
        vosops.flow_warp(x, f, backend="cpu")
    # auto falls back to the reference instead of failing
    assert _backends.select("flow_warp", x.device) == "reference"


def test_import_without_native_extension_warns_and_falls_back(tmp_path):
    """A build without the native part still imports: one warning, and auto uses the reference."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules['vosops._C'] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            import vosops, torch
        msgs = [str(x.message) for x in w if 'native extension' in str(x.message)]
        assert len(msgs) == 1, msgs
        x = torch.randn(1, 1, 3, 3); f = torch.zeros(1, 2, 3, 3)
        assert torch.equal(vosops.flow_warp(x, f), x)
        print('ok')
        """
    )
    env_path = str(pathlib.Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=env_path)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_import_without_triton_works_and_reports_it():
    """vosops must import on a machine without triton; the triton backend then explains what is missing."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        sys.modules['triton'] = None  # as if triton were not installed
        import importlib.util
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == 'triton' else real_find_spec(name, *a)
        import torch, vosops
        from vosops import _backends
        assert not _backends.TRITON_INSTALLED
        x = torch.randn(1, 1, 3, 3); f = torch.zeros(1, 2, 3, 3)
        try:
            vosops.flow_warp(x, f, backend='triton')
        except vosops.BackendUnavailableError as e:
            assert 'pip install triton' in str(e), e
        else:
            raise AssertionError('expected BackendUnavailableError')
        print('ok')
        """
    )
    root = str(pathlib.Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_use_backend_is_per_thread():
    """One thread's use_backend block neither shows in another thread nor pops the other's setting on exit."""
    import threading

    a_in, b_in, a_out, b_done = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with vosops.use_backend("cpu"):
            seen["a"] = _backends.current_backend()
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def thread_b():
        a_in.wait(5)
        seen["b_before"] = _backends.current_backend()
        with vosops.use_backend("reference"):
            b_in.set()
            a_out.wait(5)
            seen["b_after_a_left"] = _backends.current_backend()
        seen["b_end"] = _backends.current_backend()
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": "cpu", "b_before": "auto", "b_after_a_left": "reference", "b_end": "auto"}
    assert _backends.current_backend() == "auto"


def test_auto_never_picks_triton_for_float64(monkeypatch):
    """Every Triton kernel takes fp32/fp16/bf16: with triton first usable, auto sends float64 to the reference."""
    monkeypatch.setattr(_backends, "why_unusable", lambda b, op, d: None if b in ("triton", "reference") else "no")
    monkeypatch.setitem(_backends.AUTO_ORDER, "cpu", ("triton", "reference"))
    for op in ("flow_warp", "global_topk", "kmeans_step"):
        assert _backends.select(op, torch.device("cpu"), dtype=torch.float64) == "reference"
        assert _backends.select(op, torch.device("cpu"), dtype=torch.float32) == "triton"
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(vosops.flow_warp(x, torch.zeros_like(x)), x)  # not a TypeError from the triton op


def test_use_backend_blocks_exiting_out_of_order():
    """Blocks held open in two generators, closed in the order they were opened: the later block stays in force
    until it exits itself (popping the top entry would leave the earlier block's backend in force instead)."""

    def block(name):
        with vosops.use_backend(name):
            yield _backends.current_backend()
            yield _backends.current_backend()

    first, second = block("cpu"), block("reference")
    assert next(first) == "cpu"
    assert next(second) == "reference"
    next(first, None)
    next(first, None)  # the "cpu" block exits while "reference" is still open
    assert _backends.current_backend() == "reference"
    assert next(second) == "reference"
    next(second, None)
    assert _backends.current_backend() == "auto"


def test_auto_overrides_on_cuda(monkeypatch):
    """Catches a change of the benchmark-backed AUTO_OVERRIDES (triton first for local/topk attention on CUDA)."""
    monkeypatch.setattr(_backends, "why_unusable", lambda b, op, d: None)
    cuda = torch.device("cuda")
    assert _backends.select("topk_attention", cuda, dtype=torch.float32) == "triton"
    assert _backends.select("local_attention", cuda, dtype=torch.float32) == "triton"
    assert _backends.select("global_topk", cuda, dtype=torch.float32) == "cuda"
    assert _backends.select("topk_attention", cuda, dtype=torch.float64) == "cuda"


def test_select_refuses_a_backend_the_op_does_not_support():
    """Catches select's `name not in supported` check (unreachable through today's public ops, which list all four)."""
    with pytest.raises(ValueError, match="not implemented for this op"):
        _backends.select("some_op", torch.device("cpu"), "cpu", supported=("reference",))
