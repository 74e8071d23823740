"""
reproduce.py: the verdict rule on hand-made numbers, the claims from hand-made records, the collapse
study's values by hand and its claims as pre-registered, and both studies end to end on the `tiny`
preset: their outputs parse, the claims follow from the logs, and a second run redoes nothing.

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
from reproduce import CLAIMS, claim, collapse_claims, collapse_study, jobs_to_run, value, verdict
from test_train_mlm import log_rows
from xmoe import XMoEConfig


def test_the_verdict_rule_by_hand():
    assert verdict([-0.1, -0.02, -0.5], -1) == "reproduced"  # the paper's sign in every seed
    assert verdict([+0.1, +0.02, +0.5], -1) == "not reproduced"  # the opposite sign in every seed
    assert verdict([-0.1, +0.02, -0.5], -1) == "inconclusive"  # the mean agrees, one seed does not
    assert verdict([+0.1, -0.02, +0.05], -1) == "inconclusive"  # the mean disagrees, one seed does not
    assert verdict([0.3, 0.1, 0.0], +1) == "inconclusive"  # a zero difference has neither sign
    assert verdict([0.3, 0.1, 0.2, 0.4, 0.1], +1) == "reproduced" and verdict([-1.0] * 5, +1) == "not reproduced"
    assert verdict([+0.3, +0.1], +1) == "too few seeds" and verdict([-0.3], +1) == "too few seeds"
    assert verdict([], +1) == "not measured"


def record(mlm, rc, rf, scores=None, ic=None, rc0=1.0):
    """Evaluations at step 0 (the control) and 4 more: the second half after step 0 is the last two."""
    tasks = {} if scores is None else {"udpos": {"avg_metric": scores, "ic": ic, "ic_curve": [[10, ic]]}}
    return {"steps": [0, 25, 50, 75, 100], "mlm": [9.0, 9.0, 5.0, 4.0, mlm], "rc": [rc0, 1.0, 1.0, rc - 1, rc + 1],
            "rc_trace": [1.0] * 5, "rf": [None, 0.9, 0.9, rf, rf], "tasks": tasks}


def test_claims_pair_the_runs_of_each_seed():
    records = {("xmoe-softmax", 1): record(3.0, 20.0, 0.1, [50, 52], 0.9),
               ("smoe-softmax", 1): record(3.1, 10.0, 0.3, [48, 50], 0.5),
               ("xmoe-softmax", 2): record(3.2, 5.0, 0.2, [40, 40], 0.8),
               ("smoe-softmax", 2): record(3.1, 15.0, 0.4, [41, 41], 0.7),
               ("xmoe-softmax", 3): record(3.0, 30.0, 0.1, [45, 45], 0.6),
               ("smoe-softmax", 3): record(3.3, 10.0, 0.2, [44, 44], 0.4),
               **{("dense", s): record(3.0, 1.0, 0.5) for s in (1, 2, 3)}}
    assert value(records["xmoe-softmax", 1], "rf") == 0.1  # the mean over the second half of the evaluations
    assert value(records["xmoe-softmax", 1], "rc") == 20.0  # after step 0: with it, (1 + 19 + 21) / 3
    assert value(record(3.0, 20.0, 0.1, rc0=4.0), "rc_ratio") == 5.0  # over its own step 0
    specs, seeds = {c[0]: c for c in CLAIMS}, [1, 2, 3]
    mlm = claim(records, specs["table2-mlm-softmax"], seeds)
    assert mlm["diffs"] == pytest.approx([-0.1, 0.1, -0.3]) and mlm["verdict"] == "inconclusive"
    assert mlm["values"] == [[3.0, 3.1], [3.2, 3.1], [3.0, 3.3]]  # each seed's pair, for the summary
    rc = claim(records, specs["fig2c-rc"], seeds)
    assert rc["diffs"] == pytest.approx([10.0, -10.0, 20.0]) and rc["verdict"] == "inconclusive"
    rf = claim(records, specs["fig3a-rf"], seeds)
    assert rf["diffs"] == pytest.approx([-0.2, -0.2, -0.1]) and rf["verdict"] == "reproduced"
    avg = claim(records, specs["table1-avg-softmax"], seeds)  # 51 - 49, 40 - 41, 45 - 44
    assert avg["diffs"] == pytest.approx([2.0, -1.0, 1.0]) and avg["verdict"] == "inconclusive"
    ic = claim(records, specs["fig3b-ic"], seeds)
    assert ic["diffs"] == pytest.approx([0.4, 0.1, 0.2]) and ic["verdict"] == "reproduced"
    dense = claim(records, specs["table2-mlm-dense"], seeds)  # SMoE's loss above Dense's in every seed
    assert dense["diffs"] == pytest.approx([0.1, 0.1, 0.3]) and dense["verdict"] == "not reproduced"
    sigmoid = claim(records, specs["table2-mlm-sigmoid"], seeds)  # no sigmoid runs
    assert sigmoid["seeds"] == 0 and sigmoid["verdict"] == "not measured"
    assert "`python reproduce.py` measures it" in sigmoid["measured"]
    one_model = ("rc-falls", "RC is negative", "-", ("xmoe-softmax", None), "rc", -1)  # about one model: d_k = its value
    one = claim(records, one_model, seeds)
    assert one["diffs"] == [20.0, 5.0, 30.0] and one["verdict"] == "not reproduced"
    assert claim(records, specs["fig3a-rf"], [1, 2])["verdict"] == "too few seeds"  # 2 seeds: no verdict
    records.pop(("smoe-softmax", 2))  # a seed without its pair: measured, but the rule needs every seed
    records.update({("xmoe-softmax", 4): record(3.0, 20.0, 0.1), ("smoe-softmax", 4): record(3.0, 20.0, 0.3)})
    rf = claim(records, specs["fig3a-rf"], [1, 2, 3, 4])  # seeds 1, 3, 4 measured, seed 2 not
    assert rf["seeds"] == 3 and rf["verdict"] == "inconclusive" and "3 of 4 seeds" in rf["measured"]
    assert claim(records, specs["fig3a-rf"], [1, 3, 4])["verdict"] == "reproduced"
    assert claim(records, specs["fig3a-rf"], [1, 2, 3])["verdict"] == "too few seeds"  # 2 of 3 measured


def collapse_record(share, fixed, pr_rest, rc_shared, steps=(0, 100, 200, 300, 400, 500, 600)):
    """A run's curves at 7 evaluations; the last third of training is steps 500 and 600."""
    return {"steps": list(steps), "read_share": share, "read_share_fixed": fixed, "pr_rest": pr_rest,
            "rc_shared": rc_shared, "mlm": [3.0] * 7}


