"""fintensor.rolling against pandas (random shapes, windows, min_periods, NaN patterns, dtypes, axes),
against exact rational arithmetic on the cases where pandas and bottleneck lose digits, and across
input types (numpy, torch, StockTensor), the torch-op path, ``out=`` and bad input."""
from __future__ import annotations

import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fintensor as ft
from fintensor import rolling
from fintensor.errors import BadInputError

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------ strategies
@st.composite
def panels(draw, max_t: int = 40):
    """A float32/64 array of 1-3 dims with NaN holes, the axis to roll along, and a window."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim - 1, max_size=ndim - 1)))
    axis = draw(st.integers(0, ndim - 1))
    T = draw(st.integers(1, max_t))
    shape = shape[:axis] + (T,) + shape[axis:]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["grid", "walk", "ties"]))
    if kind == "grid":  # exactly representable values: sums are exact in every implementation
        x = rng.integers(-800, 800, size=shape) / 8.0
    elif kind == "walk":
        x = 50.0 + rng.standard_normal(shape).cumsum(axis=axis)
    else:  # few distinct values: ties for ranks, constant windows for var
        x = rng.integers(0, 3, size=shape).astype(float)
    x[rng.random(shape) < draw(st.sampled_from([0.0, 0.1, 0.4]))] = np.nan
    x = x.astype(draw(st.sampled_from([np.float64, np.float32])))
    window = draw(st.integers(1, 12))
    min_periods = draw(st.one_of(st.none(), st.integers(0, window)))
    return x, axis, window, min_periods


def _frame(x: np.ndarray, axis: int) -> pd.DataFrame:
    """The columns of x along ``axis`` as a float64 DataFrame (time down the rows)."""
    moved = np.moveaxis(x.astype(np.float64), axis, 0)
    return pd.DataFrame(moved.reshape(moved.shape[0], -1))


def _back(ref: pd.DataFrame, x: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.empty(x.shape), axis, 0).shape
    return np.moveaxis(ref.to_numpy().reshape(moved), 0, axis)


def assert_matches(ours, ref, x: np.ndarray, scale: float = 1.0) -> None:
    """Same NaN pattern, values equal to float64 rounding (float32: to float32 rounding)."""
    ours = np.asarray(ours)
    assert ours.dtype == x.dtype and ours.shape == np.shape(ref)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    rtol = 1e-9 if x.dtype == np.float64 else 2e-6
    atol = rtol * scale * max(1.0, float(np.nanmax(np.abs(x.astype(float)), initial=0.0)))
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol)


# -------------------------------------------------------------------- moving windows vs pandas
SIMPLE = {  # name -> (ours, pandas, atol scale: the statistic's units relative to the data)
    "sum": (lambda x, **k: rolling.sum(x, **k), lambda r: r.sum(), 12.0),
    "mean": (lambda x, **k: rolling.mean(x, **k), lambda r: r.mean(), 1.0),
    "count": (lambda x, **k: rolling.count(x, **k), lambda r: r.count(), 0.0),
    "min": (lambda x, **k: rolling.min(x, **k), lambda r: r.min(), 0.0),
    "max": (lambda x, **k: rolling.max(x, **k), lambda r: r.max(), 0.0),
    "median": (lambda x, **k: rolling.median(x, **k), lambda r: r.median(), 1.0),
    "quantile": (lambda x, **k: rolling.quantile(x, q=0.3, **k), lambda r: r.quantile(0.3), 1.0),
    "rank": (lambda x, **k: rolling.rank(x, **k), lambda r: r.rank(), 0.0),
    "rank_pct_min_desc": (lambda x, **k: rolling.rank(x, method="min", ascending=False, pct=True, **k),
                          lambda r: r.rank(method="min", ascending=False, pct=True), 0.0),
    "rank_max": (lambda x, **k: rolling.rank(x, method="max", **k), lambda r: r.rank(method="max"), 0.0),
}


@pytest.mark.parametrize("name", sorted(SIMPLE))
@SETTINGS
@given(case=panels())
def test_moving_statistic_equals_pandas(name, case):
    x, axis, window, min_periods = case
    ours_fn, pandas_fn, scale = SIMPLE[name]
    ours = ours_fn(x, window=window, min_periods=min_periods, axis=axis)
    ref = pandas_fn(_frame(x, axis).rolling(window, min_periods=min_periods))
    assert_matches(ours, _back(ref, x, axis), x, scale)


@pytest.mark.parametrize("ddof", [0, 1])
@SETTINGS
@given(case=panels())
def test_var_std_zscore_equal_pandas(ddof, case):
    x, axis, window, min_periods = case
    frame = _frame(x, axis)
    r = frame.rolling(window, min_periods=min_periods)
    var, std, mean = r.var(ddof=ddof), r.std(ddof=ddof), r.mean()
    big = max(1.0, float(np.nanmax(np.abs(x.astype(float)), initial=0.0)))
    kw = dict(window=window, min_periods=min_periods, axis=axis, ddof=ddof)
    assert_matches(rolling.var(x, **kw), _back(var, x, axis), x, scale=big)
    assert_matches(rolling.std(x, **kw), _back(std, x, axis), x, scale=1.0)
    # zscore: pandas' (x - mean) / std, NaN where the window is constant (std 0)
    z = ((frame - mean) / std).where(std > 1e-6 * big)
    ours = rolling.zscore(x, **kw)
    tiny = _back(std <= 1e-6 * big, x, axis).astype(bool)
    np.testing.assert_array_equal(np.isnan(ours[~tiny]), np.isnan(_back(z, x, axis)[~tiny]))
    np.testing.assert_allclose(ours[~tiny], _back(z, x, axis)[~tiny], rtol=1e-6, atol=1e-6)


@SETTINGS
@given(case=panels())
def test_argmax_argmin_are_positions_in_the_window(case):
    x, axis, window, min_periods = case
    frame = _frame(x, axis)
    mp = window if min_periods is None else min_periods
    for fn, pick, fill in ((rolling.argmax, np.argmax, -np.inf), (rolling.argmin, np.argmin, np.inf)):
        def position(a, pick=pick, fill=fill):  # np.argmax of the window, NaN skipped
            return float(pick(np.where(np.isnan(a), fill, a))) if (~np.isnan(a)).sum() >= max(mp, 1) else np.nan
        ref = frame.rolling(window, min_periods=0).apply(position, raw=True)
        assert_matches(fn(x, window, min_periods=min_periods, axis=axis), _back(ref, x, axis), x, 0.0)


@st.composite
def pairs(draw):
    x, axis, window, min_periods = draw(panels())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    y = (0.5 * np.nan_to_num(x.astype(float)) + rng.integers(-40, 40, size=x.shape) / 4.0)
    y[rng.random(x.shape) < 0.15] = np.nan
    return y.astype(x.dtype), x, axis, window, min_periods, draw(st.booleans())


@SETTINGS
@given(case=pairs())
def test_cov_corr_beta_equal_pandas(case):
    y, x, axis, window, min_periods, market = case
    yf = _frame(y, axis)
    if market:  # one market series (length T along the axis) for every column of y
        x_in = _frame(x, axis)[0].to_numpy().astype(x.dtype)
        xf = pd.DataFrame({c: x_in.astype(np.float64) for c in yf.columns})
    else:
        xf, x_in = _frame(x, axis), x
    both = yf.notna() & xf.notna()
    ym, xm = yf.where(both), xf.where(both)
    ry, rx = ym.rolling(window, min_periods=min_periods), xm.rolling(window, min_periods=min_periods)
    flat = (rx.max() - rx.min() == 0) | (ry.max() - ry.min() == 0)  # a constant side: corr undefined
    cov = ry.cov(xm)
    big = max(1.0, float(np.nanmax(np.abs(np.r_[y.ravel(), x.ravel()].astype(float)), initial=0.0)))
    kw = dict(window=window, min_periods=min_periods, axis=axis)
    assert_matches(rolling.cov(y, x_in, **kw), _back(cov, y, axis), y, scale=big)
    assert_matches(rolling.cov(y, x_in, ddof=0, **kw), _back(ry.cov(xm, ddof=0), y, axis), y, scale=big)
    corr = ry.corr(xm).where(~flat)
    beta = (cov / rx.var()).where(rx.max() - rx.min() > 0)
    ours_corr, ours_beta = rolling.corr(y, x_in, **kw), rolling.beta(y, x_in, **kw)
    np.testing.assert_array_equal(np.isnan(ours_corr), np.isnan(_back(corr, y, axis)))
    np.testing.assert_allclose(ours_corr, _back(corr, y, axis), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.isnan(ours_beta), np.isnan(_back(beta, y, axis)))
    np.testing.assert_allclose(ours_beta, _back(beta, y, axis), rtol=1e-6, atol=1e-6)


@st.composite
def ewm_params(draw):
    which = draw(st.sampled_from(["com", "span", "halflife", "alpha"]))
    value = {"com": st.floats(0, 10), "span": st.floats(1, 20), "halflife": st.floats(0.2, 10),
             "alpha": st.floats(0.05, 1)}[which]
    return {which: draw(value), "adjust": draw(st.booleans()), "ignore_na": draw(st.booleans()),
            "min_periods": draw(st.integers(0, 4))}


def _pandas_com1_regression(x: np.ndarray, params: dict) -> bool:
    """pandas 3.0-3.1 special-cases com == 1 (alpha 0.5) with adjust=False, ignore_na=False in a way
    that is wrong once NaN appear (pandas GH#31178, GH#66521: [1, nan, 5] gives 4.0 instead of 2.3's
    3.667); no oracle there, the documented weights are checked by ``test_ewm_nan_weights_by_hand``."""
    com = rolling._center_of_mass(*(params.get(k) for k in ("com", "span", "halflife", "alpha")))
    return (not params["adjust"] and not params["ignore_na"] and abs(com - 1) < 1e-9
            and bool(np.isnan(x).any()))


def test_ewm_nan_weights_by_hand():
    """pandas' documented weights for [x, NaN, y]: (1-alpha)^2 and alpha (adjust=False), (1-alpha)^2 and 1
    (adjust=True), normalised; with ignore_na the gap is skipped: (1-alpha) and alpha."""
    x, y = 1.0, 5.0
    for alpha in (0.5, 0.3):
        data = np.array([x, np.nan, y])
        a = 1 - alpha
        cases = {(False, False): (a * a * x + alpha * y) / (a * a + alpha),
                 (True, False): (a * a * x + y) / (a * a + 1),
                 (False, True): a * x + alpha * y,
                 (True, True): (a * x + y) / (a + 1)}
        for (adjust, ignore_na), want in cases.items():
            got = rolling.ewm_mean(data, alpha=alpha, adjust=adjust, ignore_na=ignore_na)[-1]
            assert got == pytest.approx(want, rel=1e-12), (alpha, adjust, ignore_na)


@SETTINGS
@given(case=panels(), params=ewm_params(), bias=st.booleans())
def test_ewm_equals_pandas(case, params, bias):
    x, axis, _, _ = case
    assume(not _pandas_com1_regression(x, params))
    e = _frame(x, axis).ewm(**params)
    big = max(1.0, float(np.nanmax(np.abs(x.astype(float)), initial=0.0)))
    assert_matches(rolling.ewm_mean(x, axis=axis, **params), _back(e.mean(), x, axis), x)
    assert_matches(rolling.ewm_var(x, axis=axis, bias=bias, **params), _back(e.var(bias=bias), x, axis), x, big)
    assert_matches(rolling.ewm_std(x, axis=axis, bias=bias, **params), _back(e.std(bias=bias), x, axis), x)


@SETTINGS
@given(case=panels(), periods=st.integers(-4, 4), log=st.booleans())
def test_lags_equal_pandas(case, periods, log):
    x, axis, _, _ = case
    frame = _frame(x, axis)
    with np.errstate(all="ignore"):
        ret = np.log(frame / frame.shift(periods)) if log else frame.pct_change(periods, fill_method=None)
        assert_matches(rolling.returns(x, periods, log=log, axis=axis), _back(ret, x, axis), x, 0.0)
    assert_matches(rolling.diff(x, periods, axis=axis), _back(frame.diff(periods), x, axis), x)
    assert_matches(rolling.shift(x, periods, axis=axis), _back(frame.shift(periods), x, axis), x, 0.0)


@SETTINGS
@given(case=panels(), method=st.sampled_from(["average", "min", "max"]), ascending=st.booleans(),
       pct=st.booleans(), ddof=st.integers(0, 1))
def test_cross_sectional_rank_and_zscore_equal_pandas(case, method, ascending, pct, ddof):
    x, axis, _, _ = case
    if x.ndim == 1:
        x = x[None, :]
    stock = x.ndim - 1 if axis != x.ndim - 1 else 0
    moved = np.moveaxis(x.astype(np.float64), stock, -1)
    frame = pd.DataFrame(moved.reshape(-1, moved.shape[-1]))
    ranks = frame.rank(axis=1, method=method, ascending=ascending, pct=pct).to_numpy()
    mean, sd = frame.mean(axis=1), frame.std(axis=1, ddof=ddof)
    z = frame.sub(mean, axis=0).div(sd.where(sd > 0), axis=0).to_numpy()
    back = lambda a: np.moveaxis(a.reshape(moved.shape), -1, stock)  # noqa: E731
    assert_matches(rolling.cs_rank(x, axis=stock, method=method, ascending=ascending, pct=pct), back(ranks), x, 0)
    ours = rolling.cs_zscore(x, axis=stock, ddof=ddof)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(back(z)))
    np.testing.assert_allclose(ours, back(z), rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------- exactness where others lose digits
def _exact_var(values, ddof: int = 1) -> Fraction:
    xs = [Fraction(float(v)) for v in values]
    mu = sum(xs) / len(xs)
    return sum((v - mu) ** 2 for v in xs) / (len(xs) - ddof)


def _exact_windows(x: np.ndarray, window: int, every: int):
    for t in range(window - 1, len(x), every):
        yield t, x[t - window + 1:t + 1]


@pytest.mark.parametrize("window", [20, 250])
def test_std_of_a_large_price_moving_by_little_is_exact(window):
    rng = np.random.default_rng(7)
    x = (1e6 + 1e-3 * rng.standard_normal((1000, 2))).round(6)  # a price of 1e6 moving by 1e-3
    ours_std, ours_var = rolling.std(x, window), rolling.var(x, window)
    for t, win in _exact_windows(x, window, 47):
        for j in range(x.shape[1]):
            exact = _exact_var(win[:, j])
            assert abs(Fraction(float(ours_var[t, j])) - exact) <= Fraction(1, 10**12) * exact
            assert math.isclose(ours_std[t, j], math.sqrt(exact), rel_tol=1e-12)
    z = rolling.zscore(x, window)
    t, win = next(_exact_windows(x[-window:], window, 1))
    exact_z = (Fraction(float(win[-1, 0])) - sum(map(Fraction, win[:, 0].tolist())) / window) \
        / Fraction(math.sqrt(_exact_var(win[:, 0])))
    assert math.isclose(z[-1, 0], float(exact_z), rel_tol=1e-9)


def test_nothing_is_left_behind_after_a_spike():
    rng = np.random.default_rng(3)
    x = 100.0 + rng.standard_normal((600, 3))
    x[200, :] = 1e12  # a spike: add/remove running sums keep a residue of its rounding errors
    y = 2.0 * x + rng.standard_normal(x.shape)
    sums, means, stds = rolling.sum(x, 20), rolling.mean(x, 20), rolling.std(x, 20)
    covs, betas = rolling.cov(y, x, 20), rolling.beta(y, x, 20)
    for t, win in _exact_windows(x, 20, 7):
        if 200 in range(t - 19, t + 1):
            continue
        for j in range(3):
            xs = [Fraction(float(v)) for v in win[:, j]]
            ys = [Fraction(float(v)) for v in y[t - 19:t + 1, j]]
            assert math.isclose(sums[t, j], float(sum(xs)), rel_tol=1e-15)
            assert math.isclose(means[t, j], float(sum(xs) / 20), rel_tol=1e-15)
            var = _exact_var(win[:, j])
            assert math.isclose(stds[t, j], math.sqrt(var), rel_tol=1e-12)
            mx, my = sum(xs) / 20, sum(ys) / 20
            cov = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / 19
            assert math.isclose(covs[t, j], float(cov), rel_tol=1e-12)
            assert math.isclose(betas[t, j], float(cov / var), rel_tol=1e-12)


def test_pandas_and_bottleneck_lose_digits_where_fintensor_does_not():
    """The motivating cases, to keep the claim in the README honest."""
    import bottleneck as bn  # the dev extra

    rng = np.random.default_rng(1)
    x = 100.0 + rng.standard_normal((400, 1))
    x[100] = 1e12
    after = slice(150, 400)
    exact = np.array([math.sqrt(_exact_var(x[t - 19:t + 1, 0])) for t in range(150, 400)])
    ours = rolling.std(x, 20)[after, 0]
    theirs = bn.move_std(x, 20, axis=0, ddof=1)[after, 0]
    assert np.max(np.abs(ours / exact - 1)) < 1e-12
    assert np.max(np.abs(theirs / exact - 1)) > 1e-3  # bottleneck: wrong after the spike


# ---------------------------------------------------------------------------- types and layouts
def test_output_follows_the_input_type_shape_and_dtype():
    x = np.random.default_rng(0).standard_normal((30, 3, 2))
    ref = rolling.mean(x, 5)
    for dtype in (np.float32, np.float64):
        res = rolling.mean(x.astype(dtype), 5)
        assert isinstance(res, np.ndarray) and res.dtype == dtype and res.shape == x.shape
        t = rolling.mean(torch.from_numpy(x.astype(dtype)), 5)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.from_numpy(x.astype(dtype)).dtype
        np.testing.assert_allclose(t.numpy(), ref, rtol=1e-6, atol=1e-6)
    # (T, S, F) is rolled as a (T, S*F) panel: each column on its own
    np.testing.assert_allclose(ref[:, 1, 0], pd.Series(x[:, 1, 0]).rolling(5).mean().to_numpy())
    # a 4-D input along another axis; a non-contiguous view
    x4 = np.random.default_rng(1).standard_normal((2, 3, 25, 2))
    np.testing.assert_allclose(rolling.max(x4, 4, axis=2)[1, 2, :, 1],
                               pd.Series(x4[1, 2, :, 1]).rolling(4).max().to_numpy())
    view = x4[:, :, ::2, :]
    np.testing.assert_allclose(rolling.sum(view, 3, axis=-2)[0, 0, :, 0],
                               pd.Series(view[0, 0, :, 0]).rolling(3).sum().to_numpy())
    ints = np.arange(10)
    assert rolling.sum(ints, 3).dtype == np.float64


def _stock_tensor(values: np.ndarray, dims=("time", "stock")):
    coords = {d: (np.arange(np.datetime64("2020-01-01"), np.datetime64("2020-01-01") + n)
                  if d == "time" else np.array([f"S{i}" for i in range(n)]))
              for d, n in zip(dims, values.shape)}
    return ft.StockTensor(torch.from_numpy(values), dims, coords, meta={"source": "test"})


def test_stock_tensor_in_stock_tensor_out_along_time():
    x = np.random.default_rng(2).standard_normal((40, 3))
    x[5, 1] = np.nan
    tensor = _stock_tensor(x)
    res = rolling.std(tensor, 10)
    assert isinstance(res, ft.StockTensor) and res.dims == tensor.dims
    np.testing.assert_array_equal(res.coords["stock"], tensor.coords["stock"])
    np.testing.assert_allclose(res.values.numpy(), pd.DataFrame(x).rolling(10).std().to_numpy())
    assert torch.equal(res.mask, ~torch.isnan(res.values))
    assert not res.mask[:9].any() and res.mask[9:, 0].all()
    # stock first: the default axis is still the time dim
    flipped = _stock_tensor(np.ascontiguousarray(x.T), dims=("stock", "time"))
    np.testing.assert_allclose(rolling.std(flipped, 10).values.numpy(), res.values.numpy().T)
    # cross-sections run over the stock dim
    np.testing.assert_allclose(rolling.cs_rank(flipped).values.numpy(),
                               pd.DataFrame(x).rank(axis=1).to_numpy().T)
    assert rolling.returns(tensor).meta["source"] == "test"


def test_out_buffer_is_filled_and_returned():
    x = np.random.default_rng(3).standard_normal((50, 4))
    out = np.empty_like(x)
    assert rolling.mean(x, 7, out=out) is out
    np.testing.assert_allclose(out, pd.DataFrame(x).rolling(7).mean().to_numpy())
    out_t = out.T.copy().T  # F-ordered: written through a temporary
    rolling.max(x, 3, out=out_t)
    np.testing.assert_allclose(out_t, pd.DataFrame(x).rolling(3).max().to_numpy())
    inplace = x.copy()
    rolling.sum(inplace, 5, out=inplace)  # the output may alias the input
    np.testing.assert_allclose(inplace, pd.DataFrame(x).rolling(5).sum().to_numpy())
    tout = torch.empty(50, 4, dtype=torch.float64)
    assert rolling.std(torch.from_numpy(x), 5, out=tout) is tout
    with pytest.raises(BadInputError, match="shape"):
        rolling.mean(x, 7, out=np.empty((50, 3)))
    with pytest.raises(BadInputError, match="dtype"):
        rolling.mean(x, 7, out=np.empty((50, 4), dtype=np.float32))
    with pytest.raises(BadInputError, match="numpy"):
        rolling.mean(x, 7, out=torch.empty(50, 4, dtype=torch.float64))


def test_results_do_not_depend_on_the_thread_count():
    import numba

    x = np.random.default_rng(4).standard_normal((800, 700)).cumsum(0)
    x[::13, ::7] = np.nan
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = [f(x, 30) for f in (rolling.std, rolling.mean, rolling.argmax)] + [rolling.median(x, 250)]
        numba.set_num_threads(before)
        many = [f(x, 30) for f in (rolling.std, rolling.mean, rolling.argmax)] + [rolling.median(x, 250)]
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ the torch path
TORCH_CASES = {
    "sum": lambda x, **k: rolling.sum(x, 6, min_periods=2, **k),
    "mean": lambda x, **k: rolling.mean(x, 6, min_periods=2, **k),
    "count": lambda x, **k: rolling.count(x, 6, min_periods=3, **k),
    "var": lambda x, **k: rolling.var(x, 6, min_periods=2, **k),
    "std": lambda x, **k: rolling.std(x, 6, ddof=0, **k),
    "zscore": lambda x, **k: rolling.zscore(x, 6, min_periods=3, **k),
    "min": lambda x, **k: rolling.min(x, 6, min_periods=1, **k),
    "max": lambda x, **k: rolling.max(x, 6, **k),
    "argmax": lambda x, **k: rolling.argmax(x, 6, min_periods=1, **k),
    "argmin": lambda x, **k: rolling.argmin(x, 6, **k),
    "median": lambda x, **k: rolling.median(x, 6, min_periods=2, **k),
    "quantile": lambda x, **k: rolling.quantile(x, 6, 0.8, **k),
    "rank": lambda x, **k: rolling.rank(x, 6, method="min", pct=True, **k),
    "ewm_mean": lambda x, **k: rolling.ewm_mean(x, span=5, **k),
    "ewm_var": lambda x, **k: rolling.ewm_var(x, halflife=3, adjust=False, **k),
    "ewm_std": lambda x, **k: rolling.ewm_std(x, alpha=0.3, ignore_na=True, bias=True, **k),
    "cov": lambda x, **k: rolling.cov(x, x[::-1].copy() if isinstance(x, np.ndarray) else x.flip(0), 6, **k),
    "corr": lambda x, **k: rolling.corr(x, x[:, 0], 6, min_periods=3, **k),
    "beta": lambda x, **k: rolling.beta(x, x[:, 1], 6, **k),
    "returns": lambda x, **k: rolling.returns(x, 2, log=True, **k),
    "diff": lambda x, **k: rolling.diff(x, -1, **k),
    "shift": lambda x, **k: rolling.shift(x, 3, **k),
    "cs_rank": lambda x, **k: rolling.cs_rank(x, pct=True, **k),
    "cs_zscore": lambda x, **k: rolling.cs_zscore(x, **k),
}


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_torch_ops_agree_with_the_numba_kernels(name):
    """The path CUDA tensors take, forced on the CPU: same NaN pattern, same values."""
    rng = np.random.default_rng(5)
    x = 20 + rng.standard_normal((60, 5)).cumsum(0)
    x[rng.random(x.shape) < 0.15] = np.nan
    x[20:23, 2] = 7.0  # a constant stretch
    case = TORCH_CASES[name]
    ours = case(x)
    forced = case(torch.from_numpy(x), engine="torch")
    assert isinstance(forced, torch.Tensor) and forced.dtype == torch.float64
    np.testing.assert_array_equal(np.isnan(forced.numpy()), np.isnan(ours))
    np.testing.assert_allclose(forced.numpy(), ours, rtol=1e-10, atol=1e-10)
    f32 = case(torch.from_numpy(x.astype(np.float32)), engine="torch")
    assert f32.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_compute_on_the_gpu():
    x = torch.randn(300, 20, dtype=torch.float64).cumsum(0)
    for name, case in TORCH_CASES.items():
        res = case(x.cuda())
        assert res.device.type == "cuda", name
        np.testing.assert_allclose(res.cpu().numpy(), case(x.numpy()), rtol=1e-9, atol=1e-9, err_msg=name)


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, message", [
    (lambda x: rolling.mean(x, 0), "window must be a positive integer"),
    (lambda x: rolling.mean(x, 2.5), "window must be a positive integer"),
    (lambda x: rolling.mean(x, 3, min_periods=4), "min_periods must be an integer from 0 to the window"),
    (lambda x: rolling.var(x, 3, ddof=-1), "ddof"),
    (lambda x: rolling.mean(x, 3, axis=2), "axis 2 is out of range"),
    (lambda x: rolling.mean(x, 3, axis="time"), "not a dimension"),
    (lambda x: rolling.mean(x, 3, engine="cuda"), "engine 'cuda' is unknown"),
    (lambda x: rolling.quantile(x, 3, 1.5), "quantile q must be a number from 0 to 1"),
    (lambda x: rolling.rank(x, 3, method="dense"), "method 'dense' is unknown"),
    (lambda x: rolling.ewm_mean(x, span=3, alpha=0.5), "exactly one of com, span, halflife, alpha"),
    (lambda x: rolling.ewm_mean(x), "exactly one of"),
    (lambda x: rolling.ewm_mean(x, alpha=1.5), "alpha must be in"),
    (lambda x: rolling.cov(x, x[:5], 3), "x must have y's shape"),
    (lambda x: rolling.returns(x, 1.5), "periods must be an integer"),
    (lambda x: rolling.mean(np.array(["a", "b"]), 1), "must be numeric"),
    (lambda x: rolling.mean(np.zeros((2,) * 5), 1), "1 to 4 dimensions"),
    (lambda x: rolling.mean(np.float64(3.0), 1), "1 to 4 dimensions"),
])
def test_bad_input_raises_one_clear_error(call, message):
    x = np.random.default_rng(6).standard_normal((20, 3))
    with pytest.raises(BadInputError, match=message):
        call(x)


def test_edge_shapes():
    assert rolling.mean(np.empty((0, 3)), 5).shape == (0, 3)
    assert rolling.std(np.empty((10, 0)), 5).shape == (10, 0)
    one = rolling.sum(np.array([1.0, 2.0, np.nan, 4.0]), 10, min_periods=1)
    np.testing.assert_array_equal(one, [1.0, 3.0, 3.0, 7.0])
    np.testing.assert_array_equal(rolling.sum(np.full(3, np.nan), 2, min_periods=0), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("window", [20, 33, 64, 250])
def test_order_statistics_of_long_windows_equal_pandas(window):
    """median / quantile / rank over many blocks and bitset words, with ties, values that differ
    only in their last bits (their sort keys tie), -0.0 next to 0.0, and NaN runs."""
    rng = np.random.default_rng(window)
    T, N = 700, 6
    x = 100.0 + rng.standard_normal((T, N)).cumsum(axis=0)
    x[:, 1] = rng.integers(0, 4, T)  # ties
    x[:, 2] = 1.0 + rng.integers(0, 6, T) * np.finfo(float).eps  # neighbours one ulp apart
    x[:, 3] = np.where(rng.random(T) < 0.5, -0.0, 0.0) + rng.integers(-1, 2, T)
    x[rng.random((T, N)) < 0.1] = np.nan
    x[100:100 + 2 * window, 4] = np.nan  # a gap longer than a window
    frame = pd.DataFrame(x)
    minp = window // 2
    r = frame.rolling(window, min_periods=minp)
    np.testing.assert_array_equal(rolling.median(x, window, min_periods=minp), r.median().to_numpy())
    np.testing.assert_allclose(rolling.quantile(x, window, 0.3, min_periods=minp), r.quantile(0.3).to_numpy(),
                               rtol=1e-15, atol=0)
    np.testing.assert_array_equal(rolling.rank(x, window, min_periods=minp), r.rank().to_numpy())
    np.testing.assert_array_equal(rolling.rank(x, window, method="max", ascending=False, pct=True, min_periods=minp),
                                  r.rank(method="max", ascending=False, pct=True).to_numpy())


def test_rolling_keeps_torch_thread_count():
    """The first threaded rolling call starts numba's threading layer; with OpenMP that used to reset
    torch's intra-op thread count to every core (a user's torch.set_num_threads(1) silently undone).
    Run in a fresh process: the layer starts once per process."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "import numpy as np, fintensor as ft\n"
            "x = np.random.default_rng(0).standard_normal((2000, 300))\n"
            "assert torch.get_num_threads() == 1  # torch has read its count (any torch op may)\n"
            "ft.rolling.mean(x, 5); ft.rolling.mean(x, 5)  # the first call compiles alone, the second threads\n"
            "import numba; assert numba.get_num_threads() >= 1\n"
            "print(torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"


