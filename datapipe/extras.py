"""How to install an optional part of the package, spelled for the way it was installed.

From a clone (the package imported from a source checkout: `pip install -e .`, or run in
place) the fix is `pip install -e '.[EXTRA]'` in that checkout; from an installed wheel it is
`pip install 'mt30-datapipe[EXTRA]'`. The extras are those of pyproject.toml:
envs (dm_control, MuJoCo, matplotlib: evaluation), train (TensorBoard, rliable, SciPy:
reports), wandb, s3, bench, dev.
"""

from __future__ import annotations

from pathlib import Path

DISTRIBUTION = "mt30-datapipe"
_CHECKOUT = Path(__file__).resolve().parents[1]


def from_checkout() -> bool:
    """Whether the package runs from a source checkout (its pyproject.toml beside it)."""
    pyproject = _CHECKOUT / "pyproject.toml"
    return pyproject.is_file() and f'name = "{DISTRIBUTION}"' in pyproject.read_text()


def install_hint(extra: str) -> str:
    """The pip command that installs `extra`, e.g. "pip install 'mt30-datapipe[envs]'"."""
    if from_checkout():
        return f"pip install -e '{_CHECKOUT}[{extra}]'"
    return f"pip install '{DISTRIBUTION}[{extra}]'"


SPECS_SHARE = "share/mt30-datapipe/experiments"  # where a wheel installs the shipped specs


def shipped_specs_dir() -> Path | None:
    """The folder of the shipped experiment specs: experiments/ of the checkout, or where
    the wheel put them (the install prefix's share/, or the user base's); None if neither."""
    import site
    import sys

    if from_checkout():
        return _CHECKOUT / "experiments"
    for prefix in (sys.prefix, site.getuserbase()):
        folder = Path(prefix) / SPECS_SHARE
        if folder.is_dir():
            return folder
    return None
