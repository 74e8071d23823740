"""
finetune.py: the QA windows and span search against brute force, byte spans mapped back to the text,
the length defaults, frozen routing (bit-identical sparse layers), the command line end to end on a
tiny checkpoint and synthetic world (official prediction files that score to results.json), every bad
input, and expert parallelism with 2 processes against 1 process in float64.

    python -m pytest -q test_finetune.py
"""

import argparse
import copy
import json

import numpy as np
import pytest
import torch

import finetune
from conftest import assert_clean_error, finish, run, start
from eval_xtreme import TASKS, languages, load_split, write_labels
from synthetic import make_synthetic
from corpus import ByteTokenizer
from runtime import Runtime
from xmoe import MaskedLM, XMoEConfig


# ------------------------------------------------------------------------------------------------
# QA windows and the span search against brute force


def test_windows_cover_the_context_and_max_context_by_hand():
    assert finetune.window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert finetune.window_starts(3, 4, 2) == [0]
    assert finetune.window_starts(10, 4, 9) == [0, 4, 8]  # a stride beyond the window never leaves a gap
    # 10 tokens, windows [0,4) [2,6) [4,8) [6,10), score min(left, right) context: token 2 has 1 in
    # window 0 (pos 2) and 0 in window 1 (pos 0); token 3 has 0 in window 0 and 1 in window 1 (pos 1);
    # token 4: 1 in window 1 (pos 2), 0 in window 2; token 5: 0 in window 1, 1 in window 2 (pos 1)
    best = finetune.max_context_windows(10, [0, 2, 4, 6], 4)
    assert best.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]


def brute_best(windows, max_answer):
    """Every (window, start, end) with start <= end < start + max_answer inside the context, the
    start in its max-context window and, where given, start and end allowed: the best start + end logit."""
    best = None
    for w in windows:
        for i in range(len(w["start_logits"])):
            for j in range(len(w["end_logits"])):
                a, b = i - w["offset"], j - w["offset"]
                if 0 <= a < w["length"] and 0 <= b < w["length"] and a <= b < a + max_answer and w["max_ctx"][a] \
                        and w.get("can_start", [True] * w["length"])[a] and w.get("can_end", [True] * w["length"])[b]:
                    s = float(w["start_logits"][i] + w["end_logits"][j])
                    if best is None or s > best[0]:
                        best = (s, w["doc_start"] + a, w["doc_start"] + b)
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bounds", [False, True])
def test_span_search_matches_brute_force_over_all_windows(seed, bounds):
    rng = np.random.default_rng(seed)
    n, capacity, stride, offset = 23, 8, 3, 5
    starts = finetune.window_starts(n, capacity, stride)
    best_ctx = finetune.max_context_windows(n, starts, capacity)
    can_start, can_end = rng.random(n) < 0.4, rng.random(n) < 0.4  # byte checkpoints: word boundaries
    windows = []
    for w, s in enumerate(starts):
        length = min(capacity, n - s)
        L = offset + length + 1
        windows.append(dict(start_logits=rng.normal(size=L), end_logits=rng.normal(size=L), offset=offset,
                            doc_start=s, length=length, max_ctx=(best_ctx[s:s + length] == w).tolist()))
        if bounds:
            windows[-1].update(can_start=can_start[s:s + length].tolist(), can_end=can_end[s:s + length].tolist())
    got = finetune.best_span(windows, n_best=10_000, max_answer=4)  # n_best beyond the window: all pairs
    want = brute_best(windows, 4)
    assert got[1:] == want[1:] and abs(got[0] - want[0]) < 1e-9