def _order_panel(T: int, N: int, seed: int, dtype) -> np.ndarray:
    """Columns that stress order statistics: a walk, ties, one-ulp neighbours, -0.0 next to 0.0,
    +-inf, random NaN, a NaN gap and an all-NaN column."""
    rng = np.random.default_rng(seed)
    x = 100.0 + rng.standard_normal((T, N)).cumsum(axis=0)
    x[:, 1] = rng.integers(0, 4, T)
    x[:, 2] = 1.0 + rng.integers(0, 6, T) * np.finfo(dtype).eps
    x[:, 3] = np.where(rng.random(T) < 0.5, -0.0, 0.0) + rng.integers(-1, 2, T)
    x[:, 4] = np.where(rng.random(T) < 0.1, np.inf, np.where(rng.random(T) < 0.1, -np.inf, x[:, 4]))
    x[rng.random((T, N)) < 0.1] = np.nan
    x[T // 3:T // 3 + 300, 5] = np.nan
    x[:, 6] = np.nan
    return x.astype(dtype)


# windows either side of the switch from the short-window kernel (sorted copies) to the block scheme:
# median / quantile at 1 KiB of float64 values (896 bytes of float32), rank alone at 1.5 KiB; 250 and
# 251: an even and an odd block (the merge of a block pair from both ends meets in the middle)
@pytest.mark.parametrize("dtype, window", [(np.float64, 1), (np.float64, 2), (np.float64, 5), (np.float64, 127),
                                           (np.float64, 128), (np.float64, 129), (np.float64, 192),
                                           (np.float64, 193), (np.float64, 250), (np.float64, 251),
                                           (np.float32, 20), (np.float32, 224), (np.float32, 225),
                                           (np.float32, 256), (np.float32, 257), (np.float32, 384),
                                           (np.float32, 385)])
def test_short_and_block_order_kernels_agree_and_equal_pandas(dtype, window):
    """Both order-statistics kernels give the same values bit for bit (the sign of a zero aside),
    for every statistic, rank method, direction, pct and min_periods, and they equal pandas (but on
    the column with infinities, where pandas' rolling median and quantile give NaN)."""
    from fintensor.rolling import _order

    T = 3 * window + 400
    x = _order_panel(T, 40, window, dtype)  # 40 columns: a strip's remainder in the short kernel
    for minp in (0, 1, window // 2, window):
        for whats, qs in (([_order._MEDIAN], [0.0]), ([_order._QUANTILE], [0.3]),
                          ([_order._QUANTILE] * 2, [0.0, 1.0]),
                          ([_order._QUANTILE, _order._QUANTILE, _order._RANK], [0.8, 0.2, 0.0]),
                          ([_order._RANK], [0.0])):
            for method, ascending, pct in ((0, True, False), (1, False, True), (2, True, True)):
                whats_a, qs_a = np.array(whats), np.array(qs)
                short, block = (np.full((len(whats), T, 40), -1.0, dtype=dtype) for _ in range(2))
                args = (window, minp, whats_a, qs_a, method, ascending, pct, 0, 40)
                _order._short_order_kernel(x, short, *args)
                _order._order_columns(x, block, *args)
                np.testing.assert_array_equal(short, block, err_msg=f"{whats} {minp} {method} {ascending} {pct}")
    x = np.delete(x, 4, axis=1)
    frame = pd.DataFrame(x.astype(np.float64))
    r = frame.rolling(window, min_periods=window // 2)
    cast = (lambda a: a.astype(dtype)) if dtype == np.float32 else (lambda a: a)
    np.testing.assert_array_equal(rolling.median(x, window, min_periods=window // 2), cast(r.median().to_numpy()))
    np.testing.assert_allclose(rolling.quantile(x, window, 0.3, min_periods=window // 2),
                               r.quantile(0.3).to_numpy(), rtol=1e-15 if dtype == np.float64 else 1e-7, atol=0)
    np.testing.assert_array_equal(rolling.rank(x, window, min_periods=window // 2), cast(r.rank().to_numpy()))
    np.testing.assert_array_equal(rolling.rank(x, window, method="min", ascending=False, pct=True,
                                               min_periods=window // 2),
                                  cast(r.rank(method="min", ascending=False, pct=True).to_numpy()))


def test_order_statistics_pick_the_kernel_by_window_bytes():
    """Short windows take the sorted-copy kernel, long ones the block scheme (the switch the test
    above crosses)."""
    from fintensor.rolling import _order

    med, rank = np.array([_order._MEDIAN]), np.array([_order._RANK])
    assert _order._order_kernel_for(128, np.float64, med) is _order._short_order_kernel
    assert _order._order_kernel_for(129, np.float64, med) is _order._order_columns
    assert _order._order_kernel_for(224, np.float32, med) is _order._short_order_kernel
    assert _order._order_kernel_for(225, np.float32, med) is _order._order_columns
    assert _order._order_kernel_for(384, np.float32, rank) is _order._short_order_kernel
    assert _order._order_kernel_for(192, np.float64, rank) is _order._short_order_kernel
    assert _order._order_kernel_for(193, np.float64, rank) is _order._order_columns
    both = np.array([_order._QUANTILE, _order._RANK])
    assert _order._order_kernel_for(192, np.float64, both) is _order._order_columns
