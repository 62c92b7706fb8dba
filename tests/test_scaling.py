import numpy as np
import pandas as pd
import pytest

from newllm.analysis import fit_power_law, plot_power_law  # the public path, as docs/analysis.md documents it
from newllm.errors import ScalingError


def _synthetic(a: float, b: float, c: float, seeds: int, noise: float) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = np.geomspace(1e3, 1e6, 6)
    rows = [{"N": x, "seed": s, "L": (a * x ** -b + c) * float(np.exp(rng.normal(0, noise)))}
            for s in range(seeds) for x in n]
    return pd.DataFrame(rows)


def test_fit_recovers_a_and_b_exactly_without_noise():
    fit = fit_power_law(_synthetic(12.0, 0.3, 0.0, 1, 0.0), "N", "L")
    assert fit.a == pytest.approx(12.0, rel=1e-9)
    assert fit.b == pytest.approx(0.3, rel=1e-9)
    assert fit.c == 0.0


def test_fit_with_offset_recovers_c():
    fit = fit_power_law(_synthetic(20.0, 0.4, 1.5, 1, 0.0), "N", "L", offset=True)
    assert fit.c == pytest.approx(1.5, abs=1e-3)
    assert fit.b == pytest.approx(0.4, rel=1e-2)
    assert fit.a == pytest.approx(20.0, rel=5e-2)


def test_ci_over_seeds_covers_true_b():
    fit = fit_power_law(_synthetic(12.0, 0.3, 0.0, 4, 0.02), "N", "L")
    assert fit.n_seeds == 4 and fit.n_points == 24
    assert 0 < fit.ci95_b < 0.05
    assert abs(fit.b - 0.3) < fit.ci95_b + 0.01


def test_one_seed_bootstrap_ci_is_finite_and_plot_draws():
    df = _synthetic(12.0, 0.3, 0.0, 1, 0.02)
    fit = fit_power_law(df, "N", "L")
    assert 0 < fit.ci95_b < 0.1
    fig = plot_power_law(df, "N", "L", fit)
    assert fig.axes[0].get_xscale() == "log"


def test_too_few_points_is_one_clear_error():
    with pytest.raises(ScalingError, match="distinct positive values of N"):
        fit_power_law(pd.DataFrame({"N": [10.0, 10.0], "L": [1.0, 2.0]}), "N", "L")
