"""The notebooks run top to bottom (nbclient, on this interpreter's kernel) and are saved with their outputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_BYTES = 2_000_000  # all notebooks together, outputs included


def kernel_manager(folder: Path):
    """A KernelManager whose 'python3' kernel is this interpreter (not whatever 'python' is on PATH)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (fintensor)", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def execute(path: Path, scratch: Path, timeout: int = 600):
    """Run the notebook in its own folder; return it with fresh outputs (raises on the first failing cell)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(scratch), timeout=timeout,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def test_there_are_four_notebooks_saved_with_their_outputs():
    import nbformat

    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]
    assert sum(p.stat().st_size for p in NOTEBOOKS) < MAX_BYTES
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{path.name}: save it executed, top to bottom"
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), path.name
        assert not any(out.get("output_type") == "error" for c in code for out in c.outputs), path.name
        assert images(nb) >= 2, f"{path.name}: a reader on GitHub should see its plots"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FINTENSOR_SHARED_DATA", str(shared_data))
    nb = execute(path, tmp_path)
    assert images(nb) >= 2
    text = "".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)
    if path.stem.startswith("04"):  # offline, the fallback announces itself; online, every symbol downloads
        assert "offline: importing" in text or ("symbol  status" in text and "failed" not in text)


if __name__ == "__main__":  # `python tests/test_notebooks.py`: re-run every notebook and save it with its outputs
    import tempfile

    import nbformat

    for notebook in NOTEBOOKS:
        nbformat.write(execute(notebook, Path(tempfile.mkdtemp())), notebook)
        print("saved", notebook.relative_to(notebook.parents[1]))
