"""Draw docs/dimensions.png, the README's picture of the 0D -> 4D idea, from the real A-share data.

    python docs/make_dimensions_figure.py [SHARED_DATA_DIR]      (default ../shared/data)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import fintensor as ft

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"


def main() -> Path:
    store = ft.Store(tempfile.mkdtemp(prefix="fintensor-figure-"))
    panel = DATA / "cn_daily" / "baostock_qfq" / "panel_2018-01_2020-08"
    ft.import_csv([panel / "000001.SZ.csv", panel / "600519.SH.csv"], store=store)
    ft.import_csv(DATA / "cn_intraday_tick" / "hikyuu" / "trans_tick_2019-02-01_2019-02-11.csv.gz", store=store)

    t3 = ft.build(["000001.XSHE", "600519.XSHG"], "2019-01-01", "2019-12-31", fields=["close", "volume"],
                  store=store, dtype="float64")
    t2 = t3.sel(feature="close")
    t1 = t2.sel(stock="000001.SZ", time=slice("2019-01-03", None))
    t0 = t1.sel(time="2019-01-03")
    t4 = ft.build_ticks(["000001.SZ"], "2019-02-01", "2019-02-11", freq="3s", fields=["price", "volume"],
                        store=store)

    fig = Figure(figsize=(16, 3.8), dpi=80, layout="constrained")
    axes = fig.subplots(1, 5, width_ratios=[0.7, 1, 1, 1.25, 1.25])
    ax = axes[0]
    ax.text(0.5, 0.55, f"{t0.item():.4f}", ha="center", va="center", fontsize=26)
    ax.text(0.5, 0.25, "000001.SZ close (CNY)\n2019-01-03", ha="center", va="center", fontsize=9)
    ax.set_axis_off()
    ax.set_title("0D  ()")
    days = t1.coords["time"]
    axes[1].plot(days, t1.numpy(), color="C0")
    axes[1].set(title="1D  (time,): 000001.SZ close", ylabel="close (CNY, forward-adjusted)",
                xlabel="XSHG session (2019)")
    for i, s in enumerate(t2.coords["stock"]):
        x = t2.sel(stock=s).numpy()
        axes[2].plot(t2.coords["time"], x / x[0], label=s, color=f"C{i}")
    axes[2].legend(fontsize=8)
    axes[2].set(title="2D  (time, stock): close", ylabel="close / first close", xlabel="XSHG session (2019)")
    z = t3.numpy().reshape(len(t3.coords["time"]), -1)
    z = (z - np.nanmean(z, 0)) / np.nanstd(z, 0)
    image = axes[3].imshow(z.T, aspect="auto", cmap="coolwarm", vmin=-2.5, vmax=2.5, interpolation="nearest")
    axes[3].set_yticks(range(4), [f"{s[:6]} {f}" for s in t3.coords["stock"] for f in t3.coords["feature"]],
                       fontsize=8)
    axes[3].set(xlabel="XSHG session of 2019 (index)", title="3D  (time, stock, feature)")
    fig.colorbar(image, ax=axes[3], label="z-score over 2019")
    price = t4.sel(stock="000001.SZ", feature="price").numpy()
    minutes = price.shape[1] * 3 / 60
    image = axes[4].imshow(price, aspect="auto", cmap="viridis", interpolation="nearest",
                           extent=(0, minutes, len(price) - 0.5, -0.5))
    axes[4].set_yticks(range(len(t4.coords["day"])), [str(d) for d in t4.coords["day"]], fontsize=8)
    axes[4].set(xlabel="minutes since 09:30 in 3-second slots (lunch skipped)",
                title="4D  (day, tick, stock, feature):\n000001.SZ, feature price (raw)")
    fig.colorbar(image, ax=axes[4], label="last trade price (CNY)")
    for ax in axes[1:3]:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.suptitle("Each dimension is a .sel() of the next:  t4 -> t3 -> t2 -> t1 -> t0  \n(Ping An Bank 000001.SZ and "
                 "Kweichow Moutai 600519.SS: baostock daily bars, TDX/hikyuu trade ticks; no gaps: neither was "
                 "suspended in 2019)", fontsize=11)
    out = ROOT / "docs" / "dimensions.png"
    fig.savefig(out)
    return out


if __name__ == "__main__":
    print(main())
