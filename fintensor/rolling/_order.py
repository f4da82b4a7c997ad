"""Order statistics in a moving window -- median, quantile, rank: short windows from a sorted copy
of each window, shifted in SIMD lockstep across columns; long ones from blocks sorted once and a
bitset per window."""
from __future__ import annotations

from typing import Callable

import numpy as np
from numba import njit, types
from llvmlite import ir as llvm_ir
from numba.extending import intrinsic

from ._kernels import _JIT, _NAN, _imax, _imin, _rank_value

_ORDER_STRIP = 16  # columns taken block by block together (their previous blocks' sorted values: L2)
_QUANTILE, _MEDIAN, _RANK = range(3)
# A window of at most this many bytes (128 float64 / 224 float32 values; for rank alone, whose
# count is cheaper than keeping a sorted copy, 192 / 384) takes the short-window kernel: its
# O(window) lane operations per step beat the block scheme's sorts and merges there. Measured on a
# (5000, 2000) panel, one thread: 4x faster at window 20; median: short 337 ms, blocks 370 ms at 128
# float64 values; float32 (twice the lanes, the blocks' cost unchanged) 272 / 320 ms at 200 values,
# 346 / 274 ms at 250.
_SHORT_WINDOW_BYTES = 1024
_SHORT_WINDOW_BYTES_F32 = 896
_SHORT_RANK_BYTES = 1536
_SHORT_STRIP = 256  # columns advanced in lockstep: long SIMD loops, two sorted copies in L2


# =================================================================== short windows: sorted copies
# Each column of a strip keeps its window sorted, slot by slot in the rows of ``now`` (the strip's
# columns side by side, so that every loop below runs across columns and vectorises); NaN is kept
# as +inf at the top, past the valid values, and the window's valid count says where they end. A
# step removes the value leaving and inserts the one arriving in one branch-free pass over the
# slots: with ``d`` the slots without the leaving value o (``d[i] = s[i] if s[i] < o else
# s[i+1]``), the new slot i is ``max(d[i-1], min(d[i], v))`` -- compares and selects only, no
# search, and ties need no care (equal values are interchangeable; -0.0 and 0.0 may trade places).
# Row 0 is a -inf sentinel, row window+1 a +inf one. The rank of the current value is a count of the
# raw window's smaller and not larger values, also across columns.
@njit(**_JIT)
def _short_order_kernel(x, out, window, min_periods, whats, qs, method, ascending, pct, first, stop):
    """``_order_columns``' statistics for columns first..stop-1 of the float32/float64 panel ``x``
    (computed in its dtype, exact: values are only moved and compared) when the window is short."""
    T = x.shape[0]
    w = window
    want_sorted, want_rank = False, False
    for s in range(whats.shape[0]):
        want_sorted |= whats[s] != _RANK
        want_rank |= whats[s] == _RANK
    for c0 in range(first, stop, _SHORT_STRIP):
        n = _imin(_SHORT_STRIP, stop - c0)
        now = np.full((w + 2, n), np.inf, dtype=x.dtype)  # the sorted windows, then the next ones
        nxt = np.full((w + 2, n), np.inf, dtype=x.dtype)
        now[0] = -np.inf
        nxt[0] = -np.inf
        gone = np.full(n, np.inf, dtype=x.dtype)  # the value leaving (NaN and rows before 0: +inf)
        new = np.empty(n, dtype=x.dtype)
        below = np.zeros(n, dtype=x.dtype)  # counts of the rank (small integers, exact)
        one, zero = np.ones(1, dtype=x.dtype)[0], below[0]  # in x's dtype: SIMD lanes of one width
        upto = np.zeros(n, dtype=x.dtype)
        cnt = np.zeros(n, dtype=np.int64)
        for t in range(T):
            row = x[t, c0:c0 + n]
            for j in range(n):
                v = row[j]
                new[j] = v if v == v else np.inf
                cnt[j] += v == v
            if t >= w:
                old = x[t - w, c0:c0 + n]
                for j in range(n):
                    v = old[j]
                    gone[j] = v if v == v else np.inf
                    cnt[j] -= v == v
            if want_sorted:
                for i in range(1, w + 1):
                    sp, si, sn, ri = now[i - 1], now[i], now[i + 1], nxt[i]
                    for j in range(n):  # all operands loaded first: selects, not branches
                        vp, vi, vn, o, v = sp[j], si[j], sn[j], gone[j], new[j]
                        dp = vp if vp < o else vi
                        d = vi if vi < o else vn
                        d = d if d < v else v
                        ri[j] = dp if dp > d else d
                now, nxt = nxt, now
            if want_rank:
                below[:] = 0
                upto[:] = 0
                rows = _imin(w, t + 1)
                for lag in range(0, rows, 4):  # four rows a pass: fewer loads and stores of the counts
                    a0 = x[t - lag, c0:c0 + n]  # rows past the window's first repeat it: counted 0 times
                    a1 = x[t - _imin(lag + 1, rows - 1), c0:c0 + n]
                    a2 = x[t - _imin(lag + 2, rows - 1), c0:c0 + n]
                    a3 = x[t - _imin(lag + 3, rows - 1), c0:c0 + n]
                    f1, f2, f3 = (one if lag + 1 < rows else zero), (one if lag + 2 < rows else zero), \
                        (one if lag + 3 < rows else zero)
                    for j in range(n):
                        v, v0, v1, v2, v3 = row[j], a0[j], a1[j], a2[j], a3[j]
                        below[j] += ((one if v0 < v else zero) + (f1 if v1 < v else zero)) + \
                            ((f2 if v2 < v else zero) + (f3 if v3 < v else zero))
                        upto[j] += ((one if v0 <= v else zero) + (f1 if v1 <= v else zero)) + \
                            ((f2 if v2 <= v else zero) + (f3 if v3 <= v else zero))
            for s in range(whats.shape[0]):
                what = whats[s]
                for j in range(n):
                    k = cnt[j]
                    res = _NAN
                    if k >= min_periods and k > 0:
                        if what == _MEDIAN:
                            h = k // 2
                            if k % 2:
                                res = np.float64(now[h + 1, j])
                            else:
                                res = (np.float64(now[h, j]) + np.float64(now[h + 1, j])) / 2.0
                        elif what == _QUANTILE:
                            pos = qs[s] * (k - 1)
                            lo = int(pos)
                            res = np.float64(now[lo + 1, j])
                            if pos != lo:
                                res += (np.float64(now[lo + 2, j]) - res) * (pos - lo)
                        elif row[j] == row[j]:
                            res = _rank_value(int(below[j]), int(upto[j]), k, method, ascending, pct)
                    out[s, t, c0 + j] = res