def test_collapse_values_are_late_means_and_chance_corrected_gains_by_hand():
    rec = collapse_record(share=[0.2, 0.9, 0.9, 0.9, 0.9, 0.4, 0.6], fixed=[0.2, 0, 0, 0, 0, 0.1, 0.3],
                          pr_rest=[30, 1, 1, 1, 1, 4, 6], rc_shared=[2, 0, 0, 0, 0, 10, None])
    assert value(rec, "read_gain") == pytest.approx((0.5 - 0.2) / (1 - 0.2))  # late mean 0.5 over 500 and 600
    assert value(rec, "fixed_gain") == pytest.approx((0.2 - 0.2) / 0.8)
    assert value(rec, "pr_rest") == pytest.approx(5.0) and value(rec, "rc_shared") == 10  # None is skipped
    # a share that stays at its chance level gains 0 whatever its k; full collapse into the span gains 1
    assert value(collapse_record([0.04] * 7, [0.04] * 7, [1] * 7, [1] * 7), "read_gain") == 0
    assert value(collapse_record([0.25] + [1.0] * 6, [0.25] * 7, [1] * 7, [1] * 7), "read_gain") == 1


PREREGISTERED = [  # id, (higher, lower) runs, value, sign: the collapse study's claims as committed before the runs
    ("collapse-causal-N24", ("collapse-smoe-N24", "collapse-smoe-detach-N24"), "read_gain", +1),
    ("collapse-fixed-N24", ("collapse-smoe-N24", "collapse-smoe-detach-N24"), "fixed_gain", +1),
    ("collapse-xmoe-N24", ("collapse-xmoe-N24", "collapse-smoe-N24"), "read_gain", -1),
    ("collapse-pr-rest-N24", ("collapse-smoe-detach-N24", "collapse-smoe-N24"), "pr_rest", +1),
    ("collapse-rc-shared-N24", ("collapse-xmoe-N24", "collapse-smoe-N24"), "rc_shared", +1),
    ("collapse-causal-N4", ("collapse-smoe-N4", "collapse-smoe-detach-N4"), "read_gain", +1),
    ("collapse-fixed-N4", ("collapse-smoe-N4", "collapse-smoe-detach-N4"), "fixed_gain", +1),
    ("collapse-xmoe-N4", ("collapse-xmoe-N4", "collapse-smoe-N4"), "read_gain", -1),
    ("collapse-pr-rest-N4", ("collapse-smoe-detach-N4", "collapse-smoe-N4"), "pr_rest", +1),
    ("collapse-rc-shared-N4", ("collapse-xmoe-N4", "collapse-smoe-N4"), "rc_shared", +1),
]


