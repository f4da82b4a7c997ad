"""A new user follows the README: a plain virtual environment, the quick start's first command exactly as
written (install, then `fintensor demo`), and the figures it promises. The second command (the tests) is
checked to be what CI runs, not run: it would recurse into this very test."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from fintensor.demo import FIGURES

REPO = Path(__file__).resolve().parents[1]
#: What a fresh clone would not have: environments, caches, build and demo outputs.
NOT_IN_A_CLONE = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "build", "dist",
                  "demo_out", "out", "*.nbi", "*.nbc")


def quick_start_commands() -> list[str]:
    """The lines of the first fenced bash block under '## Quick start' in README.md."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)
    assert len(section) == 2, "README.md has no '## Quick start' section"
    block = re.search(r"```bash\n(.*?)```", section[1], re.S)
    assert block, "the quick start has no ```bash block"
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2, f"expected two quick-start commands (install + demo, then tests), got {lines}"
    return lines


def steps(command: str) -> list[list[str]]:
    """'a && b  # comment' -> [[a's words], [b's words]], each without `python -m` and `-q`."""
    words = shlex.split(command, comments=True)
    out, step = [], []
    for w in words + ["&&"]:
        if w == "&&":
            out.append([x for x in step if x != "-q"])
            step = []
        else:
            step.append(w)
    return [s[2:] if s[:2] == ["python", "-m"] else s for s in out]


def test_the_test_command_is_what_ci_runs():
    ci = [steps(line) for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    ci_steps = [s for line in ci for s in line]
    tests = steps(quick_start_commands()[1])
    assert any(step[:1] == ["pytest"] for step in tests), "the second quick-start command runs the tests"
    for step in tests:
        assert step in ci_steps, f"`{' '.join(step)}` from the README is not in .ci/run"


@pytest.mark.slow
def test_a_new_user_runs_the_quick_start(tmp_path):
    install_and_demo = quick_start_commands()[0]
    assert "fintensor demo" in install_and_demo
    clone = tmp_path / "fintensor"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)  # a plain venv: no system site-packages
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "NUMBA_CACHE_DIR")}
    env.update(VIRTUAL_ENV=str(env_dir), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", MPLBACKEND="Agg")
    run = subprocess.run(["bash", "-c", install_and_demo], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, f"`{install_and_demo}` failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert shutil.which("fintensor", path=str(bin_dir)), "fintensor is not installed in the new environment"
    assert "done in" in run.stdout
    for name in FIGURES:
        assert (clone / "demo_out" / f"{name}.png").stat().st_size > 10_000, name
    print(run.stdout[-2500:])  # shown with -s: the demo's stage timings on a cold numba cache