def test_byte_context_tokens_map_back_to_the_answer_text():
    tok = ByteTokenizer()
    context = "Der Zug nach Köln fährt um 9 Uhr ab."
    ids, spans = finetune.context_tokens(context, tok)
    assert len(ids) == len(spans) == len(context.encode("utf-8"))  # one byte token a byte, spaces included
    ex = {"context": context, "answers": [{"text": "Köln", "answer_start": context.index("Köln")}]}
    first, last = finetune.answer_tokens(ex, spans)
    assert finetune.span_text(context, spans, first, last) == "Köln"
    assert bytes(i - 4 for i in ids[first:last + 1]).decode("utf-8") == "Köln"
    # a span may start only on a word's first byte and end only on its last: whole words, by hand
    can_start, can_end = finetune.word_bounds(spans)
    words = context.split()
    firsts = [len(" ".join(words[:k]).encode()) + (k > 0) for k in range(len(words))]
    lasts = [f + len(w.encode()) - 1 for f, w in zip(firsts, words)]
    assert [t for t, ok in enumerate(can_start) if ok] == firsts and [t for t, ok in enumerate(can_end) if ok] == lasts
    assert can_start[first] and can_end[last]


@pytest.mark.parametrize("task,byte,want", [
    ("pawsx", False, (128, None, None, 30)),   # XTREME's subword lengths
    ("pawsx", True, (256, None, None, 120)),   # 4 bytes a subword: 512, capped by max_len 256
    ("xquad", False, (256, 85, 64, 30)),       # window under 384: stride a third, query <= half
    ("xquad", True, (256, 85, 128, 120)),
])
def test_length_defaults_count_subwords_or_bytes(task, byte, want):
    cfg = XMoEConfig.preset("small")  # max_len 256
    names = ("max_length", "doc_stride", "max_query_length", "max_answer_length")
    args = finetune.get_parser().parse_args(["--task", task, "--data", "d", "--init", "c", "--out", "o"])
    args = finetune.resolve_args(args, cfg, "small", byte=byte)
    assert tuple(getattr(args, n, None) for n in names) == want
    args = finetune.get_parser().parse_args(["--task", task, "--data", "d", "--init", "c", "--out", "o",
                                             "--max-length", "100", "--max-answer-length", "7"])
    args = finetune.resolve_args(args, cfg, "small", byte=byte)
    assert (args.max_length, args.max_answer_length) == (100, 7)  # a flag beats the default


# ------------------------------------------------------------------------------------------------
# Frozen routing: training one seed leaves every sparse-layer parameter as pre-trained


def ft_args(**kw):
    base = dict(task="pawsx", batch_size=8, lr=1e-3, warmup=0.1, weight_decay=0.01, epochs=1, max_steps=4,
                balance_coef=1e-2, freeze_moe=True, ic_every=2, max_length=64, n_best=20, max_answer_length=30,
                float64=False, expert_parallel=False, grad_accum=1)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_routing_keeps_the_sparse_layers_bit_identical(freeze):
    torch.manual_seed(0)
    cfg = XMoEConfig.preset("tiny", dropout=0.0)
    state = {k: v.clone() for k, v in MaskedLM(cfg).state_dict().items()}
    tok = ByteTokenizer()
    examples = [dict(text_a=f"sentence {i} about cats", text_b=f"another {i % 3} about dogs", label=str(i % 2))
                for i in range(32)]
    mlm = MaskedLM(cfg)
    mlm.load_state_dict(state)
    train = finetune.pair_features(examples, tok, TASKS["pawsx"]["labels"], 64)
    rt = Runtime(ddp=False, rank=0, world=1, device=torch.device("cpu"), master=True, local_rank=0)
    model, history, loads = finetune.train_seed(1, mlm.encoder, train, None, tok, ft_args(freeze_moe=freeze), rt)
    moe = {k for k, _ in model.named_parameters() if ".moe." in k}
    assert moe, "the tiny model has a sparse layer"
    after = {k: v for k, v in model.state_dict().items()}
    for k in moe:
        same = torch.equal(after[k], state[k])
        assert same == freeze, k  # frozen: bit-identical; --no-freeze-moe: trained
    changed = [k for k, v in after.items() if k.startswith("encoder.") and k not in moe and not torch.equal(v, state[k])]
    assert changed  # the rest of the encoder trains either way
    assert [w["step"] for w in loads] == [2, 4] and sum(sum(l) for l in loads[0]["loads"]) > 0


