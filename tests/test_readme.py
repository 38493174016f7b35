"""The README's module map is the project's table of contents: every file it lists exists
in the folder it lists it under, and every module and script of the packages is listed."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datapipe", "trainer", "tools")
NOT_LISTED = {"__init__.py", "__main__.py"}


def module_map() -> dict[str, set[str]]:
    """Folder -> names (or patterns like bench_*.py) from the README's module-map block."""
    blocks, current = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            current = [] if current is None else blocks.append(current)
        elif current is not None:
            current.append(line)
    block = "\n".join(next(b for b in blocks if "datapipe/" in b))
    listed: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        if re.match(r"^[a-z_]+/", line):
            folder = line.split()[0].rstrip("/")
            listed.setdefault(folder, set())
        elif folder is not None and line.startswith("  ") and not line.startswith("   "):
            for token in line.split():  # "name.py  what it does" or "a.py, b.py  what ..."
                listed[folder].add(token.rstrip(","))
                if not token.endswith(","):
                    break
    return listed


def test_every_listed_file_exists_where_it_is_listed():
    for folder, names in module_map().items():
        if folder not in PACKAGES:
            continue
        for name in names:
            matches = list((ROOT / folder).glob(name.rstrip("/")))
            assert matches, f"README lists {folder}/{name}, which does not exist"


def test_every_module_is_listed():
    listed = module_map()
    for package in PACKAGES:
        assert package in listed, f"README's module map has no {package}/ section"
        for path in sorted((ROOT / package).iterdir()):
            if path.name in NOT_LISTED or path.name.startswith((".", "__pycache__")):
                continue
            name = f"{path.name}/" if path.is_dir() else path.name
            assert any(fnmatch.fnmatch(name, pattern) for pattern in listed[package]), (
                f"{package}/{name} is not in the README's module map"
            )
