"""
reproduce.py: the verdict rule on hand-made numbers, the claims from hand-made records, and the study
end to end on the `tiny` preset: its outputs parse, and a second run redoes nothing.

    python -m pytest -q test_reproduce.py
"""

import argparse
import csv
import json
import os
import time

import pytest
import torch

from conftest import run
from reproduce import CLAIMS, claim, jobs_to_run, value, verdict
from test_train_mlm import log_rows
from xmoe import XMoEConfig


def test_the_verdict_rule_by_hand():
    assert verdict([-0.1, -0.02, -0.5], -1) == "reproduced"  # the paper's sign in every seed
    assert verdict([-0.1, +0.02, -0.5], -1) == "inconclusive"  # the mean agrees, one seed does not
    assert verdict([+0.1, -0.02, +0.05], -1) == "not reproduced"  # the mean has the opposite sign
    assert verdict([+0.3, +0.1], +1) == "reproduced" and verdict([0.0, 0.2], +1) == "inconclusive"
    assert verdict([], +1) == "inconclusive"


def record(mlm, rc, rf, scores=None, ic=None, rc0=1.0):
    """Evaluations at step 0 (the control) and 4 more: the second half after step 0 is the last two."""
    tasks = {} if scores is None else {"udpos": {"avg_metric": scores, "ic": ic, "ic_curve": [[10, ic]]}}
    return {"steps": [0, 25, 50, 75, 100], "mlm": [9.0, 9.0, 5.0, 4.0, mlm], "rc": [rc0, 1.0, 1.0, rc - 1, rc + 1],
            "rc_trace": [1.0] * 5, "rf": [None, 0.9, 0.9, rf, rf], "tasks": tasks}


def test_claims_pair_the_runs_of_each_seed():
    records = {("xmoe-softmax", 1): record(3.0, 20.0, 0.1, [50, 52], 0.9),
               ("smoe-softmax", 1): record(3.1, 10.0, 0.3, [48, 50], 0.5),
               ("xmoe-softmax", 2): record(3.2, 5.0, 0.2, [40, 40], 0.8),
               ("smoe-softmax", 2): record(3.1, 15.0, 0.4, [41, 41], 0.7)}
    assert value(records["xmoe-softmax", 1], "rf") == 0.1  # the mean over the second half of the evaluations
    assert value(records["xmoe-softmax", 1], "rc") == 20.0  # after step 0: with it, (1 + 19 + 21) / 3
    assert value(record(3.0, 20.0, 0.1, rc0=4.0), "rc_ratio") == 5.0  # over its own step 0
    assert value(records["xmoe-softmax", 1], "rc_trend") == 2.0  # last minus first of the second half
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
    assert dense["seeds"] == 0 and dense["verdict"] == "not measured"  # Dense was not run: not "inconclusive"
    assert "`python reproduce.py` measures it" in dense["measured"]
    one_model = ("trend", "RC rises", "-", ("xmoe-softmax", None), "rc_trend", -1)  # about one model: d_k = its value
    trend = claim(records, one_model, [1, 2])
    assert trend["diffs"] == [2.0, 2.0] and trend["verdict"] == "not reproduced"
    records.pop(("smoe-softmax", 2))  # a seed without its pair: measured, but the rule needs every seed
    assert claim(records, specs["fig3a-rf"], [1, 2])["verdict"] == "inconclusive"


def fake_run(d, step, lr):
    """A finished pre-training run as jobs_to_run sees it: a checkpoint and the log's last evaluation."""
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "optimizer": {}, "step": step, "config": XMoEConfig.preset("tiny").to_dict(),
                "args": {"steps": step, "lr": lr}, "tokenizer": {"kind": "bytes"}}, d / "ckpt.pt")
    (d / "log.jsonl").write_text(json.dumps({"step": step, "val_mlm_loss": 3.0}) + "\n")


