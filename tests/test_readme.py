"""The README's module map is the project's table of contents: every file it lists exists
in the folder it lists it under, and every module and script of the packages and their
subpackages is listed (a subpackage in its own section, or as `name/` in its parent's).
The facts the code cites live in docs/: every `docs/NAME.md#anchor` pointer names a heading
there, and nothing points at the development notes beside the repository, which a clone
does not have."""

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


def _ours(folder: str) -> bool:
    return folder.split("/")[0] in PACKAGES


def test_every_listed_file_exists_where_it_is_listed():
    for folder, names in module_map().items():
        if not _ours(folder):
            continue
        assert (ROOT / folder / "__init__.py").is_file(), f"README lists {folder}/, no package"
        for name in names:
            matches = list((ROOT / folder).glob(name.rstrip("/")))
            assert matches, f"README lists {folder}/{name}, which does not exist"


def test_every_module_is_listed():
    listed = module_map()
    for package in PACKAGES:
        assert package in listed, f"README's module map has no {package}/ section"
    for folder in [f for f in listed if _ours(f)]:
        for path in sorted((ROOT / folder).iterdir()):
            if path.name in NOT_LISTED or path.name.startswith((".", "__pycache__")):
                continue
            name = f"{path.name}/" if path.is_dir() else path.name
            own_section = path.is_dir() and f"{folder}/{path.name}" in listed
            assert own_section or any(fnmatch.fnmatch(name, p) for p in listed[folder]), (
                f"{folder}/{name} is not in the README's module map"
            )


# `docs/tdmpc2.md#update`, optionally followed by more anchors of the same page: `, #batch`.
POINTER = re.compile(r"docs/([a-z0-9_]+\.md)(#[a-z0-9-]+(?:,\s*#[a-z0-9-]+)*)")
DOC_LINK = re.compile(r"\]\(([a-z0-9_]+\.md)?(#[a-z0-9-]+)\)")  # [text](page.md#a), [text](#a)


def cited_files() -> list[Path]:
    """Every file whose comments, docstrings or text may cite docs/."""
    files = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    files += (ROOT / "tests").glob("*.py")
    return files + list(ROOT.glob("*.md")) + list((ROOT / "docs").glob("*.md"))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (lower case, punctuation dropped)."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"^#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def pointers(path: Path) -> list[tuple[str, str]]:
    """(page, anchor) of every docs pointer in `path`; links inside docs/ count too."""
    text = path.read_text()
    found = [
        (page, anchor)
        for page, tail in POINTER.findall(text)
        for anchor in re.findall(r"#[a-z0-9-]+", tail)
    ]
    if path.parent == ROOT / "docs":
        found += [(page or path.name, anchor) for page, anchor in DOC_LINK.findall(text)]
    return found


def test_every_docs_pointer_names_a_heading():
    targets = {page.name: anchors(page) for page in (ROOT / "docs").glob("*.md")}
    assert {"tdmpc2.md", "mt30.md", "distillation.md"} <= set(targets)
    cited = {(path, page, anchor) for path in cited_files() for page, anchor in pointers(path)}
    assert len(cited) > 100, "the pointer pattern no longer finds the code's docs/ pointers"
    for path, page, anchor in sorted(cited):
        where = path.relative_to(ROOT)
        assert page in targets, f"{where} points at docs/{page}, which does not exist"
        assert anchor[1:] in targets[page], (
            f"{where} points at docs/{page}{anchor}, which is no heading of that page; "
            f"its anchors: {sorted(targets[page])}"
        )


def test_nothing_points_at_the_development_notes():
    notes = "shared" + "/spec"  # spelled in two parts so this file does not match itself
    for path in cited_files():
        assert notes not in path.read_text(), (
            f"{path.relative_to(ROOT)} cites ../{notes}, which a clone does not have; "
            f"point at the matching docs/ section instead"
        )
