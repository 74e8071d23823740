"""
Tests of finetune.py (to be merged into test_xmoe.py).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
from eval_xtreme import TASKS, languages, load_split, make_synthetic, write_labels
from xmoe import MaskedLM, XMoEConfig

_FT_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# QA windows and the span search against brute force


def test_finetune_windows_cover_the_context_and_max_context_by_hand():
    assert finetune.window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert finetune.window_starts(3, 4, 2) == [0]
    assert finetune.window_starts(10, 4, 9) == [0, 4, 8]  # a stride beyond the window never leaves a gap
    # 10 tokens, windows [0,4) [2,6) [4,8) [6,10), score min(left, right) context: token 2 has 1 in
    # window 0 (pos 2) and 0 in window 1 (pos 0); token 3 has 0 in window 0 and 1 in window 1 (pos 1);
    # token 4: 1 in window 1 (pos 2), 0 in window 2; token 5: 0 in window 1, 1 in window 2 (pos 1)
    best = finetune.max_context_windows(10, [0, 2, 4, 6], 4)
    assert best.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]


def _ft_brute_best(windows, max_answer):
    """Every (window, start, end) with start <= end < start + max_answer inside the context and the
    start in its max-context window: the best start + end logit."""
    best = None
    for w in windows:
        for i in range(len(w["start_logits"])):
            for j in range(len(w["end_logits"])):
                a, b = i - w["offset"], j - w["offset"]
                if 0 <= a < w["length"] and 0 <= b < w["length"] and a <= b < a + max_answer and w["max_ctx"][a]:
                    s = float(w["start_logits"][i] + w["end_logits"][j])
                    if best is None or s > best[0]:
                        best = (s, w["doc_start"] + a, w["doc_start"] + b)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_finetune_span_search_matches_brute_force_over_all_windows(seed):
    rng = np.random.default_rng(seed)
    n, capacity, stride, offset = 23, 8, 3, 5
    starts = finetune.window_starts(n, capacity, stride)
    best_ctx = finetune.max_context_windows(n, starts, capacity)
    windows = []
    for w, s in enumerate(starts):
        length = min(capacity, n - s)
        L = offset + length + 1
        windows.append(dict(start_logits=rng.normal(size=L), end_logits=rng.normal(size=L), offset=offset,
                            doc_start=s, length=length, max_ctx=(best_ctx[s:s + length] == w).tolist()))
    got = finetune.best_span(windows, n_best=10_000, max_answer=4)  # n_best beyond the window: all pairs
    want = _ft_brute_best(windows, 4)
    assert got[1:] == want[1:] and abs(got[0] - want[0]) < 1e-9


def test_finetune_byte_context_tokens_map_back_to_the_answer_text():
    tok = finetune.Tokenizer({"tokenizer": {"kind": "byte"}})
    context = "Der Zug nach Köln fährt um 9 Uhr ab."
    ids, spans = finetune.context_tokens(context, tok)
    assert len(ids) == len(spans) == len(context.encode("utf-8"))  # one byte token a byte, spaces included
    ex = {"context": context, "answers": [{"text": "Köln", "answer_start": context.index("Köln")}]}
    first, last = finetune.answer_tokens(ex, spans)
    assert finetune.span_text(context, spans, first, last) == "Köln"
    assert bytes(i - 4 for i in ids[first:last + 1]).decode("utf-8") == "Köln"


# ------------------------------------------------------------------------------------------------
# Frozen routing: training one seed leaves every sparse-layer parameter as pre-trained


def _ft_args(**kw):
    base = dict(task="pawsx", batch_size=8, lr=1e-3, warmup=0.1, weight_decay=0.01, epochs=1, max_steps=4,
                balance_coef=1e-2, freeze_moe=True, ic_every=2, max_length=64, n_best=20, max_answer_length=30)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("freeze", [True, False])
def test_finetune_frozen_routing_keeps_the_sparse_layers_bit_identical(freeze):
    torch.manual_seed(0)
    cfg = XMoEConfig.preset("tiny", dropout=0.0)
    state = {k: v.clone() for k, v in MaskedLM(cfg).state_dict().items()}
    tok = finetune.Tokenizer({"tokenizer": {"kind": "byte"}})
    examples = [dict(text_a=f"sentence {i} about cats", text_b=f"another {i % 3} about dogs", label=str(i % 2))
                for i in range(32)]
    args = _ft_args(freeze_moe=freeze)
    ctx = dict(args=args, task="pawsx", cfg=cfg, tok=tok, dist=dict(ddp=False, rank=0, world=1, ep=False),
               device=torch.device("cpu"), mlm_state=state, dev=None,
               train_feats=finetune.pair_features(examples, tok, TASKS["pawsx"]["labels"], 64))
    model, history, loads = finetune.train_seed(1, ctx)
    moe = {k for k, _ in model.named_parameters() if ".moe." in k}
    assert moe, "the tiny model has a sparse layer"
    after = {k: v for k, v in model.state_dict().items()}
    for k in moe:
        same = torch.equal(after[k], state[k])
        assert same == freeze, k  # frozen: bit-identical; --no-freeze-moe: trained
    changed = [k for k, v in after.items() if k.startswith("encoder.") and k not in moe and not torch.equal(v, state[k])]
    assert changed  # the rest of the encoder trains either way
    assert [w["step"] for w in loads] == [2, 4] and sum(sum(l) for l in loads[0]["loads"]) > 0


# ------------------------------------------------------------------------------------------------
# The CLI end to end on a tiny checkpoint and a tiny synthetic world: one run per head type


def _ft_start(args, cwd, nproc=None, script="finetune.py"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(_FT_DIR)}
    cmd = ([sys.executable, str(_FT_DIR / script)] if nproc is None else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(_FT_DIR / script)])
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _ft_wait(proc):
    out, err = proc.communicate(timeout=400)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def _ft_world(tmp_path_factory):
    """The synthetic world and a tiny checkpoint pre-trained on its mlm/ text for a few steps."""
    tmp = tmp_path_factory.mktemp("ft")
    make_synthetic(tmp / "world", seed=0)
    rc, out, err = _ft_wait(_ft_start(["--preset", "tiny", "--data", tmp / "world" / "mlm", "--steps", 20,
                                       "--dropout", 0, "--out", tmp / "pre"], tmp, script="train_mlm.py"))
    assert rc == 0, err
    return tmp


_FT_RUNS = {  # name: task and extra flags
    "udpos": ("udpos", ["--seeds", 1, 2, "--max-train", 200, "--epochs", 1]),
    "pawsx": ("pawsx", ["--max-train", 200, "--epochs", 1]),
    "xquad": ("xquad", ["--max-train", 100, "--epochs", 1]),
}


@pytest.fixture(scope="module")
def _ft_runs(_ft_world):
    tmp = _ft_world
    procs = {name: _ft_start(["--task", task, "--data", tmp / "world", "--init", tmp / "pre" / "ckpt.pt",
                              "--out", tmp / name, *extra], tmp) for name, (task, extra) in _FT_RUNS.items()}
    return tmp, {name: _ft_wait(p) for name, p in procs.items()}


@pytest.mark.parametrize("name", list(_FT_RUNS))
def test_finetune_end_to_end_writes_results_and_official_predictions(_ft_runs, name):
    tmp, res = _ft_runs
    rc, out, err = res[name]
    assert rc == 0, err
    task = _FT_RUNS[name][0]
    results = json.loads((tmp / name / "results.json").read_text())
    seeds = ["1", "2"] if name == "udpos" else ["1"]
    assert results["task"] == task and list(results["seeds"]) == seeds and results["split"] == "test"
    langs = languages(tmp / "world", task, "test")
    assert len(langs) == 7
    # every language has an official prediction file, and the files score, through the score CLI, to
    # what results.json says
    labels = tmp / f"{name}_labels"
    for lang in langs:
        write_labels(labels, task, lang, load_split(tmp / "world", task, "test", lang))
    for seed in seeds:
        scored = subprocess.run([sys.executable, str(_FT_DIR / "eval_xtreme.py"), "score", "--predictions",
                                 tmp / name / "predictions" / f"seed{seed}", "--labels", labels, "--json"],
                                capture_output=True, text=True)
        assert scored.returncode == 0, scored.stderr
        again = json.loads(scored.stdout)[task]
        mine = results["seeds"][seed]
        assert sorted(k for k in again if not k.startswith("avg")) == langs
        for k, v in mine.items():
            if k.startswith("avg_"):
                assert abs(again[k] - v) < 1e-6, (k, again[k], v)
    mean = results["mean"][f"avg_{'f1' if task != 'pawsx' else 'accuracy'}"]
    per = [results["seeds"][s][f"avg_{'f1' if task != 'pawsx' else 'accuracy'}"] for s in seeds]
    assert abs(mean - sum(per) / len(per)) < 1e-9
    if name == "udpos":  # two seeds: a sample std and an inter-run consistency in [-1, 1]
        assert abs(results["std"]["avg_f1"] - float(np.std(per, ddof=1))) < 1e-9
        assert results["ic"] is not None and -1 <= results["ic"] <= 1 and results["ic_curve"]


# ------------------------------------------------------------------------------------------------
# Bad input: `error: ...` naming what is wrong, exit code 2, no traceback


_FT_BAD = {
    "missing_init": (["--init", "nowhere.pt"], "nowhere.pt"),
    "corrupt_init": (["--init", "corrupt.pt"], "corrupt.pt"),
    "other_config": (["--init", "other.pt"], "other.pt"),
    "no_task_folder": (["--task", "panx", "--data", "empty"], "panx"),
    "expert_parallel_alone": (["--expert-parallel"], "torchrun"),
    "max_length": (["--max-length", 5000], "--max-length"),
    "unknown_task": (["--task", "ner"], "--task"),
}


@pytest.fixture(scope="module")
def _ft_bad(_ft_world):
    tmp = _ft_world
    (tmp / "corrupt.pt").write_bytes(b"no checkpoint" * 20)
    (tmp / "empty").mkdir()
    ckpt = torch.load(tmp / "pre" / "ckpt.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["n_experts"] = 8  # the weights hold 4 experts
    torch.save(ckpt, tmp / "other.pt")
    procs = {}
    for case, (args, _) in _FT_BAD.items():
        given = dict(zip(args[::2], args[1::2])) if case != "expert_parallel_alone" else {}
        base = {"--task": "udpos", "--data": tmp / "world", "--init": tmp / "pre" / "ckpt.pt", "--out": tmp / f"bad_{case}"}
        flat = [x for k, v in {**base, **given}.items() for x in (k, v)]
        procs[case] = _ft_start(flat + (args if case == "expert_parallel_alone" else []), tmp)
    return {case: _ft_wait(p) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(_FT_BAD))
def test_finetune_bad_input_gives_a_clear_error_and_exit_code_2(_ft_bad, case):
    rc, out, err = _ft_bad[case]
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    lines = [s for s in err.splitlines() if s.startswith("error:")]
    assert lines and _FT_BAD[case][1] in lines[0], err


# ------------------------------------------------------------------------------------------------
# Expert parallelism: 2 processes, each with half the experts, fine-tune as 1 process does


@pytest.fixture(scope="module")
def _ft_ep(_ft_world):
    tmp = _ft_world
    base = ["--task", "udpos", "--data", tmp / "world", "--init", tmp / "pre" / "ckpt.pt", "--no-freeze-moe",
            "--balance-coef", 0, "--max-train", 64, "--batch-size", 8, "--epochs", 2, "--ic-every", 4]
    procs = {"one": _ft_start(base + ["--out", tmp / "ep_one"], tmp),
             "ep": _ft_start(base + ["--out", tmp / "ep_two", "--expert-parallel"], tmp, nproc=2)}
    return tmp, {k: _ft_wait(p) for k, p in procs.items()}


def test_finetune_expert_parallel_two_processes_match_one_process(_ft_ep):
    tmp, res = _ft_ep
    for k in ("one", "ep"):
        assert res[k][0] == 0, res[k][2]
    one, two = (json.loads((tmp / d / "results.json").read_text()) for d in ("ep_one", "ep_two"))
    rows = lambda d: [json.loads(s) for s in (tmp / d / "seed1" / "log.jsonl").read_text().splitlines()]
    losses = lambda d: [r["loss"] for r in rows(d) if "loss" in r]
    assert len(losses("ep_one")) == 20 and np.allclose(losses("ep_one"), losses("ep_two"), rtol=1e-4, atol=1e-5)
    for lang, scores in one["seeds"]["1"].items():
        if not lang.startswith("avg_"):
            assert abs(scores["f1"] - two["seeds"]["1"][lang]["f1"]) < 1e-6, lang
    # the expert loads count the same tokens at (up to rounding-level ties in the router) the same experts
    loads = lambda d: np.array([w["loads"] for w in json.loads((tmp / d / "seed1" / "expert_loads.json").read_text())["windows"]])
    a, b = loads("ep_one"), loads("ep_two")
    assert a.shape == b.shape and (a.sum(-1) == b.sum(-1)).all() and np.abs(a - b).sum() <= 0.01 * a.sum()
