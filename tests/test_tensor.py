"""StockTensor: selection (4D -> 0D against the source CSVs), conversions, files, errors."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import torch

import fintensor as ft
from fintensor.errors import BadInputError, StoreCorruptError
from fintensor.tensor import StockTensor, load

BAOSTOCK = "cn_daily/baostock_qfq/panel_2018-01_2020-08/"
TICKS = "cn_intraday_tick/hikyuu/trans_tick_2019-02-01_2019-02-11.csv.gz"


@pytest.fixture(scope="module")
def story(cn_daily_store):
    """The README's 3D story: Ping An + Moutai, 2019, close and volume (float64: exact CSV values)."""
    return ft.build(["000001.XSHE", "600519.XSHG"], "2019-01-01", "2019-12-31", fields=["close", "volume"],
                    store=cn_daily_store, dtype=torch.float64, cache=False)


@pytest.fixture(scope="module")
def story_ticks(cn_tick_store):
    return ft.build_ticks(["000001.SZ", "600000.SH"], "2019-02-01", "2019-02-11", freq="3s",
                          fields=["price", "volume"], store=cn_tick_store, dtype=torch.float64, cache=False)


def _baostock(shared_data, code: str) -> pd.DataFrame:
    return pd.read_csv(shared_data / BAOSTOCK / f"{code}.csv", index_col="date")


def test_3d_to_0d_chain_equals_csv(story, shared_data):
    csv = _baostock(shared_data, "000001.SZ")
    day = story.sel(time="2019-01-03")
    assert day.dims == ("stock", "feature")
    one = day.sel(stock="000001.XSHE")                   # JoinQuant spelling goes through normalize
    assert one.dims == ("feature",)
    zero = one.sel(feature="close")
    assert zero.ndim == 0 and zero.item() == csv.loc["2019-01-03", "close"]
    assert story.sel(time="2019-01-03", stock="000001.SZ", feature="volume").item() == \
        csv.loc["2019-01-03", "volume"]
    # 1D: a year of closes from that day, equal to the CSV's rows
    year = story.sel(stock="000001.SZ", feature="close", time=slice("2019-01-03", None))
    expected = csv.loc["2019-01-03":"2019-12-31", "close"]
    assert year.dims == ("time",) and len(year) == len(expected)
    np.testing.assert_array_equal(year.numpy(), expected.to_numpy())


@pytest.mark.parametrize("label", ["2019-01-03", np.datetime64("2019-01-03"), dt.date(2019, 1, 3),
                                   pd.Timestamp("2019-01-03"), dt.datetime(2019, 1, 3)])
def test_date_label_spellings(story, label):
    assert story.sel(time=label, stock="000001.SZ", feature="close").item() == \
        story.isel(time=1, stock=0, feature=0).item()


def test_4d_to_0d_chain_equals_tick_csv(story_ticks, shared_data):
    ticks = pd.read_csv(shared_data / TICKS, dtype={"datetime": str})
    t = pd.to_datetime(ticks.datetime, format="%Y%m%d%H%M%S")
    rows = ticks[(ticks.symbol == "000001.SZ") & (t >= "2019-02-01 10:00:00") & (t < "2019-02-01 10:00:03")]
    assert len(rows), "the chosen slot must hold a trade"
    chain = story_ticks.sel(day="2019-02-01")
    assert chain.dims == ("tick", "stock", "feature")
    chain = chain.sel(tick="00:30:00")                   # 30 min after the 09:30 open
    assert chain.dims == ("stock", "feature")
    chain = chain.sel(stock="000001.XSHE")
    assert chain.dims == ("feature",)
    assert chain.sel(feature="price").item() == rows.price.iloc[-1] / 1000
    assert chain.sel(feature="volume").item() == rows.vol.sum() * 100


