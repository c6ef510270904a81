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


class _FakeClock:
    """A stand-in for the `time` module whose clock moves only when a timed function says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _calls_taking(clock, seconds, log=None):
    """A function whose k-th call takes seconds[k] on the fake clock."""
    durations = iter(seconds)

    def fn():
        if log is not None:
            log.append("fn")
        clock.now += next(durations)

    return fn


def test_cpu_timer_reports_the_median_ms_of_the_timed_calls_after_the_warm_up(monkeypatch):
    """Milliseconds, not seconds; the median (not the mean) of the timed calls; the two warm-up calls (a slow first
    one, as a compiling call is) neither timed nor counted; p20/p80 as the elements at floor(f * n) of the sorted
    times."""
    from vosops.bench import timing

    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    fn = _calls_taking(clock, [0.050, 0.020] + [0.001, 0.004, 0.002, 0.010, 0.003])
    t = timing.measure_ms(fn, "cpu", min_reps=5, max_reps=5, budget_s=1.0, warmup=2)
    assert t["reps"] == 5
    assert t["ms"] == pytest.approx(3.0)
    assert t["p20_ms"] == pytest.approx(2.0) and t["p80_ms"] == pytest.approx(10.0)


def test_cpu_timer_repeats_for_the_budget_and_caps_calls_of_seconds(monkeypatch):
    from vosops.bench import timing

    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    # 1 ms calls: timed until the 50 ms budget is spent, well past min_reps
    t = timing.measure_ms(_calls_taking(clock, [0.001] * 1000), "cpu", min_reps=3, max_reps=200, budget_s=0.05)
    assert t["reps"] in (50, 51) and t["ms"] == pytest.approx(1.0)
    # ... and never more than max_reps
    assert timing.measure_ms(_calls_taking(clock, [0.001] * 1000), "cpu", max_reps=20, budget_s=10.0)["reps"] == 20
    # a first call over half the budget: no more warm-up, three timed calls
    log = []
    t = timing.measure_ms(_calls_taking(clock, [0.6] * 10, log), "cpu", min_reps=5, max_reps=200, budget_s=1.0)
    assert t["reps"] == 3 and len(log) == 4 and t["ms"] == pytest.approx(600.0)


class _FakeCuda:
    """torch.cuda as timing.py uses it, on a fake clock: events read the clock when recorded, and an allocator with
    current and peak bytes (the peak kept from earlier work until reset)."""

    def __init__(self, clock, log):
        self.clock, self.log = clock, log
        self.allocated, self.peak = 100 << 20, 900 << 20
        outer = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = outer.clock.now

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        self.Event = Event

    def synchronize(self):
        pass

    def memory_allocated(self):
        return self.allocated

    def max_memory_allocated(self):
        return self.peak

    def reset_peak_memory_stats(self):
        self.peak = self.allocated

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)


class _FakeFlush:
    def __init__(self, log):
        self.log = log

    def zero_(self):
        self.log.append("flush")


def _fake_torch(clock, log):
    from types import SimpleNamespace

    return SimpleNamespace(cuda=_FakeCuda(clock, log), int8=None,
                           empty=lambda *a, **k: _FakeFlush(log))


def test_cuda_timer_times_each_call_between_events_after_an_l2_flush(monkeypatch):
    """The GPU path (do_bench's method) on fake events: warm-up calls and the estimating call untimed, the L2 flush
    before every timed call and outside its events, the median of end - start in ms."""
    from vosops.bench import timing

    clock, log = _FakeClock(), []
    monkeypatch.setattr(timing, "torch", _fake_torch(clock, log))
    # 2 warm-up calls (compilation), 1 estimate of 2 ms (a budget of 10.1 ms: 5 repetitions), then the timed calls
    fn = _calls_taking(clock, [0.5, 0.5, 0.002] + [0.001, 0.004, 0.002, 0.010, 0.003], log)
    t = timing.measure_ms(fn, "cuda", min_reps=2, max_reps=200, budget_s=0.0101, warmup=2)
    assert t["reps"] == 5 and t["ms"] == pytest.approx(3.0)
    assert t["p20_ms"] == pytest.approx(2.0) and t["p80_ms"] == pytest.approx(10.0)
    assert log == ["fn"] * 3 + ["flush", "fn"] * 5


def test_cuda_peak_memory_is_the_calls_own_high_water_mark(monkeypatch):
    """Peak bytes of one call beyond what was allocated before it: the allocator's peak is reset before the call
    (an earlier, larger peak must not count) and what was allocated before is subtracted."""
    from vosops.bench import timing

    clock, log = _FakeClock(), []
    fake = _fake_torch(clock, log)
    monkeypatch.setattr(timing, "torch", fake)

    def fn():  # a 30 MB transient, 10 MB of it kept as the output
        fake.cuda.alloc(30 << 20)
        fake.cuda.alloc(-(20 << 20))
        return "out"

    assert timing.peak_extra_bytes(fn, "cuda") == 30 << 20


def test_cpu_peak_memory_places_allocations_at_an_ops_start_and_releases_at_its_end(monkeypatch):
    """On given profiler events: an op's net allocation counts from its start, a net release from its end, and a
    release and an allocation at the same instant overlap, so the peak is over- rather than under-counted."""
    from types import SimpleNamespace

    import torch.profiler

    from vosops.bench.timing import peak_extra_bytes

    MB = 2**20
    ev = lambda start, end, own: SimpleNamespace(self_cpu_memory_usage=own,  # noqa: E731
                                                 time_range=SimpleNamespace(start=start, end=end))
    events = [ev(0, 1, 4 * MB),   # allocates a
              ev(2, 5, -4 * MB),  # frees a: at its end, t=5
              ev(5, 6, 3 * MB),   # allocates b at its start, t=5: a and b counted together
              ev(7, 8, 0)]

    class FakeProfile:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    assert peak_extra_bytes(lambda: None, "cpu") == 7 * MB
