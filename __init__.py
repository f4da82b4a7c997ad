"""Not the package (that is fintensor/ below). Python imports this file as ``fintensor`` only when it is
started in the folder that *contains* the clone: ``import fintensor`` then finds the clone's root first.
Without this file that is an empty namespace package (``module 'fintensor' has no attribute 'build'``);
with it, the real package is loaded in its place and one line on stderr says what happened.
Imported under any other name (pytest collecting the repository root), it does nothing.
"""
if __name__ == "fintensor":
    import importlib.util as _util
    import sys as _sys
    from pathlib import Path as _Path

    _clone = _Path(__file__).absolute().parent
    _real = _clone / "fintensor" / "__init__.py"
    print(f"note: Python was started in {_clone.parent}, the folder that contains the clone {_clone}; "
          f"`import fintensor` found the clone itself and loads the package {_real.parent} instead "
          f"(start Python inside the clone, or pip install it, to avoid this)", file=_sys.stderr)
    _spec = _util.spec_from_file_location("fintensor", _real, submodule_search_locations=[str(_real.parent)])
    _package = _util.module_from_spec(_spec)
    _sys.modules["fintensor"] = _package  # the import statement returns what sys.modules holds at the end
    _spec.loader.exec_module(_package)