class Recorder:
    """Stands in for AdamW: keeps each gradient as step_optimizer hands it over (after clipping)."""
    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=True)


def test_a_short_last_batch_counts_and_learns_from_its_real_rows_only():
    """One example and --grad-accum 2: the second micro-batch is empty, so it runs (DDP needs every rank)
    on a stand-in row of weight 0. The step must be the one example's, by hand: its task loss, its Eq. 9
    gradient (clipped to norm 1 as XTREME), and its tokens alone in the expert loads."""
    torch.manual_seed(0)
    cfg, tok = XMoEConfig.preset("tiny", dropout=0.0), ByteTokenizer()
    feats = finetune.pair_features([dict(text_a="the cat sat", text_b="a dog ran", label="1")], tok,
                                   TASKS["pawsx"]["labels"], 64)
    model = finetune.TaskModel(MaskedLM(cfg).encoder, "pair", 2, 0.0, 1e-2).double()
    ref = copy.deepcopy(model)
    rt = Runtime(ddp=False, rank=0, world=1, device=torch.device("cpu"), master=True, local_rank=0)
    window, rec = torch.zeros(1, cfg.n_experts, dtype=torch.long), Recorder(model)
    loss = finetune.train_step(model, rec, feats, window, tok, ft_args(grad_accum=2), rt)
    ids = torch.tensor([feats[0]["ids"]])
    enc = ref.encoder(ids)
    task = torch.nn.functional.cross_entropy(ref.head(enc.hidden)[:, 0], torch.tensor([feats[0]["label"]]))
    (task + 1e-2 * enc.balance_loss).backward()  # Eq. 9 of the one example
    norm = torch.sqrt(sum(p.grad.square().sum() for p in ref.parameters()))
    scale = min(1.0, 1.0 / (norm.item() + 1e-6))
    assert loss == pytest.approx(task.item(), rel=1e-12)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(rec.grads[n], p.grad * scale, rtol=1e-9, atol=1e-12, msg=n)
    assert window.sum().item() == len(feats[0]["ids"])  # one sparse layer routed the example's tokens once


