"""
reproduce.py: the verdict rule on hand-made numbers, the claims from hand-made records, and the study
end to end on the `tiny` preset: its outputs parse, and a second run redoes nothing.

    python -m pytest -q test_reproduce.py
"""

import csv
import json

import pytest

from conftest import run
from reproduce import CLAIMS, claim, value, verdict


def test_the_verdict_rule_by_hand():
    assert verdict([-0.1, -0.02, -0.5], -1) == "reproduced"  # the paper's sign in every seed
    assert verdict([-0.1, +0.02, -0.5], -1) == "inconclusive"  # the mean agrees, one seed does not
    assert verdict([+0.1, -0.02, +0.05], -1) == "not reproduced"  # the mean has the opposite sign
    assert verdict([+0.3, +0.1], +1) == "reproduced" and verdict([0.0, 0.2], +1) == "inconclusive"
    assert verdict([], +1) == "inconclusive"


def record(mlm, rc, rf, scores=None, ic=None):
    tasks = {} if scores is None else {"udpos": {"avg_metric": scores, "ic": ic, "ic_curve": [[10, ic]]}}
    return {"mlm": [9.0, mlm], "rc": [1.0, rc], "rc_trace": [1.0, 1.0], "rf": [None, 0.9, rf, rf], "tasks": tasks}


def test_claims_pair_the_runs_of_each_seed():
    records = {("xmoe-softmax", 1): record(3.0, 20.0, 0.1, [50, 52], 0.9),
               ("smoe-softmax", 1): record(3.1, 10.0, 0.3, [48, 50], 0.5),
               ("xmoe-softmax", 2): record(3.2, 5.0, 0.2, [40, 40], 0.8),
               ("smoe-softmax", 2): record(3.1, 15.0, 0.4, [41, 41], 0.7)}
    assert value(records["xmoe-softmax", 1], "rf") == 0.1  # the mean over the second half of the evaluations
    specs = {c[0]: c for c in CLAIMS}
    mlm = claim(records, specs["table2-mlm-softmax"], [1, 2])
    assert mlm["diffs"] == pytest.approx([-0.1, 0.1]) and mlm["verdict"] == "inconclusive"  # mean 0
    rc = claim(records, specs["fig2c-rc"], [1, 2])
    assert rc["diffs"] == pytest.approx([10.0, -10.0]) and rc["verdict"] == "inconclusive"
    rf = claim(records, specs["fig3a-rf"], [1, 2])
    assert rf["diffs"] == pytest.approx([-0.2, -0.2]) and rf["verdict"] == "reproduced"
    avg = claim(records, specs["table1-avg-softmax"], [1, 2])  # 51 - 49 = +2, 40 - 41 = -1: mean +0.5
    assert avg["diffs"] == pytest.approx([2.0, -1.0]) and avg["verdict"] == "inconclusive"
    ic = claim(records, specs["fig3b-ic"], [1, 2])
    assert ic["diffs"] == pytest.approx([0.4, 0.1]) and ic["verdict"] == "reproduced"
    dense = claim(records, specs["table2-mlm-dense"], [1, 2])  # Dense was not run
    assert dense["seeds"] == 0 and dense["verdict"] == "inconclusive" and "not measured" in dense["measured"]


def test_the_study_end_to_end_and_resumed(tmp_path):
    args = ["--quick", "--preset", "tiny", "--steps", 6, "--seeds", 1, 2, "--jobs", 2, "--out", tmp_path / "res"]
    first = run("reproduce.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    ids = {c["id"] for c in summary["claims"]}
    assert ids >= {"table2-mlm-softmax", "table2-mlm-sigmoid", "fig2c-rc", "fig3a-rf", "fig3b-ic",
                   "table1-avg-softmax", "table1-avg-sigmoid"}
    for c in summary["claims"]:
        assert set(c) >= {"id", "claim", "paper", "measured", "seeds", "verdict"}
        assert c["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert [c["seeds"] for c in summary["claims"] if c["id"] == "table2-mlm-softmax"] == [2]
    assert "reproduced" in summary["verdict_rule"] and "every seed" in summary["verdict_rule"]
    for model in ("smoe-softmax", "xmoe-softmax"):
        for seed in (1, 2):
            rec = json.loads((tmp_path / "res" / "runs" / f"{model}-seed{seed}.json").read_text())
            assert rec["steps"][-1] == 6 and len(rec["mlm"]) == len(rec["rc"]) == len(rec["steps"])
        rows = list(csv.reader(open(tmp_path / "res" / f"map_{model}.csv")))
        assert len(rows) > 100 and all(len(r) == 3 for r in rows[1:])
    rows = list(csv.DictReader(open(tmp_path / "res" / "curves.csv")))
    assert {r["metric"] for r in rows} >= {"rc", "rf", "mlm"}
    assert "| claim |" in (tmp_path / "res" / "summary.md").read_text()
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "res" / "runs").rglob("log.jsonl")}
    second = run("reproduce.py", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "0 pre-training and 0 fine-tuning runs to do" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in logs} == logs  # nothing was retrained


def test_bad_flags_are_a_clear_error(tmp_path):
    res = run("reproduce.py", "--tasks", "xnli", "--out", tmp_path / "res", cwd=tmp_path)
    assert res.returncode == 2 and "--tasks" in res.stderr and "Traceback" not in res.stderr
