"""runs/bench_distributed's statistics of the rounds (issue 26): spread, interval of the mean
ratio and the rounds a given resolution needs, against worked values."""
import pytest

from runs.bench_distributed import describe, ratio_summary


def test_spread_and_rounds_needed_worked_values():
    s = ratio_summary([1.3, 1.0, 1.2, 1.1], resolution=0.05, goal=1.15)
    # mean 1.15; sd = sqrt((0.15² + 0.05² + 0.05² + 0.15²) / 3) = 0.129099
    assert s["n"] == 4 and s["median"] == pytest.approx(1.15) and s["mean"] == pytest.approx(1.15)
    assert (s["min"], s["max"]) == (1.0, 1.3)
    assert s["iqr"] == pytest.approx(1.225 - 1.075)
    assert s["sd"] == pytest.approx(0.129099, abs=1e-6)
    assert s["low"] == pytest.approx(1.15 - 1.96 * 0.129099 / 2, abs=1e-6)
    assert s["high"] == pytest.approx(1.15 + 1.96 * 0.129099 / 2, abs=1e-6)
    assert s["rounds_needed"] == 26          # ceil((1.96 * 0.129099 / 0.05)²) = ceil(25.61)
    assert not s["resolved"]
    assert "not resolved against 1.15; rounds needed for +-0.05: 26" in describe(s, 0.05, 1.15)


def test_a_tight_spread_resolves_the_goal():
    s = ratio_summary([1.01, 1.02, 1.03], resolution=0.05, goal=1.15)
    assert s["sd"] == pytest.approx(0.01) and s["rounds_needed"] == 1
    assert s["resolved"] and s["high"] == pytest.approx(1.02 + 1.96 * 0.01 / 3 ** 0.5)
    assert "below 1.15 with 95 % confidence" in describe(s, 0.05, 1.15)
    above = ratio_summary([1.30, 1.31, 1.32], resolution=0.05, goal=1.15)
    assert above["resolved"] and "above 1.15" in describe(above, 0.05, 1.15)