# ------------------------------------------------------------------------------------------------
# The CLI end to end on a tiny checkpoint and a tiny synthetic world: one run per head type


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic world and a tiny checkpoint pre-trained on its mlm/ text for a few steps."""
    tmp = tmp_path_factory.mktemp("ft")
    make_synthetic(tmp / "world", seed=0)
    res = run("train_mlm.py", "--preset", "tiny", "--data", tmp / "world" / "mlm", "--steps", 20, "--dropout", 0,
              "--out", tmp / "pre", cwd=tmp)
    assert res.returncode == 0, res.stderr
    return tmp


RUNS = {  # name: task and extra flags
    "udpos": ("udpos", ["--seeds", 1, 2, "--max-train", 200, "--epochs", 1]),
    "pawsx": ("pawsx", ["--max-train", 200, "--epochs", 1]),
    "xquad": ("xquad", ["--max-train", 100, "--epochs", 1]),
}


@pytest.fixture(scope="module")
def runs(world):
    tmp = world
    procs = {name: start("finetune.py", "--task", task, "--data", tmp / "world", "--init", tmp / "pre" / "ckpt.pt",
                         "--out", tmp / name, *extra, cwd=tmp) for name, (task, extra) in RUNS.items()}
    return tmp, {name: finish(p) for name, p in procs.items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_end_to_end_writes_results_and_official_predictions(runs, name):
    tmp, res = runs
    assert res[name].returncode == 0, res[name].stderr
    task = RUNS[name][0]
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
        scored = run("eval_xtreme.py", "score", "--predictions", tmp / name / "predictions" / f"seed{seed}",
                     "--labels", labels, "--data", tmp / "world", "--json")
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


BAD = {
    "missing_init": (["--init", "nowhere.pt"], "nowhere.pt"),
    "corrupt_init": (["--init", "corrupt.pt"], "corrupt.pt"),
    "other_config": (["--init", "other.pt"], "other.pt"),
    "no_task_folder": (["--task", "panx", "--data", "empty"], "panx"),
    "expert_parallel_alone": (["--expert-parallel"], "torchrun"),
    "max_length": (["--max-length", 5000], "--max-length"),
    "unknown_task": (["--task", "ner"], "--task"),
}


@pytest.fixture(scope="module")
def bad(world):
    tmp = world
    (tmp / "corrupt.pt").write_bytes(b"no checkpoint" * 20)
    (tmp / "empty").mkdir()
    ckpt = torch.load(tmp / "pre" / "ckpt.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["n_experts"] = 8  # the weights hold 4 experts
    torch.save(ckpt, tmp / "other.pt")
    procs = {}
    for case, (args, _) in BAD.items():
        given = dict(zip(args[::2], args[1::2])) if case != "expert_parallel_alone" else {}
        base = {"--task": "udpos", "--data": tmp / "world", "--init": tmp / "pre" / "ckpt.pt", "--out": tmp / f"bad_{case}"}
        flat = [x for k, v in {**base, **given}.items() for x in (k, v)]
        procs[case] = start("finetune.py", *flat, *(args if case == "expert_parallel_alone" else []), cwd=tmp)
    return {case: finish(p) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_a_clear_error_and_exit_code_2(bad, case):
    assert_clean_error(bad[case], BAD[case][1])


# ------------------------------------------------------------------------------------------------
# Expert parallelism: 2 processes, each with half the experts, fine-tune as 1 process does


@pytest.fixture(scope="module")
def expert_parallel(world):
    tmp = world
    base = ["--task", "udpos", "--data", tmp / "world", "--init", tmp / "pre" / "ckpt.pt", "--no-freeze-moe",
            "--balance-coef", 0.1, "--max-train", 64, "--batch-size", 8, "--epochs", 2, "--ic-every", 4,
            "--float64"]  # float64: the two arrangements agree to rounding, so argmax decisions agree too
    # the balance loss is per micro-batch: 1 process with 2 micro-batches makes the step of 2 processes
    procs = {"one": start("finetune.py", *base, "--out", tmp / "ep_one", "--grad-accum", 2, cwd=tmp),
             "whole": start("finetune.py", *base, "--out", tmp / "ep_whole", cwd=tmp),
             "ep": start("finetune.py", *base, "--out", tmp / "ep_two", "--expert-parallel", cwd=tmp, nproc=2)}
    return tmp, {k: finish(p) for k, p in procs.items()}


def test_expert_parallel_two_processes_match_one_process(expert_parallel):
    tmp, res = expert_parallel
    for k in ("one", "ep"):
        assert res[k].returncode == 0, res[k].stderr
    one, two = (json.loads((tmp / d / "results.json").read_text()) for d in ("ep_one", "ep_two"))
    rows = lambda d: [json.loads(s) for s in (tmp / d / "seed1" / "log.jsonl").read_text().splitlines()]
    losses = lambda d: [r["loss"] for r in rows(d) if "loss" in r]
    assert len(losses("ep_one")) == 20 and np.allclose(losses("ep_one"), losses("ep_two"), rtol=1e-10, atol=1e-12)
    # the control: one micro-batch of 8 has another balance loss than two of 4, and the runs part
    assert res["whole"].returncode == 0, res["whole"].stderr
    assert losses("ep_whole")[0] == pytest.approx(losses("ep_one")[0], rel=1e-10)  # the same first forward
    assert not np.allclose(losses("ep_whole"), losses("ep_one"), rtol=1e-8, atol=0)
    assert one["seeds"] == two["seeds"]  # every language's scores: discrete decisions, identical
    # the expert loads count the same tokens at the same experts
    loads = lambda d: [w["loads"] for w in json.loads((tmp / d / "seed1" / "expert_loads.json").read_text())["windows"]]
    assert loads("ep_one") == loads("ep_two")
