"""The test harness itself: poisoning really poisons, relayout keeps values, comparisons can fail."""

import pytest
import torch

from vosops import _alloc, testing


def test_native_outputs_are_poisoned_only_inside_the_block():
    with testing.poisoned_outputs():
        f = torch.ops.vosops._new_output([3, 4], torch.float32)
        i = torch.ops.vosops._new_output([5], torch.int64)
    assert torch.isnan(f).all()
    assert (i == -7777).all()
    g = torch.ops.vosops._new_output([1000], torch.float32)
    assert g.shape == (1000,)  # no poisoning outside the block (contents unspecified)


def test_poisoning_blocks_nest_and_overlap_across_threads():
    """An inner block, or another thread's block, ending must not turn poisoning off while a block is still open
    (it used to: one global flag set to False by whichever block ended first)."""
    import threading

    poisoned = lambda: bool(torch.isnan(_alloc.empty(4, dtype=torch.float32, device="cpu")).all())  # noqa: E731
    with testing.poisoned_outputs():
        with testing.poisoned_outputs():
            pass
        assert poisoned() and torch.isnan(torch.ops.vosops._new_output([4], torch.float32)).all()
        entered, release = threading.Event(), threading.Event()

        def other():
            with testing.poisoned_outputs():
                entered.set()
                release.wait()

        t = threading.Thread(target=other)
        t.start()
        entered.wait()
        release.set()
        t.join()
        assert poisoned()
    assert not _alloc._POISON


def test_python_outputs_are_poisoned():
    with testing.poisoned_outputs():
        t = _alloc.empty(2, 3, dtype=torch.float16, device="cpu")
    assert torch.isnan(t).all()


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
def test_relayout_keeps_values(layout):
    x = torch.randn(2, 3, 4, 5)
    y = testing.relayout(x, layout)
    assert torch.equal(x, y)
    if layout == "noncontiguous":
        assert not y.is_contiguous()
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_check_against_reference_catches_an_unwritten_element():
    def leaky(x):
        out = _alloc.empty(*x.shape, dtype=x.dtype, device=x.device)
        out[..., :-1] = x[..., :-1] * 2  # forgets the last column
        return out

    with pytest.raises(AssertionError):
        testing.check_against_reference(leaky, lambda x: x * 2, {"x": torch.randn(3, 4)}, dtype=torch.float32)


def test_check_against_reference_catches_a_wrong_gradient():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 3

        @staticmethod
        def backward(ctx, g):
            return g * 2

    with pytest.raises(AssertionError, match="grad of x"):
        testing.check_against_reference(WrongGrad.apply, lambda x: x * 3, {"x": torch.randn(4)},
                                        dtype=torch.float64, grad_inputs=("x",))


def test_cpu_peak_memory_counts_each_buffer_once():
    """The profiler charges a buffer to every op above its allocation (clone -> empty_like -> empty): each must
    count once, transients must count, and buffers freed in between must not add up."""
    from vosops.bench.timing import peak_extra_bytes

    MB = 2**20
    x = torch.randn(256, 1024)  # 1 MB

    def sequence():
        a = torch.empty(3 * MB // 4)
        b = torch.empty(2 * MB // 4)
        del a
        c = torch.empty(MB // 4)
        return b, c

    assert peak_extra_bytes(lambda: torch.empty(256, 1024), "cpu") == MB
    assert peak_extra_bytes(lambda: x.clone(), "cpu") == MB
    assert MB <= peak_extra_bytes(lambda: x.t().contiguous(), "cpu") < 1.1 * MB
    assert 4 * MB <= peak_extra_bytes(lambda: x.repeat(4, 1).sum(0), "cpu") < 4.1 * MB  # a 4 MB transient
    assert peak_extra_bytes(sequence, "cpu") == 5 * MB
    assert peak_extra_bytes(lambda: x.view(-1), "cpu") == 0


def test_cpu_device_name_names_the_model():
    """Results JSON must say which CPU measured them: platform.processor() is empty on Linux."""
    import os

    from vosops.bench.runner import cpu_model, device_name

    name = device_name("cpu")
    assert name.endswith(f", {torch.get_num_threads()} threads")
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            assert cpu_model() == models[0] and name.startswith(models[0])
