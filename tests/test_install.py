"""A wheel install runs the README's commands from any folder: the wheel is built from this
checkout, installed into a fresh virtualenv, and a tiny experiment runs from a folder outside
the repository with a spec whose paths are relative to the spec file.

The fresh virtualenv gets the package from the wheel only; its dependencies (torch, zarr,
dm_control, ...) are this environment's, reached through a .pth file, since the test machine
may have no network to install them again. What the test proves is the package's side: what
the wheel holds (modules, entry points, shipped specs) and that nothing depends on running
from the checkout.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("dm_control")
REPO = Path(__file__).parents[1]


def _run(args, cwd, env=None):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout: the wheel is built from its tracked files")
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # the tracked files: the build writes nothing into the checkout
    listed = _run(["git", "ls-files", "-z"], cwd=REPO).split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
          "-q", "-w", str(root / "dist")], cwd=root)  # fmt: skip
    (wheel,) = (root / "dist").glob("mt30_datapipe-*.whl")
    env = root / "venv"
    _run([sys.executable, "-m", "venv", str(env)], cwd=root)
    _run([env / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=root)  # fmt: skip
    purelib = Path(
        _run([env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
             cwd=root).strip()
    )  # fmt: skip
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()] + [sysconfig.get_path("purelib")]
    (purelib / "dependencies.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    return env


def test_the_wheel_runs_an_experiment_from_outside_the_checkout(venv, tmp_path):
    bin_ = venv / "bin"
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    where = _run([bin_ / "python", "-c", "import trainer, datapipe; print(trainer.__file__)"],
                 cwd=tmp_path, env=env)  # fmt: skip
    assert where.startswith(str(venv)), where  # the wheel's code, not the checkout's
    work = tmp_path / "study"
    _run([bin_ / "tools", "make-mt30", "--dst", str(work / "src"), "--episodes-per-task", "1",
          "--no-progress"], cwd=tmp_path, env=env)  # fmt: skip
    _run([bin_ / "datapipe", "build", "--src", str(work / "src"), "--dst", str(work / "store"),
          "--workers", "0", "--no-progress"], cwd=tmp_path, env=env)  # fmt: skip
    (work / "specs").mkdir()
    (work / "specs" / "tiny.toml").write_text(
        '[base]\nshards = "../store"\nsteps = 2\nbatch_size = 8\neval_every = 2\n'
        'eval_tasks = ["cartpole-balance"]\neval_episodes = 1\nseeds = [1]\nlog_every = 1\n'
        'save_every = 2\ncache_gb = 0.05\ndevice = "cpu"\n\n[[arm]]\nname = "scratch"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([bin_ / "trainer", "experiment", "../study/specs/tiny.toml", "--out", "exp",
          "--no-progress"], cwd=elsewhere, env=env)  # fmt: skip
    assert "| scratch | train | 1 |" in (elsewhere / "exp" / "report.md").read_text()
    listed = _run([bin_ / "trainer", "specs"], cwd=elsewhere, env=env)
    assert f"{venv}/share/mt30-datapipe/experiments" in listed and "cpu-study " in listed
    demo = _run([bin_ / "trainer", "specs", "demo"], cwd=elsewhere, env=env)
    assert 'shards = "../runs/demo/shards"' in demo
    hint = _run([bin_ / "python", "-c", "from datapipe.extras import install_hint as h; "
                 "print(h('envs'))"], cwd=elsewhere, env=env)  # fmt: skip
    assert hint.strip() == "pip install 'mt30-datapipe[envs]'"
