"""The local_attention benchmark module: its users'-glue baseline computes the op (so speed-ups compare like with
like), and every configuration builds runnable cases."""

import pytest
import torch

import vosops
from vosops.bench import local_attention as bench
from vosops.bench.registry import OPS


@pytest.mark.parametrize(
    "kw",
    [
        dict(radius=2, topk=5),
        dict(radius=2, topk=4, normalize="threshold"),
        dict(radius=3, topk=6, window="circle"),
        dict(radius=2),
    ],
)
def test_glue_matches_reference_without_offsets(kw, monkeypatch):
    monkeypatch.setattr(bench, "_GLUE_CHUNK", 2000)  # several row bands at this size
    B, C, H, W, N = 2, 4, 7, 9, 2
    q = torch.randn(B, C, H, W, dtype=torch.float64)
    k = torch.randn(B, N, C, H, W, dtype=torch.float64)
    v = torch.randn(B, N, 3, H, W, dtype=torch.float64)
    out = bench.glue_local_attention(q, k, v, border="zero", **kw)
    ref = vosops.reference.local_attention(q, k, v, border="zero", **kw)
    torch.testing.assert_close(out, ref)


def test_configs_cover_the_issue_and_build_cases():
    assert "local_attention" in OPS
    names = set(bench.CONFIGS)
    for base in ("mamp-480p", "ino-480p", "crw-480p", "mamp-train"):
        assert base in names and f"{base}-quarter" in names
    cases = bench.cases("cpu")
    assert {c.config for c in cases} == {n for n in names if n.endswith("-quarter")}
    assert all(any(c.baseline for c in cases if c.config == cfg) for cfg in {c.config for c in cases})
    assert any(c.direction == "fwd+bwd" for c in cases)


def test_a_small_case_runs(monkeypatch):
    """Shrink one configuration to a toy size and run every implementation's setup once."""
    monkeypatch.setitem(bench.CONFIGS, "toy", ((1, 8, 3, 6, 7, 2, dict(radius=2, topk=4, scale=0.5, border="zero"),
                                                True, False), ("cpu",)))
    monkeypatch.setattr(bench, "CONFIGS", {"toy": bench.CONFIGS["toy"]})
    for case in bench.cases("cpu"):
        out = case.setup()()
        assert torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")  # deliberate here
def test_flex_attention_baseline_computes_the_masked_single_reference_op():
    """The FlexAttention baseline (neighbourhood block mask) is the op with border="mask", N=1, no top-k; checked
    uncompiled here (compiling takes a minute on this CPU), the benchmark compiles the same function."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    assert "mamp-train-masked" in bench.CONFIGS and "mamp-train-masked-quarter" in bench.CONFIGS
    B, C, Cv, H, W, r = 2, 8, 3, 9, 11, 2
    q, k, v = torch.randn(B, C, H, W), torch.randn(B, 1, C, H, W), torch.rand(B, 1, Cv, H, W)
    flex = bench.flex_local_attention_fn(H, W, r, "cpu", compile=False)
    out = flex(q, k, v, scale=0.3)
    ref = vosops.reference.local_attention(q.double(), k.double(), v.double(), radius=r, scale=0.3, border="mask")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_configurations_are_the_issues():
    """Issue 3's benchmark configurations, and the quarter sizes the README quotes (q (1, 64, 30, 54), 0.455 GFLOP
    with the in-frame candidate count)."""
    spec = lambda name: bench.CONFIGS[name][0]  # noqa: E731
    assert spec("mamp-480p")[:6] == (1, 64, 7, 120, 214, 5) and spec("mamp-480p")[7:] == (True, False)
    assert spec("mamp-480p")[6] == dict(radius=12, topk=36, scale=1 / 8, border="zero")
    assert spec("ino-480p")[:6] == (1, 384, 7, 60, 106, 11) and spec("ino-480p")[7:] == (False, True)
    assert spec("ino-480p")[6] == dict(radius=40, topk=5, normalize="threshold", scale=10.0)
    assert spec("crw-480p")[:6] == (1, 128, 7, 60, 107, 20) and spec("crw-480p")[7:] == (False, True)
    assert spec("crw-480p")[6] == dict(radius=12, topk=10, window="circle", scale=20.0)
    assert spec("mamp-train")[:6] == (24, 64, 3, 64, 64, 1) and spec("mamp-train")[6] == dict(radius=6, scale=1 / 8,
                                                                                                border="zero")
    assert spec("mamp-480p-quarter")[:6] == (1, 64, 7, 30, 54, 5)
    assert spec("ino-480p-quarter")[3:5] == (15, 27)
    assert bench._flops(spec("mamp-480p-quarter")) / 1e9 == pytest.approx(0.455, abs=5e-4)
    # softmax over all 169 candidates: every one in frame counts
    B, C, Cv, H, W = spec("mamp-train")[:5]
    in_frame = sum(max(0, H - abs(dy)) * max(0, W - abs(dx)) for dy in range(-6, 7) for dx in range(-6, 7))
    assert bench._flops(spec("mamp-train")) == 2.0 * B * in_frame * C + 2.0 * B * in_frame * Cv
    t, _ = bench._inputs(spec("mamp-480p-quarter"), "cpu")
    assert t["offsets"].shape == (1, 5, 2, 30, 54) and (t["offsets"].min(), t["offsets"].max()) == (-16, 16)


def test_every_group_compares_with_one_baseline():
    """The glue in every group but the FlexAttention one, whose forward compares with compiled FlexAttention (on
    CPU its forward+backward, which FlexAttention lacks there, with the reference)."""
    from vosops.bench import local_affinity

    for device in ("cpu", "cuda"):
        groups = {}
        for c in bench.cases(device) + local_affinity.cases(device):
            groups.setdefault((c.op, c.config, c.direction), []).append(c)
        for (op, config, direction), cs in groups.items():
            base = [c.impl for c in cs if c.baseline]
            if not config.startswith("mamp-train-masked"):
                expected = ["glue"]
            elif direction == "fwd" or device == "cuda":
                expected = ["flex_attention"]
            else:
                expected = ["reference"]
            assert base == expected, (device, op, config, direction)


def test_local_affinity_configurations_are_mamps():
    from vosops.bench import local_affinity as la

    assert la.CONFIGS["mamp-480p"] == ((1, 64, 7, 120, 214, 5, 12, 1 / 8, True), ("cuda",))
    assert la.CONFIGS["mamp-train"] == ((24, 64, 3, 64, 64, 1, 6, 1 / 8, False), ("cuda",))
    assert la.CONFIGS["mamp-480p-quarter"] == ((1, 64, 7, 30, 54, 5, 12, 1 / 8, True), ("cpu", "cuda"))
    assert {c.direction for c in la.cases("cpu") if c.config == "mamp-train-quarter"} == {"fwd", "fwd+bwd"}