def test_the_collapse_claims_are_the_preregistered_ones():
    assert [(c[0], c[3], c[4], c[5]) for c in collapse_claims()] == PREREGISTERED
    flags = collapse_study(quick=False)
    assert len(flags) == 6 and set(collapse_study(quick=True)) == {"collapse-smoe-N4", "collapse-smoe-detach-N4"}
    for name, f in flags.items():  # d 96: N/d = 24/96 = 1/4 and 4/96 = 1/24, the paper's base
        n = int(name.rsplit("N", 1)[1])
        assert f[f.index("--n-experts") + 1] == str(n) and "--d-model=96" in f and n in (24, 4)
        assert ("--detach-route" in f) == ("detach" in name) and f[f.index("--routing") + 1] == name.split("-")[1]


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
    assert mlm["verdict"] == "too few seeds"  # 2 seeds: no verdict
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


def late_gain(run_dir):
    """The chance-corrected gain of the read share, from a run's log by hand: (s - s0) / (1 - s0), s the
    mean over the evaluations of the last third of training, s0 the step-0 share."""
    rows = log_rows(run_dir, "eval")
    last = [r["read_share"][0] for r in rows if r["step"] > 2 * rows[-1]["step"] / 3]
    s, s0 = sum(last) / len(last), rows[0]["read_share"][0]
    return (s - s0) / (1 - s0)


def test_the_collapse_study_end_to_end_quick_then_whole(tmp_path):
    out = tmp_path / "res"
    args = ["--collapse", "--preset", "tiny", "--steps", 1, "--jobs", 2, "--out", out]
    quick = run("reproduce.py", *args, "--quick", cwd=tmp_path)  # SMoE and --detach-route at N 4, seeds 1 2 3
    assert quick.returncode == 0, quick.stdout + quick.stderr
    assert "6 pre-training and 0 fine-tuning runs to do" in quick.stdout
    claims = {c["id"]: c for c in json.loads((out / "summary.json").read_text())["claims"]}
    measured = {"collapse-causal-N4", "collapse-fixed-N4", "collapse-pr-rest-N4"}
    assert {c for c, v in claims.items() if v["verdict"] != "not measured"} == measured and len(claims) == 10
    diffs = [late_gain(out / "runs" / "collapse-smoe-N4" / f"seed{s}") -
             late_gain(out / "runs" / "collapse-smoe-detach-N4" / f"seed{s}") for s in (1, 2, 3)]
    causal = claims["collapse-causal-N4"]
    assert causal["seeds"] == 3 and causal["diffs"] == pytest.approx(diffs, abs=1e-12)
    assert causal["verdict"] == ("reproduced" if min(diffs) > 0 else "not reproduced" if max(diffs) < 0
                                 else "inconclusive")
    assert "2^3 = 8" in (out / "summary.md").read_text()
    whole = run("reproduce.py", *args, "--seeds", 1, cwd=tmp_path)  # one seed: reuses --quick's 2 runs of seed 1
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "4 pre-training and 0 fine-tuning runs to do" in whole.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert all(c["seeds"] == 1 and c["verdict"] == "too few seeds" for c in summary["claims"])
    assert "## The collapse study" in (out / "summary.md").read_text()
    rec = json.loads((out / "runs" / "collapse-smoe-detach-N24-seed1.json").read_text())
    assert rec["steps"] == [0, 1] and rec["read_share_isotropic"][0] == 24 / 96  # SMoE reads N = 24 of d = 96
    assert rec["read_share_fixed"][0] == rec["read_share"][0] and len(rec["read_share_chance"][0]) == 3


def test_bad_flags_are_a_clear_error(tmp_path):
    res = run("reproduce.py", "--tasks", "xnli", "--out", tmp_path / "res", cwd=tmp_path)
    assert res.returncode == 2 and "--tasks" in res.stderr and "Traceback" not in res.stderr
