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