def test_slices_lists_and_positions(story):
    sl = story.sel(time=slice("2019-01-03", "2019-01-07"))          # inclusive at both ends, like .loc
    assert list(sl.coords["time"].astype(str)) == ["2019-01-03", "2019-01-04", "2019-01-07"]
    kept = story.sel(stock=["600519.XSHG"])                          # a list keeps the dim
    assert kept.dims == story.dims and list(kept.coords["stock"]) == ["600519.SS"]
    picked = story.isel(time=[0, -1], stock=1)
    assert picked.dims == ("time", "feature") and picked.shape == (2, 2)
    torch.testing.assert_close(picked.values, story.values[[0, -1], 1])
    assert story.isel(time=slice(0, 10, 2)).shape == (5, 2, 2)
    # a slice between sessions selects the sessions inside it
    assert story.sel(time=slice("2019-02-02", "2019-02-12")).coords["time"][0] == np.datetime64("2019-02-11")


def test_unknown_labels_name_the_label_and_the_range(story):
    with pytest.raises(BadInputError, match=r"time 2019-01-05 is not in this tensor.*2019-01-02 \.\. 2019-12-31"):
        story.sel(time="2019-01-05")
    with pytest.raises(BadInputError, match=r"stock 'AAPL' is not in this tensor.*000001.SZ, 600519.SS"):
        story.sel(stock="AAPL")
    with pytest.raises(BadInputError, match=r"no 'day' dim; its dims are \('time', 'stock', 'feature'\)"):
        story.sel(day="2019-01-03")
    with pytest.raises(BadInputError, match="cannot read 'yesterday'"):
        story.sel(time="yesterday")
    with pytest.raises(BadInputError, match="out of range"):
        story.isel(stock=5)
    with pytest.raises(BadInputError, match="needs a 0D tensor"):
        story.item()


def test_to_pandas_shapes_values_and_shared_memory(story):
    s = story.sel(stock="000001.SZ", feature="close").to_pandas()
    assert isinstance(s, pd.Series) and s.index.name == "time" and s.loc["2019-01-03"] == \
        story.sel(time="2019-01-03", stock="000001.SZ", feature="close").item()
    two = story.sel(feature="volume")
    df = two.to_pandas()
    assert list(df.columns) == ["000001.SZ", "600519.SS"] and len(df) == 244
    assert np.shares_memory(df.to_numpy(), two.numpy())
    wide = story.to_pandas()
    assert wide.columns.names == ["stock", "feature"]
    assert wide[("600519.SS", "close")].loc["2019-06-03"] == \
        story.sel(time="2019-06-03", stock="600519.SS", feature="close").item()
    assert np.shares_memory(wide.to_numpy(), story.numpy())


def test_to_pandas_4d_rows_are_day_and_tick(story_ticks):
    df = story_ticks.to_pandas()
    assert df.index.names == ["day", "tick"] and df.columns.names == ["stock", "feature"]
    assert df.shape == (2 * 4800, 4)
    assert df.loc[(pd.Timestamp("2019-02-11"), pd.Timedelta("00:30:00")), ("000001.SZ", "price")] == \
        story_ticks.sel(day="2019-02-11", tick="00:30:00", stock="000001.SZ", feature="price").item()


def test_xarray_round_trip_shares_memory(story):
    xa = story.to_xarray()
    assert xa.dims == story.dims and np.shares_memory(xa.values, story.numpy())
    assert float(xa.sel(time="2019-01-03", stock="000001.SZ", feature="close")) == \
        story.sel(time="2019-01-03", stock="000001.SZ", feature="close").item()
    back = StockTensor.from_xarray(xa)
    assert back.dims == story.dims and back.meta == story.meta
    assert np.shares_memory(back.numpy(), story.numpy())
    assert torch.equal(back.mask, story.mask)
    for d in story.dims:
        np.testing.assert_array_equal(back.coords[d], story.coords[d])
    ds = xa.to_dataset(name="values").assign(mask=(story.dims, story.mask_numpy()))
    assert torch.equal(StockTensor.from_xarray(ds).mask, story.mask)


