"""benchmarks/batch_scaling.py's arithmetic: steps to a target (interpolated between
evaluations), the fit of S(B) = S_min (1 + B_noise / B), and the pooled noise scale; and the
noise estimator's raw estimates that the study pools, on a problem with a known noise scale."""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from conftest import ROOT


@pytest.fixture(scope="module")
def bs():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark imports its sibling common.py
    spec = importlib.util.spec_from_file_location("batch_scaling", ROOT / "benchmarks" / "batch_scaling.py")
    mod = sys.modules["batch_scaling"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_steps_to_interpolates_between_evaluations(bs):
    curve = [(10, 6.0), (20, 5.0), (30, 4.5)]
    assert bs.steps_to(curve, 5.0) == 20
    assert bs.steps_to(curve, 4.75) == pytest.approx(25)
    assert bs.steps_to(curve, 6.5) == 10          # reached at the first evaluation: no earlier point
    assert bs.steps_to(curve, 4.0) is None
    assert bs.steps_to([(10, 5.0), (20, 5.5), (30, 4.0)], 4.5) == pytest.approx(20 + 10 / 1.5)  # the first crossing


def test_fit_recovers_s_min_and_b_noise(bs):
    s_min, b_noise = 300.0, 12_000.0
    batches = [1024, 4096, 16384, 65536]
    steps = [s_min * (1 + b_noise / b) for b in batches]
    got = bs.fit(batches, steps)
    assert got[0] == pytest.approx(s_min, rel=1e-9) and got[1] == pytest.approx(b_noise, rel=1e-9)
    # noisy points: within a few percent
    noisy = [s * f for s, f in zip(steps, (1.03, 0.97, 1.02, 0.99))]
    got = bs.fit(batches, noisy)
    assert got[1] == pytest.approx(b_noise, rel=0.15)
    assert bs.fit([1024], [500]) is None
    assert bs.fit([1024, 2048], [100, 300]) is None  # more steps at the larger batch: no positive S_min


def test_pooled_noise_is_a_ratio_of_means_inside_the_window(bs):
    m = [(5.2, 100.0, 1.0), (5.05, 300.0, 2.0), (4.95, 500.0, 4.0), (4.5, 1e9, 1.0)]
    value, n = bs.pooled_noise(m, 5.0, 0.1)
    assert n == 2 and value == pytest.approx(400.0 / 3.0)
    assert bs.pooled_noise(m, 3.0, 0.1) == (None, 0)


def test_run_plan_scales_lr_by_the_square_root_rule_and_accumulates(bs):
    p = bs.PRESETS["cpu"]
    r = bs.run_plan(p, 65536)
    assert r["seqs"] == 1024 and r["micro"] == p["micro_max"] and r["accum"] == 1024 // p["micro_max"]
    assert r["lr"] == pytest.approx(min(p["lr_cap"], p["lr0"] * 8))
    assert bs.run_plan(p, 1024)["lr"] == p["lr0"]
    assert r["eval_batches"] * r["micro"] * p["seq_len"] == p["val_tokens"]  # the same validation tokens at every batch


def test_raw_noise_estimates_match_linear_regression_closed_form():
    """y = x.w* + noise on standard-normal x: at w = 0 the per-example gradient of the squared
    error /2 is -x y, so G = -w* and tr(Sigma) = d sigma^2 + |w*|^2 (d + 1) in closed form;
    NoiseScale.update returns each measurement's own (tr(Sigma), |G|^2), which the study pools."""
    from codistill.noise import NoiseScale
    torch.manual_seed(0)
    d, sigma = 8, 2.0
    w_star = torch.randn(d)
    g2_true = float(w_star.square().sum())
    trace_true = d * sigma ** 2 + g2_true * (d + 1)
    ns, traces, g2s = NoiseScale(), [], []
    b, B = 64, 256
    for _ in range(400):
        x = torch.randn(B, d)
        y = x @ w_star + sigma * torch.randn(B)
        per = -(x * y[:, None])                              # per-example gradients at w = 0
        small = float(sum(part.mean(0).square().sum() for part in per.chunk(B // b))) / (B // b)
        big = float(per.mean(0).square().sum())
        t, g = ns.update(small, big, b, B)
        traces.append(t)
        g2s.append(g)
    assert sum(traces) / len(traces) == pytest.approx(trace_true, rel=0.1)
    assert sum(g2s) / len(g2s) == pytest.approx(g2_true, rel=0.1)
    assert math.isfinite(ns.value) and ns.value > 0
