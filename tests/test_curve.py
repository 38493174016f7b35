"""`trainer curve`: one comparison across experiments, read from their report.json files."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer.cli import main
from trainer.study.curve import CurveError, parse_point

STUDY = Path(__file__).parents[1] / "results" / "cpu-study" / "report.json"


@pytest.fixture
def points(tmp_path):
    """Two experiment folders holding the CPU study's committed report, the second with its
    difference shifted so the points differ."""
    folders = []
    for name, shift in (("a", 0.0), ("b", 1.5)):
        report = json.loads(STUDY.read_text())
        c = report["comparisons"]["distill-0.4"]
        c["diff_mean"] += shift
        c["diff_mean_ci95"] = [v + shift for v in c["diff_mean_ci95"]]
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        folders.append(tmp_path / name)
    return folders


def test_curve_takes_every_point_from_its_report(points, tmp_path):
    out = tmp_path / "curve"
    args = ["curve", "--point", f"8={points[1]}", "--point", f"2={points[0]}"]
    r = CliRunner().invoke(main, [*args, "--arm", "distill-0.4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    curve = json.loads((out / "curve.json").read_text())
    assert [p["x"] for p in curve["points"]] == [2.0, 8.0]  # sorted by x
    study = json.loads(STUDY.read_text())
    first, second = curve["points"]
    assert first["baseline"] == "scratch"
    assert first["comparison"] == study["comparisons"]["distill-0.4"]
    assert second["comparison"]["diff_mean"] == pytest.approx(
        first["comparison"]["diff_mean"] + 1.5
    )
    assert first["reward_mae"]["scratch"] == study["reward_errors"]["arms"]["scratch"]
    teacher = study["reward_errors"]["models"]["teacher:runs/cpu-study-data/teacher-fp16.pt"]
    assert first["teacher_mae"]["mae"] == teacher["mae"]
    table = (out / "curve.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| 2 | ") and table[3].startswith("| 8 | ")
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_curve_names_what_is_missing(points, tmp_path):
    run = CliRunner().invoke
    r = run(main, ["curve", "--point", f"2={tmp_path}", "--arm", "distill-0.4", "--out", "x"])
    assert r.exit_code == 1 and f"{tmp_path}/report.json: no such file" in r.output
    assert "trainer report" in r.output
    r = run(main, ["curve", "--point", f"2={points[0]}", "--arm", "nope", "--out", "x"])
    assert r.exit_code == 1 and "no arm 'nope'" in r.output and "Traceback" not in r.output
    with pytest.raises(CurveError, match="X=DIR"):
        parse_point("two=runs/x")
