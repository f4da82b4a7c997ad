"""Rows going into the store: cast to the schema and validated (``conform``), keyed, de-duplicated, and
merged with stored rows by key (``merge_tables``). Pure Arrow/numpy: no files."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import BadInputError, ConflictError
from .schema import F64, KEYS, NONNEGATIVE, SCHEMAS


def _to_arrow(data) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    raise BadInputError(f"expected a pyarrow Table or pandas DataFrame, got {type(data).__name__}")


def _describe_key(table: pa.Table, kind: str, i: int) -> str:
    return ", ".join(f"{k}={table.column(k)[i].as_py()}" for k in KEYS[kind])


def conform(data, kind: str, label: str = "") -> pa.Table:
    """Cast ``data`` to the kind's schema, validate values, sort by key and drop exact duplicates.

    Raises BadInputError naming the column, the row and the value for unknown columns, missing keys,
    uncastable values, inf, negative prices or volumes, and duplicate keys with different values.
    Instants are floored to microseconds (what the store keeps); :func:`conform_counted` says how many.
    """
    return conform_counted(data, kind, label)[0]


def conform_counted(data, kind: str, label: str = "") -> tuple[pa.Table, int]:
    """:func:`conform`, and how many instants had a sub-microsecond part that was floored away (before
    ``seq`` numbering and de-duplication, so keys stay unique in what is stored)."""
    rounded = 0
    schema = SCHEMAS[kind]
    table = _to_arrow(data)
    where = f"{label}: " if label else ""
    unknown = [n for n in table.column_names if n not in schema.names]
    if unknown:
        raise BadInputError(f"{where}unknown column(s) {unknown}; the {kind} schema has {schema.names}")
    missing = [k for k in KEYS[kind] if k not in table.column_names and k != "seq"]
    if missing:
        raise BadInputError(f"{where}missing key column(s) {missing}")
    if table.num_rows == 0:
        raise BadInputError(f"{where}no rows to write (the input is empty)")
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if pa.types.is_boolean(col.type) and pa.types.is_floating(field.type):  # True would become 1.0
                raise BadInputError(f"{where}column {field.name!r} holds true/false values, not numbers")
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise BadInputError(f"{where}column {field.name!r} cannot be read as {field.type}: {exc}") from None
            if pa.types.is_floating(field.type):
                bad_inf = pc.is_inf(col)
                if pc.any(bad_inf).as_py():
                    i = pc.index(bad_inf, True).as_py()
                    raise BadInputError(f"{where}column {field.name!r} has an infinite value at row {i}; "
                                        "fix or drop that row")
                col = pc.if_else(pc.is_nan(col), pa.scalar(None, F64), col)
            if field.name in NONNEGATIVE:
                neg = pc.fill_null(pc.less(col, 0), False)
                if pc.any(neg).as_py():
                    i = pc.index(neg, True).as_py()
                    raise BadInputError(f"{where}column {field.name!r} has a negative value {col[i].as_py()} "
                                        f"at row {i}; prices and volumes must be >= 0")
            if field.name == "time":  # parts keep microseconds: floor finer instants, and count them
                ns = col.cast(pa.int64())
                fine = pc.not_equal(pc.fill_null(pc.subtract(ns, pc.multiply(pc.divide(ns, 1000), 1000)), 0), 0)
                rounded = pc.sum(fine.cast(pa.int64())).as_py() or 0
                if rounded:
                    col = pc.floor_temporal(col, unit="microsecond")
            if field.name == "split":
                nonpos = pc.fill_null(pc.less_equal(col, 0), False)
                if pc.any(nonpos).as_py():
                    raise BadInputError(f"{where}column 'split' must be > 0 (1 = no split)")
        elif field.name == "seq":
            col = pa.nulls(table.num_rows, field.type)  # filled below
        else:
            col = pa.nulls(table.num_rows, field.type)
        cols.append(col)
    out = pa.Table.from_arrays(cols, schema=schema)
    for k in KEYS[kind]:
        if k != "seq" and out.column(k).null_count:
            i = pc.index(pc.is_null(out.column(k)), True).as_py()
            raise BadInputError(f"{where}key column {k!r} is empty at row {i}")
    if kind == "ticks" and out.column("seq").null_count == out.num_rows:
        out = out.set_column(1, "seq", pa.array(_seq_within_time(out.column("time")), pa.int32()))
    if kind == "ticks":
        order = pc.sort_indices(out, [("time", "ascending"), ("seq", "ascending")])
    else:
        order = pc.sort_indices(out, [(KEYS[kind][0], "ascending")])
    out = out.take(order)
    return _dedupe(out, kind, where), rounded


def _seq_within_time(times: pa.ChunkedArray) -> np.ndarray:
    """0, 1, 2... for records sharing an instant, in input order (a stable sort keeps it)."""
    t = times.to_numpy().astype("int64")
    order = np.argsort(t, kind="stable")
    ts = t[order]
    start = np.r_[True, ts[1:] != ts[:-1]]
    run_start = np.maximum.accumulate(np.where(start, np.arange(len(ts)), 0))
    seq = np.empty(len(t), np.int64)
    seq[order] = np.arange(len(ts)) - run_start
    return seq


def _keys(kind: str, *tables: pa.Table) -> list[np.ndarray]:
    """Sortable int64 keys, comparable across ``tables`` (daily: days; intraday: ns; ticks: ranks)."""
    if kind == "daily":
        return [t.column("date").cast(pa.int32()).to_numpy().astype(np.int64) for t in tables]
    times = [t.column("time").cast(pa.int64()).to_numpy() for t in tables]
    if kind != "ticks":
        return times
    # (time, seq) pairs -> dense lexicographic ranks over all tables together
    seqs = [t.column("seq").cast(pa.int64()).to_numpy() for t in tables]
    t_all, s_all = np.concatenate(times), np.concatenate(seqs)
    order = np.lexsort((s_all, t_all))
    ts, ss = t_all[order], s_all[order]
    new_group = np.r_[True, (ts[1:] != ts[:-1]) | (ss[1:] != ss[:-1])]
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.cumsum(new_group) - 1
    return np.split(ranks, np.cumsum([len(x) for x in times])[:-1])


def _key_array(table: pa.Table, kind: str) -> np.ndarray:
    return _keys(kind, table)[0]


def _values_equal(a: pa.Table, b: pa.Table) -> np.ndarray:
    """Row-wise equality of two aligned tables (nulls equal nulls; floats to 1e-10 relative)."""
    eq = np.ones(a.num_rows, bool)
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        xn, yn = x.is_null().to_numpy(zero_copy_only=False), y.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_floating(x.type):
            xv = x.fill_null(0).to_numpy()
            yv = y.fill_null(0).to_numpy()
            same = np.abs(xv - yv) <= 1e-10 * np.maximum(np.abs(xv), np.abs(yv))
        else:
            same = x.fill_null(0).to_numpy() == y.fill_null(0).to_numpy()
        eq &= (xn & yn) | (~xn & ~yn & same)
    return eq


def _dedupe(table: pa.Table, kind: str, where: str) -> pa.Table:
    keys = _key_array(table, kind)
    if len(keys) < 2:
        return table
    dup = keys[1:] == keys[:-1]
    if not dup.any():
        return table
    idx = np.nonzero(dup)[0]
    a, b = table.take(pa.array(idx)), table.take(pa.array(idx + 1))
    same = _values_equal(a, b)
    if not same.all():
        i = int(idx[~same][0])
        raise ConflictError(
            f"{where}duplicate timestamp {_describe_key(table, kind, i)} with different values "
            f"in the new data ({int((~same).sum())} such rows); keep one row per timestamp"
        )
    keep = np.ones(table.num_rows, bool)
    keep[idx + 1] = False
    return table.filter(pa.array(keep))


def _merge_tables(existing: pa.Table, new: pa.Table, kind: str, on_conflict: str, label: str):
    """Union of stored and new rows by key. Returns (table, (added, updated, unchanged, conflicts))."""
    ek, nk = _keys(kind, existing, new)
    pos = np.searchsorted(ek, nk)
    pos_c = np.minimum(pos, len(ek) - 1)
    matched = (pos < len(ek)) & (ek[pos_c] == nk)
    mi_new = np.nonzero(matched)[0]
    mi_old = pos_c[matched]
    value_cols = [c for c in existing.column_names if c not in KEYS[kind] and c != "date"]
    old_rows = existing.take(pa.array(mi_old)).select(value_cols)
    new_rows = new.take(pa.array(mi_new)).select(value_cols)
    # a value is in conflict when both sides have it and they differ; a side's null is filled by the other
    conflict = np.zeros(len(mi_new), bool)
    fill = np.zeros(len(mi_new), bool)
    first_conflict = None
    for name in value_cols:
        a, b = old_rows.column(name), new_rows.column(name)
        an = a.is_null().to_numpy(zero_copy_only=False)
        bn = b.is_null().to_numpy(zero_copy_only=False)
        both = ~an & ~bn
        eq = _values_equal(pa.table({name: a}), pa.table({name: b}))
        c = both & ~eq
        if c.any() and first_conflict is None:
            i = int(np.nonzero(c)[0][0])
            first_conflict = (name, i, a[i].as_py(), b[i].as_py())
        conflict |= c
        fill |= an & ~bn
    n_conf = int(conflict.sum())
    if n_conf and on_conflict == "error":
        name, i, a, b = first_conflict
        key = _describe_key(new, kind, int(mi_new[i]))
        raise ConflictError(
            f"{label}: {n_conf} row(s) conflict with stored values, e.g. {key} {name}: stored {a!r}, "
            f"new {b!r}. Nothing was written; pass on_conflict='overwrite' (CLI: --on-conflict overwrite) "
            "to let the new source win, or 'keep' to keep the stored values")
    # per cell: the new value where the stored one is null, or where it conflicts and new wins
    cols = {}
    for name in value_cols:
        a, b = old_rows.column(name), new_rows.column(name)
        use_new = a.is_null().to_numpy(zero_copy_only=False)
        if on_conflict == "overwrite":
            use_new = use_new | ~b.is_null().to_numpy(zero_copy_only=False)
        cols[name] = pc.if_else(pa.array(use_new), b, a) if len(use_new) else a
    changed = conflict if on_conflict == "overwrite" else np.zeros_like(conflict)
    changed = changed | fill
    updated = existing
    if changed.any():
        # rebuild the matched old rows with chosen values
        upd_idx = mi_old[changed]
        rows = pa.table({n: cols[n].filter(pa.array(changed)) for n in value_cols})
        keep_mask = np.ones(existing.num_rows, bool)
        keep_mask[upd_idx] = False
        keyed = existing.take(pa.array(upd_idx)).select([c for c in existing.column_names if c not in value_cols])
        replaced = pa.Table.from_arrays(
            [keyed.column(c) if c in keyed.column_names else rows.column(c) for c in existing.column_names],
            names=existing.column_names).cast(existing.schema)
        updated = pa.concat_tables([existing.filter(pa.array(keep_mask)), replaced])
    added_rows = new.filter(pa.array(~matched))
    out = pa.concat_tables([updated, added_rows.cast(existing.schema)])
    if kind == "ticks":
        out = out.take(pc.sort_indices(out, [("time", "ascending"), ("seq", "ascending")]))
    else:
        out = out.take(pc.sort_indices(out, [(KEYS[kind][0], "ascending")]))
    stats = (int((~matched).sum()), int(changed.sum()), int(len(mi_new) - changed.sum()), n_conf)
    return out, stats


def _key_json(table: pa.Table, kind: str, i: int):
    if kind == "ticks":
        return [table.column("time").cast(pa.int64())[i].as_py(), table.column("seq")[i].as_py()]
    return int(_key_array(table, kind)[i])


def _key_scalar(key):
    return tuple(key) if isinstance(key, list) else key