def test_from_xarray_rejects_a_mismatched_mask(story):
    import xarray as xr

    xa = story.to_xarray().drop_vars("mask")
    wrong = xr.DataArray(np.ones((244, 2), bool), dims=("time", "stock"))
    with pytest.raises(BadInputError, match=r"mask dims \('time', 'stock'\).*do not match values dims"):
        StockTensor.from_xarray(xa, mask=wrong)
    with pytest.raises(BadInputError, match=r"mask shape \(3, 3\) differs from values shape \(244, 2, 2\)"):
        StockTensor.from_xarray(xa, mask=np.ones((3, 3), bool))
    with pytest.raises(BadInputError, match="mask must be boolean"):
        StockTensor.from_xarray(xa, mask=np.ones((244, 2, 2)))


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(story, story_ticks, tmp_path, mmap):
    for st in (story, story_ticks, story.sel(time="2019-01-03", stock="000001.SZ", feature="close")):
        path = st.save(tmp_path / "t.safetensors")
        back = load(path, mmap=mmap)
        assert back.dims == st.dims and back.meta == st.meta and back.dtype == st.dtype
        torch.testing.assert_close(back.values, st.values, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(back.mask, st.mask)
        for d in st.dims:
            assert back.coords[d].dtype == st.coords[d].dtype
            np.testing.assert_array_equal(back.coords[d], st.coords[d])


def test_mmap_load_maps_the_file_and_leaves_it_unchanged(story, tmp_path):
    path = story.save(tmp_path / "t.safetensors")
    before = path.read_bytes()
    mapped = load(path, mmap=True)
    assert _mapped_from(mapped.values, path) and not _mapped_from(load(path).values, path)
    mapped.values.zero_()                                # copy-on-write: the file never changes
    assert path.read_bytes() == before
    assert load(path).values.ne(0).any()


def _mapped_from(t: torch.Tensor, path) -> bool:
    """Whether the tensor's memory lies in a mapping of ``path`` (Linux /proc/self/maps)."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5] == str(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_file_is_plain_safetensors_and_never_pickled(story, tmp_path):
    from safetensors import safe_open

    path = story.save(tmp_path / "t.safetensors")
    with safe_open(str(path), "pt") as f:
        torch.testing.assert_close(f.get_tensor("values"), story.values, equal_nan=True)
        assert torch.equal(f.get_tensor("mask"), story.mask)
        assert f.metadata()["format"].startswith("fintensor.StockTensor/")
    assert b"pickle" not in path.read_bytes()[:4096] and b"\x80\x04" not in path.read_bytes()[:16]


def test_load_rejects_other_files_clearly(story, tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("date,close\n2019-01-02,1\n")
    with pytest.raises(BadInputError, match="is not a fintensor tensor file"):
        load(csv)
    with pytest.raises(BadInputError, match="no tensor file at"):
        load(tmp_path / "absent.safetensors")
    path = story.save(tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(StoreCorruptError, match="is damaged: truncated"):
        load(path)
    flipped = bytearray(data)
    flipped[-200] ^= 0xFF                                # one damaged value byte
    path.write_bytes(bytes(flipped))
    with pytest.raises(StoreCorruptError, match="fail their CRC-32 check"):
        load(path)


def test_repr_tells_dims_shape_ranges_dtype_device_and_observed(story_ticks):
    text = repr(story_ticks)
    share = story_ticks.mask.float().mean().item()
    assert "StockTensor(day: 2, tick: 4800, stock: 2, feature: 2) float64 on cpu" in text
    assert f"{share:.1%} observed" in text
    assert "2019-02-01 .. 2019-02-11" in text and "00:00:00 .. 03:59:57" in text
    assert "000001.SZ, 600000.SS" in text and "price, volume" in text and "calendar=XSHG" in text


def test_with_values_keeps_or_overrides_coords(story):
    doubled = story.with_values(story.values * 2)
    assert doubled.dims == story.dims and doubled.meta == story.meta
    assert torch.equal(doubled.mask, ~torch.isnan(doubled.values))
    log_close = story.sel(feature=["close"])
    ret = log_close.with_values(torch.log(log_close.values).diff(dim=0, prepend=torch.full((1, 2, 1), np.nan)),
                                feature=["log_return"])
    assert list(ret.coords["feature"]) == ["log_return"] and not ret.mask[0].any() and ret.mask[1:].all()
    with pytest.raises(BadInputError, match="coords for 'feature' have 1 labels but the feature axis has 2"):
        story.with_values(story.values, feature=["x"])


def test_to_changes_device_or_dtype_and_keeps_the_mask(story):
    single = story.to(torch.float32)
    assert single.dtype == torch.float32 and single.mask.dtype == torch.bool
    same = story.to("cpu")
    assert same.device.type == "cpu" and torch.equal(same.mask, story.mask)
    moved = story.to("meta")                             # a device other than the CPU, on any machine
    assert moved.device.type == "meta" and moved.mask.device.type == "meta" and moved.mask.dtype == torch.bool
    picked = moved.sel(stock=["600519.SS"], time=slice("2019-01-03", "2019-01-07"))
    assert picked.shape == (3, 1, 2) and picked.device.type == "meta"


def test_constructor_checks_its_contract():
    v = torch.zeros(3, 2)
    with pytest.raises(BadInputError, match="dims .* name 3 axes but values have 2"):
        StockTensor(v, ("time", "stock", "feature"))
    with pytest.raises(BadInputError, match="coords for 'stock' have 3 labels but the stock axis has 2"):
        StockTensor(v, ("time", "stock"), {"stock": ["A", "B", "C"]})
    with pytest.raises(BadInputError, match="mask must be a bool tensor"):
        StockTensor(v, ("time", "stock"), mask=torch.zeros(3, 2))
    st = StockTensor(v, ("time", "stock"), {"time": pd.date_range("2019-01-02", periods=3), "stock": ["A", "B"]})
    assert st.coords["time"].dtype == np.dtype("datetime64[D]") and st.coords["stock"].dtype.kind == "U"
    intraday = StockTensor(v, ("time", "stock"), {"time": pd.date_range("2019-01-02 14:30", periods=3, freq="min")})
    assert intraday.coords["time"].dtype == np.dtype("datetime64[ns]")
    assert intraday.sel(time=slice("2019-01-02", "2019-01-02")).shape == (3, 2)   # a date covers the day


# ------------------------------------------------------------------ integrity of saved tensors (#11)
def _same(a: StockTensor, b: StockTensor) -> bool:
    return (a.dims == b.dims and a.meta == b.meta and a.dtype == b.dtype and torch.equal(a.mask, b.mask)
            and torch.equal(a.values.view(torch.uint8) if a.values.dtype == torch.uint8 else
                            a.values.contiguous().view(torch.int64 if a.values.element_size() == 8 else torch.int32),
                            b.values.contiguous().view(torch.int64 if b.values.element_size() == 8 else torch.int32))
            and all(a.coords[d].dtype == b.coords[d].dtype and np.array_equal(a.coords[d], b.coords[d])
                    for d in a.dims))


@pytest.mark.parametrize("mmap", [False, True])
def test_bit_flips_anywhere_in_a_saved_tensor_are_detected_or_harmless(story, tmp_path, mmap):
    """Header (dims, dates, names, meta, shapes, offsets) and body: every flip raises or changes nothing."""
    small = story.isel(time=slice(0, 12))
    path = small.save(tmp_path / "t.safetensors")
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(11)
    positions = np.r_[rng.integers(0, header_end, 300), rng.integers(header_end, len(data), 100)]
    detected = harmless = 0
    for i, pos in enumerate(positions):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        target = tmp_path / f"f{i}.safetensors"
        target.write_bytes(bytes(flipped))
        try:
            back = load(target, mmap=mmap)
        except ft.FintensorError as exc:
            assert "\n" not in str(exc) and str(target) in str(exc)
            if "fintensor.StockTensor/2" in flipped[:header_end].decode("latin-1"):
                assert isinstance(exc, StoreCorruptError), exc          # damaged, exit 1 in the CLI
            detected += 1
        else:
            assert _same(back, small), f"a flip at byte {pos} changed the tensor silently"
            harmless += 1
        finally:
            target.unlink()
    assert detected + harmless == 400 and detected >= 390     # only whitespace-like flips can be harmless


def test_save_refuses_targets_that_are_not_regular_files(story, tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (tmp_path / "link.safetensors").symlink_to(outside)
    for name, why in (("fifo", "not a regular file"), ("dir", "a directory"), ("link.safetensors", "symbolic link")):
        with pytest.raises(BadInputError, match=why):
            story.save(tmp_path / name)
    assert outside.read_text() == "keep me"
    with pytest.raises(BadInputError, match="is 242 bytes long; this file system allows 217"):
        story.save(tmp_path / ("x" * 230 + ".safetensors"))
    with pytest.raises(BadInputError, match="not a regular file"):
        load(tmp_path / "fifo")                            # would block forever on open()


# ------------------------------------------------------------------ labels like pandas / xarray (#12)
def test_month_and_partial_string_labels_select_like_pandas(story):
    close = story.sel(stock="000001.SZ", feature="close")
    series = close.to_pandas()
    jan = close.sel(time="2019-01")
    assert jan.dims == ("time",)
    np.testing.assert_array_equal(jan.coords["time"], series.loc["2019-01"].index.to_numpy().astype("datetime64[D]"))
    both = close.sel(time=slice("2019-01", "2019-02"))
    expected = series.loc["2019-01":"2019-02"]
    assert len(both) == len(expected) and both.coords["time"][-1] == np.datetime64("2019-02-28")
    np.testing.assert_array_equal(both.numpy(), expected.to_numpy())
    assert len(close.sel(time="2019")) == len(series.loc["2019"])
    assert close.sel(time="2019-01-03").ndim == 0         # a day on a daily axis is one label
    with pytest.raises(BadInputError, match="matches no label"):
        close.sel(time="2020-03")


def test_a_day_on_an_intraday_axis_selects_its_bars():
    times = pd.date_range("2019-01-02 14:30", periods=3, freq="min").append(
        pd.date_range("2019-01-03 14:30", periods=2, freq="min"))
    st = StockTensor(torch.arange(5.0), ("time",), {"time": times})
    day = st.sel(time="2019-01-03")
    assert day.dims == ("time",) and day.numpy().tolist() == [3.0, 4.0]
    assert st.sel(time=dt.date(2019, 1, 2)).numpy().tolist() == [0.0, 1.0, 2.0]
    assert st.sel(time="2019-01-02 14:31").item() == 1.0


def test_asarray_observed_and_arithmetic_keep_labels_and_masks(story):
    close = story.sel(feature="close")
    unobserved = close.mask.clone()
    unobserved[::7, 1] = False                            # as on untraded days
    close = StockTensor(close.values, close.dims, close.coords, unobserved, close.meta)
    mask = close.mask_numpy()
    arr = np.asarray(close)
    assert np.isnan(arr[~mask]).all() and np.array_equal(arr[mask], close.numpy()[mask])
    obs = close.observed()
    assert torch.equal(obs.mask, close.mask) and np.array_equal(obs.numpy(), arr, equal_nan=True)
    vol = story.sel(feature="volume")
    vol = StockTensor(vol.values, vol.dims, vol.coords, vol.mask.clone(), vol.meta)
    vol.mask[3, 0] = False                               # unobserved in one operand only
    amount = close * vol
    assert amount.dims == close.dims and np.array_equal(amount.coords["time"], close.coords["time"])
    assert torch.equal(amount.mask, close.mask & vol.mask) and not amount.mask[3, 0]
    np.testing.assert_array_equal(amount.numpy()[amount.mask_numpy()],
                                  (close.numpy() * vol.numpy())[amount.mask_numpy()])
    for result, expected in ((close + 1, close.numpy() + 1), (2 * close, close.numpy() * 2),
                             (1 / close, 1 / close.numpy()), (close - close, 0 * close.numpy()),
                             (-close, -close.numpy()), (np.float64(2) * close, 2 * close.numpy())):
        assert isinstance(result, StockTensor) and torch.equal(result.mask, close.mask)
        np.testing.assert_array_equal(result.numpy()[mask], expected[mask])
    with pytest.raises(BadInputError, match="same dims and labels"):
        close + close.isel(time=slice(0, 5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_to_cuda_without_cuda_is_a_fintensor_message(story):
    with pytest.raises(BadInputError, match="no usable CUDA device"):
        story.to("cuda")