# ==================================================================== long windows: block bitsets
# A window is the suffix of one block of ``window`` rows plus a prefix of the next (as in the block
# scheme above). Each block's values are sorted once (numpy's integer sort of keys that carry the
# row), and each pair of adjacent blocks is merged once, so every value has a fixed place in its
# pair's order; a window is then a set of places, kept as a bitset of 2 x window bits. Adding or
# removing a value is one bit; the k-th smallest value is found by counting bits (popcount), and the
# set bits below a place are the rank of a value. A step costs O(window / 64) word operations, not
# the O(window) values a sorted copy of the window moves.
_NAN_KEY = np.int64(0x7FFFFFFFFFFFFFFF)  # the sort key of NaN (and of rows past the end): last
_ONE = np.uint64(1)
_ORDER_MIN_BLOCK = 32  # rows: shorter blocks for short windows would cost more per block than per row
_KEY_TILE = 32  # rows of a chunk turned into keys at a time (a float64 copy of them in L2)
_ORDER_KEY_BYTES = 1 << 24  # a column chunk's sort keys at most (16 MiB), but never fewer than a strip


@intrinsic
def _popcount(typingctx, word):
    """Set bits of a uint64 (LLVM's ctpop: one instruction where the CPU has it)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@intrinsic
def _trailing_zeros(typingctx, word):
    """Zero bits below the lowest set bit of a nonzero uint64 (LLVM's cttz)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], llvm_ir.Constant(llvm_ir.IntType(1), 0))

    return types.uint64(types.uint64), codegen


@njit(inline="always")
def _next_set(words, base, place):
    """Place of the first set bit after ``place`` in the bitset ``words[base:]`` (there is one)."""
    i = base + (place >> 6)
    above = words[i] & ~(((_ONE << np.uint64(place & 63)) << _ONE) - _ONE)
    while above == 0:
        i += 1
        above = words[i]
    return (i - base) * 64 + int(_trailing_zeros(above))


@njit(inline="always")
def _select_in_word(word, k):
    """Place (0..63) of the k-th (from 0) set bit of ``word``, which has more than k: halve the
    word six times, counting the set bits of the lower half."""
    place = np.uint64(0)
    for width in (np.uint64(32), np.uint64(16), np.uint64(8), np.uint64(4), np.uint64(2), _ONE):
        low = _popcount(word & ((_ONE << width) - _ONE))
        skip = k >= low
        k = k - low if skip else k
        word = word >> width if skip else word
        place = place + width if skip else place
    return int(place)


@njit(inline="always")
def _select(words, base, k):
    """Place of the k-th (from 0) set bit of the bitset ``words[base:]`` (which has more than k)."""
    kk = np.uint64(k)
    i = base
    c = _popcount(words[i])
    while kk >= c:
        kk -= c
        i += 1
        c = _popcount(words[i])
    return (i - base) * 64 + _select_in_word(words[i], kk)


@njit(inline="always")
def _count_below(words, base, place):
    """Set bits of the bitset ``words[base:]`` at places below ``place``."""
    full = base + (place >> 6)
    total = np.uint64(0)
    for i in range(base, full):
        total += _popcount(words[i])
    rest = np.uint64(place & 63)
    if rest:
        total += _popcount(words[full] & ((_ONE << rest) - _ONE))
    return int(total)


@njit(**_JIT)
def _block_keys(x, c0, c1, window, row_bits, keys, part):
    """Into ``keys`` (columns, blocks, window) the int64 sort keys of columns c0..c1-1 of the
    (T, M) float32/float64 panel ``x`` cut into blocks of ``window`` rows: the value's float64 bits
    mapped to an integer of the same order, its lowest ``row_bits`` bits replaced by the row's
    offset in the block (NaN and rows past the end sort last); into ``part`` (T, columns) the
    values in float64. Values that differ only in the replaced bits may sort in the wrong order;
    ``_order_kernel`` repairs that. _KEY_TILE rows at a time: each column's keys go out in runs,
    not one value per page."""
    T = x.shape[0]
    n = c1 - c0
    n_blocks = (T + window - 1) // window
    tile = np.empty((_KEY_TILE, n))  # the tile's rows in float64, read as int64 below
    bits = tile.view(np.int64)
    bs = np.empty(_KEY_TILE, dtype=np.int64)  # the tile's rows: block, row in the block
    rs = np.empty(_KEY_TILE, dtype=np.int64)
    low = np.int64((1 << row_bits) - 1)
    flip = np.int64(0x7FFFFFFFFFFFFFFF)
    for t0 in range(0, n_blocks * window, _KEY_TILE):
        rows = _imin(_KEY_TILE, n_blocks * window - t0)
        for i in range(rows):
            if t0 + i < T:
                src, dst, cp = x[t0 + i, c0:c1], tile[i], part[t0 + i]
                for j in range(n):
                    v = np.float64(src[j])
                    dst[j] = v
                    cp[j] = v
            else:
                tile[i, :] = np.nan
        for i in range(rows):
            bs[i], rs[i] = (t0 + i) // window, (t0 + i) % window
        for j in range(n):
            for i in range(rows):
                k = bits[i, j]
                k = k ^ ((k >> 63) & flip)  # negative floats: reverse their order
                k = k if tile[i, j] == tile[i, j] else _NAN_KEY
                keys[j, bs[i], rs[i]] = (k & ~low) | rs[i]


@njit(**_JIT)
def _order_kernel(x, keys, out, window, block, min_periods, whats, qs, method, ascending, pct, c_out, row_bits):
    """quantile (linear interpolation) / median / rank of the current value, like pandas, for the
    columns of the float64 chunk ``x`` (out's columns from ``c_out``), each block's values already
    ordered by ``keys``. ``out[k]`` gets statistic ``whats[k]`` (quantile ``qs[k]``): several from
    one pass. A strip of a few columns is walked down time at a time, so that its state stays in
    cache. Blocks have ``block`` >= window rows (a window spans at most two)."""
    T, M = x.shape
    w = block
    n_words = (2 * w + 63) // 64
    low = np.int64((1 << row_bits) - 1)
    nan_high = _NAN_KEY & ~low
    want_rank = False
    for s in range(whats.shape[0]):
        want_rank |= whats[s] == _RANK
    for c0 in range(0, M, _ORDER_STRIP):
        n = _imin(_ORDER_STRIP, M - c0)
        prev_v = np.empty((n, w + 1))  # the previous block's valid values, sorted, and their rows
        prev_r = np.zeros((n, w + 1), dtype=np.int64)
        n_prev = np.zeros(n, dtype=np.int64)
        cur_v = np.empty(w + 1)
        cur_r = np.zeros(w + 1, dtype=np.int64)
        pair_v = np.empty(2 * w)  # the pair's valid values, sorted (of the column at hand)
        place = np.empty(2 * w, dtype=np.int64)  # row of the pair (previous block 0.., this w..)
        tie_lo = np.empty(2 * w, dtype=np.int64)  # place -> first / past-last place of its value
        tie_hi = np.empty(2 * w, dtype=np.int64)
        words = np.zeros(n * n_words, dtype=np.uint64)  # column j's bitset from j * n_words
        cnt = np.zeros(n, dtype=np.int64)
        for tb in range(0, T, w):
            te = _imin(tb + w, T)
            for j in range(n):
                # this block's valid values in order, from the sorted keys (NaN keys come last)
                ks = keys[c0 + j, tb // w]
                m = 0
                while m < w and (ks[m] & ~low) != nan_high:
                    r = ks[m] & low
                    cur_v[m] = x[tb + r, c0 + j]
                    cur_r[m] = r
                    m += 1
                for i in range(1, m):  # repair values that differ only in the key's row bits
                    u = i
                    while u > 0 and cur_v[u - 1] > cur_v[u]:
                        cur_v[u - 1], cur_v[u] = cur_v[u], cur_v[u - 1]
                        cur_r[u - 1], cur_r[u] = cur_r[u], cur_r[u - 1]
                        u -= 1
                # merge the previous block (rows 0..w-1) and this one (rows w..) into the pair order,
                # from both ends at once: two independent chains of loads and compares, not one as
                # long (ties: the previous block's first, so both halves agree on the one order)
                pv, pr, k_prev = prev_v[j], prev_r[j], n_prev[j]
                pl = place
                pl[:] = -1
                o = k_prev + m
                a, b = 0, 0
                a2, b2 = k_prev - 1, m - 1
                for i in range(o // 2):
                    va, vb = pv[a], cur_v[b]
                    ta = np.int64((a < k_prev) & ((b >= m) | (va <= vb)))  # 1: take a (arithmetic, no branch)
                    va2, vb2 = pv[_imax(a2, 0)], cur_v[_imax(b2, 0)]
                    ta2 = np.int64((a2 >= 0) & ((b2 < 0) | (va2 > vb2)))  # from the top: 1 takes a
                    pair_v[i] = va if ta else vb
                    pl[ta * pr[a] + (1 - ta) * (w + cur_r[b])] = i
                    pair_v[o - 1 - i] = va2 if ta2 else vb2
                    pl[ta2 * pr[_imax(a2, 0)] + (1 - ta2) * (w + cur_r[_imax(b2, 0)])] = o - 1 - i
                    a += ta
                    b += 1 - ta
                    a2 -= ta2
                    b2 -= 1 - ta2
                if o % 2:  # the middle one
                    ta = np.int64((a < k_prev) & ((b >= m) | (pv[a] <= cur_v[b])))
                    pair_v[o // 2] = pv[a] if ta else cur_v[b]
                    pl[ta * pr[a] + (1 - ta) * (w + cur_r[b])] = o // 2
                if want_rank:
                    g = 0
                    while g < o:
                        h = g + 1
                        while h < o and pair_v[h] == pair_v[g]:
                            h += 1
                        for u in range(g, h):
                            tie_lo[u] = g
                            tie_hi[u] = h
                        g = h
                # the window before this block's first row: its last ``window`` rows' valid values
                wb = j * n_words
                words[wb:wb + n_words] = 0
                k = 0
                for u in range(k_prev):
                    if pr[u] >= w - window:
                        p = pl[pr[u]]
                        words[wb + (p >> 6)] |= _ONE << np.uint64(p & 63)
                        k += 1
                pv[:m] = cur_v[:m]
                pr[:m] = cur_r[:m]
                n_prev[j] = m
                # then this column down the block: its bitset and places stay in L1
                for t in range(tb, te):
                    r = t - tb
                    gone = t - window - (tb - w)  # the row leaving the window, counted in the pair
                    p = place[gone] if gone >= 0 else -1
                    if p >= 0:
                        words[wb + (p >> 6)] &= ~(_ONE << np.uint64(p & 63))
                        k -= 1
                    p_now = place[w + r]
                    if p_now >= 0:
                        words[wb + (p_now >> 6)] |= _ONE << np.uint64(p_now & 63)
                        k += 1
                    for s in range(whats.shape[0]):
                        res = _NAN
                        if k >= min_periods and k > 0:
                            if whats[s] == _MEDIAN:
                                h = k // 2
                                if k % 2:
                                    res = pair_v[_select(words, wb, h)]
                                else:
                                    below = _select(words, wb, h - 1)
                                    res = (pair_v[below] + pair_v[_next_set(words, wb, below)]) / 2.0
                            elif whats[s] == _QUANTILE:
                                pos = qs[s] * (k - 1)
                                lo = int(pos)
                                at = _select(words, wb, lo)
                                res = pair_v[at]
                                if pos != lo:
                                    res += (pair_v[_next_set(words, wb, at)] - res) * (pos - lo)
                            elif p_now >= 0:  # rank of the current value
                                res = _rank_value(_count_below(words, wb, tie_lo[p_now]),
                                                  _count_below(words, wb, tie_hi[p_now]), k, method, ascending, pct)
                        out[s, t, c_out + c0 + j] = res
                cnt[j] = k


def _order_kernel_for(window: int, dtype, whats: np.ndarray) -> Callable:
    """The kernel ``_run`` calls for the statistics ``whats`` of ``window`` rows of a ``dtype``
    panel: ``_short_order_kernel`` up to _SHORT_WINDOW_BYTES (_SHORT_WINDOW_BYTES_F32 for float32,
    _SHORT_RANK_BYTES for ranks alone), else the block scheme's ``_order_columns``. Both take (x, out, window, min_periods, whats, qs,
    method, ascending, pct, first, stop)."""
    itemsize = np.dtype(dtype).itemsize
    if bool(np.all(whats == _RANK)):
        limit = _SHORT_RANK_BYTES
    else:
        limit = _SHORT_WINDOW_BYTES_F32 if itemsize == 4 else _SHORT_WINDOW_BYTES
    return _short_order_kernel if window * itemsize <= limit else _order_columns


def _order_columns(x, out, window, min_periods, whats, qs, method, ascending, pct, first, stop):
    """quantile / median / rank (``whats``, into ``out[k]``) of long windows: ``_order_kernel``
    over columns first..stop-1 of x, in chunks whose sort keys fit
    _ORDER_KEY_BYTES: numba writes the keys, numpy sorts them (its integer sort is several times
    faster than one compiled here), numba does the rest. numpy and the kernels release the GIL."""
    T = x.shape[0]
    block = _imax(window, _ORDER_MIN_BLOCK)
    row_bits = _imax(1, (block - 1).bit_length())
    padded = -(-T // block) * block
    chunk = _imax(_ORDER_STRIP, _ORDER_KEY_BYTES // (8 * padded) // _ORDER_STRIP * _ORDER_STRIP)
    size = _imin(chunk, stop - first)
    key_buf = np.empty(size * padded, dtype=np.int64)  # numpy's memory, reused: fewer page faults
    part_buf = np.empty(size * T)
    for c0 in range(first, stop, chunk):
        c1 = _imin(c0 + chunk, stop)
        keys = key_buf[:(c1 - c0) * padded].reshape(c1 - c0, padded // block, block)
        part = part_buf[:(c1 - c0) * T].reshape(T, c1 - c0)
        _block_keys(x, c0, c1, block, row_bits, keys, part)
        keys.sort(axis=-1)
        _order_kernel(part, keys, out, window, block, min_periods, whats, qs, method, ascending, pct, c0, row_bits)