def test_a_fine_tuning_result_counts_only_for_the_checkpoint_it_came_from(tmp_path):
    args = argparse.Namespace(out=tmp_path, seeds=[1], steps=6, tasks=["udpos"], preset="tiny", training={},
                              device="cpu", max_train=10)
    d = tmp_path / "runs" / "xmoe-softmax" / "seed1"
    fake_run(d, 6, 1e-3)
    result = d / "udpos" / "results.json"
    result.parent.mkdir()
    result.write_text(json.dumps({"pretraining": {"step": 6, "args": {"steps": 6, "lr": 1e-3}}}))
    study = {"xmoe-softmax": []}
    assert jobs_to_run(args, study) == ([], [])  # the result belongs to this checkpoint
    fake_run(d, 6, 2e-3)  # trained again with another learning rate; the result is now the newer file
    os.utime(result, ns=(time.time_ns() + 10**9,) * 2)
    pre, fine = jobs_to_run(args, study)
    assert pre == [] and len(fine) == 1 and fine[0][fine[0].index("--out") + 1] == d / "udpos"
    args.steps = 8  # extended to more steps: pre-training first, then the fine-tuning again
    pre, fine = jobs_to_run(args, study)
    assert len(pre) == 1 and "--resume" in pre[0] and len(fine) == 1


def test_the_study_end_to_end_and_resumed(tmp_path):
    args = ["--quick", "--preset", "tiny", "--steps", 6, "--seeds", 1, 2, "--jobs", 2, "--out", tmp_path / "res"]
    first = run("reproduce.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    ids = {c["id"] for c in summary["claims"]}
    assert ids >= {"table2-mlm-softmax", "table2-mlm-sigmoid", "fig2c-rc", "fig3a-rf", "fig3b-ic",
                   "table1-avg-softmax", "table1-avg-sigmoid"}
    claims = {c["id"]: c for c in summary["claims"]}
    for cid in ("fig3b-ic", "table1-avg-softmax", "table1-avg-sigmoid", "table2-mlm-dense"):  # no runs for these
        assert claims[cid]["verdict"] == "not measured" and "`python reproduce.py` measures it" in claims[cid]["measured"]
    final = {(m, s): log_rows(tmp_path / "res" / "runs" / m / f"seed{s}", "eval")[-1]["val_mlm_loss"]
             for m in ("smoe-softmax", "xmoe-softmax") for s in (1, 2)}
    diffs = [final["xmoe-softmax", s] - final["smoe-softmax", s] for s in (1, 2)]  # from the logs, by hand
    mlm = claims["table2-mlm-softmax"]
    assert mlm["seeds"] == 2 and mlm["diffs"] == pytest.approx(diffs, abs=1e-12)
    assert mlm["verdict"] == ("reproduced" if max(diffs) < 0 else "not reproduced" if sum(diffs) > 0
                              else "inconclusive")
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
    # the collapse study's classroom size reuses the quick study's runs at the preset's own N (tiny: 4)
    collapse = run("reproduce.py", "--collapse", "--quick", "--preset", "tiny", "--steps", 6, "--seeds", 1,
                   "--jobs", 2, "--out", tmp_path / "res", cwd=tmp_path)
    assert collapse.returncode == 0, collapse.stdout + collapse.stderr
    assert "4 pre-training and 0 fine-tuning runs to do" in collapse.stdout  # smoe-detach at N 4, all 3 at N 16
    claims = {c["id"]: c for c in json.loads((tmp_path / "res" / "summary.json").read_text())["claims"]}
    assert {"collapse-read-share-N16", "collapse-read-share-N4", "collapse-detach", "collapse-n-over-d",
            "collapse-pr-xmoe", "collapse-rc-shared", "collapse-fig2c-smoe", "collapse-fig2c-xmoe"} <= set(claims)
    assert all(claims[c]["seeds"] == 1 for c in claims if c.startswith("collapse-"))
    rec = json.loads((tmp_path / "res" / "runs" / "smoe-detach-N16-seed1.json").read_text())
    assert rec["steps"][0] == 0 and rec["read_share_isotropic"][0] == 16 / 32  # SMoE reads N = 16 of d = 32
    assert "## The collapse study" in (tmp_path / "res" / "summary.md").read_text()


def test_bad_flags_are_a_clear_error(tmp_path):
    res = run("reproduce.py", "--tasks", "xnli", "--out", tmp_path / "res", cwd=tmp_path)
    assert res.returncode == 2 and "--tasks" in res.stderr and "Traceback" not in res.stderr
