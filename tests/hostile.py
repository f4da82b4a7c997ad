"""Hostile files for the bad-input and security suites: payloads that run code if anything unpickles them."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class _Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"model": _Payload(marker)})


def torch_payload(marker: Path) -> bytes:
    """A torch.save file (a zip holding a pickle) whose loading with weights_only=False runs code."""
    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(marker)}, buf)
    return buf.getvalue()


def extension_type_parquet(table: pa.Table, column: str, marker: Path) -> bytes:
    """``table`` as Parquet whose ``column`` claims pyarrow's legacy pickled extension type
    (``arrow.py_extension_type``, CVE-2023-47248): a reader that honours it unpickles the payload."""
    i = table.schema.get_field_index(column)
    field = table.schema.field(i).with_metadata({b"ARROW:extension:name": b"arrow.py_extension_type",
                                                 b"ARROW:extension:metadata": pickle_payload(marker)})
    sink = io.BytesIO()
    pq.write_table(table.cast(table.schema.set(i, field)), sink)
    return sink.getvalue()
