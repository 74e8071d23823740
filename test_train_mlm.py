"""
train_mlm.py: masking and language sampling against hand computations, the corpus and its batches
(the command line trains on the training lines alone, evaluates the held-out ones, and samples the
languages by its --alpha), and the command line end to end: the loss falls, the log and checkpoint
hold what they should, resume is bit-identical, a NaN keeps the last good checkpoint, 2 processes
(DDP and expert parallelism) reproduce 1 process in float64, the expert gradients under expert
parallelism equal one process's, and every bad input ends in one clear error.

    python -m pytest -q test_train_mlm.py
"""

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train_mlm
from conftest import assert_clean_error, finish, run, start
from analysis import observe, representation_collapse, shared_grouping, subspace_share, validation_set
from corpus import ByteTokenizer, open_corpus, prepare_corpus, read_manifest
from test_corpus import decode_lines, labelled_lines, split_by_hand, write_labelled
from xmoe import MaskedLM, XMoEConfig


WORDS = {
    "en": "the cat dog sat on a mat and ran far away quickly red blue house tree".split(),
    "de": "der die das katze hund saß auf der matte und lief weit weg rot blau".split(),
    "ru": "кот собака сидел на коврике и бежал далеко быстро красный синий дом".split(),
}


def write_corpus(folder, lines=None, seed=0):
    """A small 3-language corpus: random sentences over a few words per language (two scripts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for lang, n in (lines or {"en": 600, "de": 250, "ru": 120}).items():
        text = "".join(" ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(3, 9))) + "\n"
                       for _ in range(n))
        (folder / f"{lang}.txt").write_text(text, encoding="utf-8")
    return folder


def prepared(folder):
    """write_corpus, prepared here once: processes started together would race to prepare it (one could
    read the manifest of a preparation half done, with fewer languages), as reproduce.py says."""
    prepare_corpus(write_corpus(folder), folder / "prepared", ByteTokenizer())
    return folder


def log_rows(out_dir, kind):
    """The log's rows of one kind: data (step 0: languages, n_i, q_i), train (a step), eval."""
    rows = [json.loads(s) for s in (Path(out_dir) / "log.jsonl").read_text().splitlines() if s]
    key = {"data": "q", "train": "loss", "eval": "val_mlm_loss"}[kind]
    return [r for r in rows if key in r]


def load_ckpt(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------
# The data the command line samples from


def test_cli_samples_languages_by_its_alpha(tmp_path):
    # lines of 29 letters: 31 tokens with <s> and </s>; the last tenth of each language is held out
    for lang, k in {"aa": 400, "bb": 100, "cc": 20}.items():
        (tmp_path / f"{lang}.txt").write_text((lang[0] * 29 + "\n") * k)
    res = run("train_mlm.py", "--preset", "tiny", "--data", tmp_path, "--steps", 1, "--alpha", 0.3,
              "--out", tmp_path / "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    n = [31 * 360, 31 * 90, 31 * 18]
    q = [x ** 0.3 / sum(y ** 0.3 for y in n) for x in n]  # q_i = n_i^alpha / sum_j n_j^alpha
    data = log_rows(tmp_path / "run", "data")
    assert len(data) == 1 and data[0]["languages"] == ["aa", "bb", "cc"] and data[0]["tokens"] == n
    assert np.allclose(data[0]["q"], q, rtol=1e-12)


def main_recorded(monkeypatch, *argv):
    """train_mlm.main in this process, recording the batches it trains on (what global_batch returns)
    and the validation set it evaluates on. The forward and backward themselves are skipped: the
    gradients are set to zero, so that the optimizer step, the evaluations and the checkpoints run
    as usual, in a fraction of the time. -> {"batches": [(inp, labels), ...], "val": [Validation, ...]}"""
    got, real_evaluate, real_batch = {"batches": [], "val": []}, train_mlm.evaluate, train_mlm.global_batch

    def global_batch(*args):
        inp, labels = real_batch(*args)
        got["batches"].append((inp.copy(), labels.copy()))
        return inp, labels

    def accumulate(model, *rest):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return iter([])

    def evaluate(model, v, *args, **kwargs):
        got["val"].append(v)
        return real_evaluate(model, v, *args, **kwargs)

    monkeypatch.setattr(train_mlm, "global_batch", global_batch)
    monkeypatch.setattr(train_mlm, "accumulate", accumulate)
    monkeypatch.setattr(train_mlm, "evaluate", evaluate)
    train_mlm.main([str(a) for a in argv])
    return got


def test_cli_trains_on_the_training_lines_only_and_evaluates_the_held_out_ones(tmp_path, monkeypatch):
    lines = labelled_lines({"de": 60, "en": 35, "sw": 4}, seed=1)  # unique labels: "de line 017 ..."
    write_labelled(tmp_path / "data", lines)
    split = {lang: split_by_hand(ls) for lang, ls in lines.items()}  # the documented rule, by hand
    got = main_recorded(monkeypatch, "--preset", "tiny", "--data", tmp_path / "data", "--steps", 20, "--batch-size",
                        128, "--eval-every", 20, "--alpha", 0, "--out", tmp_path / "run")
    tok = ByteTokenizer()
    assert len(got["batches"]) == 20 and got["val"]  # 20 steps; at least the evaluation at the end
    for v in got["val"]:  # the evaluated sequences: exactly the held-out lines, in order, masked by labels
        assert np.array_equal(np.where(v.labels != -100, v.labels, v.inp), v.ids)
        rows = decode_lines(v.ids, np.full_like(v.ids, -100), tok)
        for i, lang in enumerate(["de", "en", "sw"]):
            assert [s for row, k in zip(rows, v.lang) if k == i for s in row] == split[lang][1]
    trained = {s for inp, labels in got["batches"] for row in decode_lines(inp, labels, tok) for s in row}
    held = {s for _, h in split.values() for s in h}
    assert not trained & held, sorted(trained & held)[:5]
    assert trained == {s for t, _ in split.values() for s in t}  # every training line, nothing else


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_cli_batches_hold_the_languages_in_proportion_n_to_the_alpha(tmp_path, monkeypatch, alpha):
    lines = labelled_lines({"aa": 300, "bb": 30}, seed=2)
    write_labelled(tmp_path / "data", lines)
    # n_i: the training lines' tokens, with <s> and </s>; q_aa = n_aa^alpha / (n_aa^alpha + n_bb^alpha)
    n = {lang: sum(len(s.encode()) + 2 for s in split_by_hand(ls)[0]) for lang, ls in lines.items()}
    q = n["aa"] ** alpha / (n["aa"] ** alpha + n["bb"] ** alpha)
    got = main_recorded(monkeypatch, "--preset", "tiny", "--data", tmp_path / "data", "--steps", 20, "--batch-size",
                        128, "--eval-every", 20, "--alpha", alpha, "--out", tmp_path / "run")
    langs = [row[0][:2] for inp, labels in got["batches"] for row in decode_lines(inp, labels, ByteTokenizer())]
    N = len(langs)
    assert N == 20 * 128
    # a binomial count: 4.5 standard deviations (alpha 0.7, the default, gives q_aa 0.83 against 0.5 and 0.91)
    assert abs(langs.count("aa") / N - q) < 4.5 * math.sqrt(q * (1 - q) / N), (langs.count("aa") / N, q)


def test_prepare_only_tokenizes_once_and_training_reuses_it(tmp_path):
    data = write_corpus(tmp_path / "corpus")
    res = run("train_mlm.py", "--prepare-only", "--data", data, "--prepared", tmp_path / "prep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == \
        ["de.bin", "de.idx", "en.bin", "en.idx", "manifest.json", "ru.bin", "ru.idx"]
    assert not (tmp_path / "out").exists() and "preparing" in res.stderr  # the bar, and no training
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "prep").iterdir()}
    res = run("train_mlm.py", "--preset", "tiny", "--steps", 1, "--data", data, "--prepared", tmp_path / "prep",
              cwd=tmp_path)
    assert res.returncode == 0 and "preparing" not in res.stderr, res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "prep").iterdir()} == before


@pytest.mark.parametrize("data", ["synthetic", "unprepared"])
def test_runs_started_together_from_nothing_all_finish_on_one_corpus(tmp_path, data):
    """Three runs started at once in a fresh folder (no data/synthetic, or a --data folder never
    prepared): each ends well and sees the whole corpus and the same validation set."""
    flags = ["--data", write_corpus(tmp_path / "corpus")] if data == "unprepared" else []
    procs = [start("train_mlm.py", "--preset", "tiny", "--steps", 1, "--eval-every", 1, "--batch-size", 4,
                   *flags, "--out", tmp_path / f"run{k}", cwd=tmp_path) for k in range(3)]
    results = [finish(p) for p in procs]
    for r in results:
        assert r.returncode == 0, r.stderr
    langs = ["ar", "de", "el", "en", "es", "hi", "ru"] if data == "synthetic" else ["de", "en", "ru"]
    first = [log_rows(tmp_path / f"run{k}", "data")[0] for k in range(3)]
    assert all(row["languages"] == langs and row["tokens"] == first[0]["tokens"] for row in first)
    evals = [log_rows(tmp_path / f"run{k}", "eval")[0] for k in range(3)]  # step 0: one seed, one validation set
    assert evals[0]["step"] == 0 and evals[1] == evals[0] and evals[2] == evals[0]
    assert set(evals[0]["val_mlm_loss_by_lang"]) == set(langs)
    prepared = (tmp_path / "data" / "synthetic" / "mlm" if data == "synthetic" else tmp_path / "corpus") / "prepared"
    assert sorted(json.loads((prepared / "manifest.json").read_text())["languages"]) == langs
    assert not list(tmp_path.glob("**/*.tmp"))  # no temporary file or folder left behind


# ------------------------------------------------------------------------------------------------
# End to end: the loss falls; resume is bit-identical; a NaN keeps the last good checkpoint


TINY = ["--preset", "tiny", "--steps", 16, "--eval-every", 8, "--batch-size", 8, "--lr", 2e-3, "--warmup", 6]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """full: 16 steps. part: the same run stopped after 8 (a checkpoint), then resumed to 16 twice:
    as is (resumed) and with an absurd learning rate that must blow up (nan)."""
    tmp = tmp_path_factory.mktemp("train")
    base = [*TINY, "--data", prepared(tmp / "corpus")]
    full = start("train_mlm.py", *base, "--out", tmp / "full", cwd=tmp)
    part = start("train_mlm.py", *base, "--out", tmp / "resumed", "--stop-after", 8, cwd=tmp)
    res = {"full": finish(full), "part": finish(part)}
    shutil.copytree(tmp / "resumed", tmp / "stopped")  # kept as it was at the stop
    shutil.copytree(tmp / "resumed", tmp / "nan")
    resumed = start("train_mlm.py", "--resume", "--out", tmp / "resumed", cwd=tmp)
    nan = start("train_mlm.py", "--resume", "--out", tmp / "nan", "--lr", 1e30, cwd=tmp)
    res.update(resumed=finish(resumed), nan=finish(nan))
    return tmp, res


def test_end_to_end_loss_falls_and_writes_log_and_checkpoint(runs):
    tmp, res = runs
    assert res["full"].returncode == 0, res["full"].stderr
    rows = log_rows(tmp / "full", "train")
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert set(rows[0]) >= {"step", "loss", "mlm_loss", "balance_loss", "lr", "tau", "tokens_per_s"}
    assert np.mean([r["loss"] for r in rows[-4:]]) < rows[0]["loss"] - 0.3
    for r in rows:  # Eq. 9 and the schedule: linear warmup over 6 steps, linear decay to 0 at 16
        assert math.isclose(r["loss"], r["mlm_loss"] + 1e-2 * r["balance_loss"], rel_tol=1e-9)
        s = r["step"] - 1
        assert math.isclose(r["lr"], 2e-3 * (s + 1) / 6 if s < 6 else 2e-3 * (16 - s) / 10, rel_tol=1e-9)
    evals = log_rows(tmp / "full", "eval")
    assert [r["step"] for r in evals] == [0, 8, 16]  # step 0: the initial state, before any update
    assert evals[0]["rf"] is None and 0 <= evals[1]["rf"][0] <= 1
    assert len(evals[0]["expert_load"][0]) == 4 and sum(evals[0]["expert_load"][0]) == sum(evals[1]["expert_load"][0])
    assert evals[1]["rc"][0] > 0 and evals[1]["val_mlm_loss"] < rows[0]["mlm_loss"]
    assert "unigram entropy" in res["full"].stdout and "python finetune.py --task udpos" in res["full"].stdout
    ckpt = load_ckpt(tmp / "full")
    assert set(ckpt) == {"model", "optimizer", "step", "config", "args", "tokenizer", "routing", "reference"}
    assert ckpt["step"] == 16 and ckpt["tokenizer"] == {"kind": "byte"} and ckpt["routing"][0].shape[1] == 64
    model = MaskedLM(XMoEConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])  # the unwrapped model, no "module." prefixes


def test_later_evaluations_measure_against_the_step_0_grouping_and_span(runs):
    """The checkpoint keeps what the step-0 evaluation made: the k-means groups of the step-0 states
    and the router's step-0 read directions; the evaluation at step 16 uses those, not its own."""
    tmp, _ = runs
    threads = torch.get_num_threads()
    ckpt, cfg = load_ckpt(tmp / "full"), XMoEConfig.from_dict(load_ckpt(tmp / "full")["config"])
    prep, tok = tmp / "corpus" / "prepared", ByteTokenizer()
    val = validation_set(open_corpus(read_manifest(prep), prep, tmp / "corpus"), cfg.max_len, 0, tok)

    def states(model):  # the RC tokens' h and the model's read directions, as the evaluation sees them
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))  # as the run had (conftest.start)
        model.eval()
        with torch.no_grad(), observe(model) as seen:
            for i in range(0, len(val.ids), 16):
                model(torch.from_numpy(val.inp[i:i + 16]), pad_mask=torch.from_numpy(val.ids[i:i + 16] == tok.pad))
        keep = torch.from_numpy(val.rc_mask)
        return torch.cat(seen.hidden)[keep[:, :, None].expand(-1, -1, cfg.d_model)].view(-1, cfg.d_model), \
            model.encoder.moe["1"].router.read_subspace()

    torch.manual_seed(0)  # --seed 0: the run's initial weights
    h0, span0 = states(MaskedLM(cfg))
    final = MaskedLM(cfg)
    final.load_state_dict(ckpt["model"])
    h16, span16 = states(final)
    groups = ckpt["reference"]["groups"][0]
    assert torch.equal(groups, shared_grouping(h0, cfg.n_experts, seed=0))  # made from the step-0 states
    assert torch.equal(ckpt["reference"]["read_span"][0], span0) and not torch.equal(span0, span16)
    last = log_rows(tmp / "full", "eval")[-1]
    assert last["step"] == 16
    assert last["rc_shared"][0] == pytest.approx(representation_collapse(h16, groups), rel=1e-9)
    assert last["rc_shared"][0] != pytest.approx(representation_collapse(h16, shared_grouping(h16, 4)), rel=1e-3)
    assert last["read_share_fixed"][0] == pytest.approx(subspace_share(h16, span0), rel=1e-9)
    assert last["read_share"][0] == pytest.approx(subspace_share(h16, span16), rel=1e-9)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def step0(tmp_path_factory):
    """Dense, SMoE, X-MoE and SMoE with --detach-route, 4 steps from one seed."""
    tmp = tmp_path_factory.mktemp("step0")
    data = prepared(tmp / "corpus")
    flags = {"dense": ["--routing", "dense"], "smoe": ["--routing", "smoe"], "xmoe": ["--routing", "xmoe"],
             "detach": ["--routing", "smoe", "--detach-route"]}
    procs = {k: start("train_mlm.py", *TINY, "--data", data, "--steps", 4, "--eval-every", 4, "--out", tmp / k,
                      *f, cwd=tmp) for k, f in flags.items()}
    return tmp, {k: finish(p) for k, p in procs.items()}


def test_every_run_is_evaluated_at_step_0_where_the_routings_share_their_state(step0):
    tmp, res = step0
    for k, r in res.items():
        assert r.returncode == 0, (k, r.stderr)
    first = {k: log_rows(tmp / k, "eval")[0] for k in res}
    for row in first.values():
        assert row["step"] == 0 and row["rf"] is None
    # the weights below the sparse layer are the same for every routing at step 0 (MaskedLM.initialize):
    # the router-neutral measures of its input agree to the last bit, Dense included
    for key in ("participation_ratio", "rc_shared"):
        assert first["smoe"][key] == first["xmoe"][key] == first["dense"][key] == first["detach"][key], key
    assert 1 < first["smoe"]["participation_ratio"][0] < 32  # d = 32
    # grouped by each router's own choices, the same states give different RC (the bias of Eq. 10)
    assert first["smoe"]["rc"] != first["xmoe"]["rc"] and first["dense"]["rc"] == []
    # the directions each router reads: SMoE e_i (N = 4 of d = 32), X-MoE W (d_e = N / 2 = 2)
    assert first["smoe"]["read_share_isotropic"] == [4 / 32] and first["xmoe"]["read_share_isotropic"] == [2 / 32]
    for k in ("smoe", "xmoe"):  # at step 0 the step-0 span is the current one
        assert first[k]["read_share_fixed"] == first[k]["read_share"] and first[k]["read_span_overlap"] == [pytest.approx(1)]
        for row in log_rows(tmp / k, "eval"):  # every evaluation: the share against random spans of its k
            (mean, low, high), = row["read_share_chance"]
            assert low < mean < high and abs(mean - row["read_share_isotropic"][0]) < 0.02
            assert 0 <= row["read_share_percentile"][0] <= 1 and 0 < row["read_share_fixed"][0] < 1
    assert log_rows(tmp / "smoe", "eval")[-1]["read_span_overlap"][0] < 1  # the router turned since step 0
    assert first["dense"]["read_share"] == [] and first["dense"]["gate"] == []
    # the gate at initialisation: SMoE's softmax over near-zero scores is about 1/N
    assert abs(first["smoe"]["gate"][0] - 1 / 4) < 0.05 and 1 / 4 < first["xmoe"]["gate"][0] < 1
    # --detach-route changes no forward: the same step 0 as SMoE, then the gradients below differ
    assert first["detach"] == first["smoe"]
    last = {k: log_rows(tmp / k, "eval")[-1] for k in ("smoe", "detach")}
    assert last["smoe"]["val_mlm_loss"] != last["detach"]["val_mlm_loss"]
    assert load_ckpt(tmp / "detach")["config"]["detach_route"] is True


def test_resume_is_bit_identical_to_the_uninterrupted_run(runs):
    tmp, res = runs
    assert res["part"].returncode == 0 and res["resumed"].returncode == 0, res["part"].stderr + res["resumed"].stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "startup_s")} for r in rows]
    for kind in ("data", "train", "eval"):
        assert strip(log_rows(tmp / "resumed", kind)) == strip(log_rows(tmp / "full", kind))
    a, b = load_ckpt(tmp / "full"), load_ckpt(tmp / "resumed")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for k in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(a["optimizer"][k][n], b["optimizer"][k][n]) for n in a["optimizer"][k])


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(runs):
    tmp, res = runs
    err = res["nan"].stderr
    assert res["nan"].returncode == 1 and "Traceback" not in err
    assert "error: loss is nan at step 10" in err and "step 8" in err  # step 9's update blew it up
    stopped, after = load_ckpt(tmp / "stopped"), load_ckpt(tmp / "nan")
    assert after["step"] == 8 and all(torch.equal(after["model"][k], v) for k, v in stopped["model"].items())
    assert [r["step"] for r in log_rows(tmp / "nan", "train")] == list(range(1, 10))


# ------------------------------------------------------------------------------------------------
# 2 processes (DDP, and expert parallelism) reproduce 1 process


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # float64: equal to rounding. The balance loss is on, with a large weight: it is computed per micro-
    # batch, so 1 process with 2 (4) micro-batches makes the step of 2 processes with 1 (2) each
    base = ["--preset", "tiny", "--data", prepared(tmp / "corpus"), "--steps", 6, "--eval-every", 6,
            "--batch-size", 8, "--dropout", 0, "--balance-coef", 0.1, "--float64"]
    procs = {"one": start("train_mlm.py", *base, "--grad-accum", 2, "--out", tmp / "one", cwd=tmp),
             "one4": start("train_mlm.py", *base, "--grad-accum", 4, "--out", tmp / "one4", cwd=tmp),
             "whole": start("train_mlm.py", *base, "--grad-accum", 1, "--out", tmp / "whole", cwd=tmp)}
    procs.update({"ddp": start("train_mlm.py", *base, "--out", tmp / "ddp", cwd=tmp, nproc=2),
                  "ddp_accum": start("train_mlm.py", *base, "--grad-accum", 2, "--out", tmp / "ddp_accum", cwd=tmp,
                                     nproc=2),
                  "ep": start("train_mlm.py", *base, "--out", tmp / "ep", "--expert-parallel", cwd=tmp, nproc=2)})
    return tmp, {k: finish(p) for k, p in procs.items()}


@pytest.mark.parametrize("mode, ref", [("ddp", "one"), ("ep", "one"), ("ddp_accum", "one4")])
def test_two_processes_reproduce_one_process(two_processes, mode, ref):
    tmp, res = two_processes
    assert res[ref].returncode == 0, res[ref].stderr
    assert res[mode].returncode == 0, res[mode].stdout + res[mode].stderr
    one, two = log_rows(tmp / ref, "train"), log_rows(tmp / mode, "train")
    assert min(r["balance_loss"] for r in one) > 0.5  # the balance loss is on (N sum f_i P_i is about 1)
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert abs(a["mlm_loss"] - b["mlm_loss"]) < 1e-10 and abs(a["loss"] - b["loss"]) < 1e-10
    a, b = load_ckpt(tmp / ref)["model"], load_ckpt(tmp / mode)["model"]
    assert a.keys() == b.keys()  # under expert parallelism the checkpoint still holds every expert
    for k in a:
        assert a[k].dtype == torch.float64
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-12, msg=k)
    one_eval, two_eval = log_rows(tmp / ref, "eval")[-1], log_rows(tmp / mode, "eval")[-1]
    assert abs(one_eval["val_mlm_loss"] - two_eval["val_mlm_loss"]) < 1e-10
    assert one_eval["expert_load"] == two_eval["expert_load"]  # discrete: identical in float64


def test_the_balance_loss_is_per_micro_batch(two_processes):
    """The control of the test above: with the balance loss on, one micro-batch of 8 sequences is
    another step than two of 4 (the same MLM loss at step 1, another balance loss), and the runs part."""
    tmp, res = two_processes
    assert res["whole"].returncode == 0, res["whole"].stderr
    whole, halves = log_rows(tmp / "whole", "train"), log_rows(tmp / "one", "train")
    assert abs(whole[0]["mlm_loss"] - halves[0]["mlm_loss"]) < 1e-10
    assert abs(whole[0]["balance_loss"] - halves[0]["balance_loss"]) > 1e-6
    a, b = load_ckpt(tmp / "whole")["model"], load_ckpt(tmp / "one")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-6


_EP_GRAD_WORKER = r'''
import re, sys, torch, numpy as np, torch.nn.functional as F
from corpus import ByteTokenizer, bert_mask
from runtime import accumulate, build_model, distribute, setup_distributed, step_optimizer, teardown_distributed
from xmoe import XMoEConfig

rt = setup_distributed("cpu")  # torchrun: Gloo
torch.set_default_dtype(torch.float64)
EP = sys.argv[1] == "expert_parallel"  # else plain DDP: every rank holds every expert


class Recorder:
    """Stands in for AdamW: keeps each parameter's gradient as step_optimizer hands it over."""
    def __init__(self, named):
        self.named, self.grads = named, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.named}

    def zero_grad(self, set_to_none=True):
        for _, p in self.named:
            p.grad = None


def main():
    tok, K = ByteTokenizer(), rt.world
    cfg = XMoEConfig.preset("tiny", dropout=0.0, expert_depth=2)  # the balance loss on (1e-2)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 260, (8, 16))
    ids[:, 0] = tok.bos
    for r in range(8):  # some padding
        ids[r, 16 - r:] = tok.pad
    inp, labels = bert_mask(ids, np.random.default_rng(1), tok)
    M = int((labels != -100).sum())
    torch.manual_seed(0)
    ref = build_model(cfg)  # the one-process model: every expert
    torch.manual_seed(0)
    raw = build_model(cfg)
    model = distribute(raw, rt, EP)  # DDP; with EP the experts sharded and left out of it
    named = list(raw.named_parameters())
    E = cfg.n_experts // K if EP else 0  # the first expert this rank holds is rank * E
    whole = lambda n: re.sub(r"\.experts\.(\d+)\.", lambda m: f".experts.{rt.rank * E + int(m.group(1))}.", n)
    for A, clip in [(1, 0.0), (2, 0.0), (2, 0.05)]:
        # reference: one process, the global batch's objective (Eq. 9) written out: the summed token
        # losses over the M masked tokens, plus the balance loss of each of the K * A micro-batches
        # weighted by its share m_j / M of the masked tokens (fairseq's MoECriterion)
        ref.zero_grad()
        B = len(inp) // (K * A)
        micro = []
        for j in range(K * A):
            x, y = torch.from_numpy(inp[j * B:(j + 1) * B]), torch.from_numpy(labels[j * B:(j + 1) * B])
            out = ref(x, pad_mask=x == tok.pad)
            ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
            m_j = int((y != -100).sum())
            (ce / M + cfg.balance_coef * out.balance_loss * m_j / M).backward()
            if rt.rank * A <= j < (rt.rank + 1) * A:  # this rank's micro-batches
                micro.append((dict(input_ids=x, labels=y, pad_mask=x == tok.pad), m_j))
        want = {n: p.grad.clone() for n, p in ref.named_parameters()}
        norm = torch.sqrt(sum((g ** 2).sum() for g in want.values())).item()
        assert [n for _, n in accumulate(model, micro, M, rt)] == [n for _, n in micro]
        rec = Recorder(named)
        got_norm = step_optimizer(rec, named, clip, rt, EP)
        scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        experts = [n for n in rec.grads if ".experts." in n]
        assert len(experts) * (K if EP else 1) == sum(".experts." in n for n in want)  # this rank's experts
        assert experts and all(want[whole(n)].abs().sum() > 0 for n in experts)  # every expert had tokens
        for n, g in rec.grads.items():
            torch.testing.assert_close(g, want[whole(n)] * scale, rtol=1e-10, atol=1e-13,
                                       msg=lambda m: f"{n} (A={A}, clip={clip}): {m}")
        assert abs(got_norm - norm) < 1e-10 * norm, (A, clip, got_norm, norm)  # the norm before clipping
    print("GRAD-OK", rt.rank, flush=True)


main()  # its locals hold the process group: let them go before the teardown
teardown_distributed()
'''


@pytest.mark.parametrize("mode", ["expert_parallel", "ddp"])
def test_two_process_gradients_after_scaling_equal_one_process(tmp_path, mode):
    """Under DDP, with and without expert parallelism, what runtime.accumulate and step_optimizer hand
    the optimizer (the weighting of each micro-batch's loss, the scaling of the expert gradients, before
    and with clipping) and the norm returned, against the one-process gradients of the same global
    batch written out: 2 Gloo processes, float64."""
    (tmp_path / "worker.py").write_text(_EP_GRAD_WORKER)
    res = finish(start(tmp_path / "worker.py", mode, nproc=2), timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("GRAD-OK") == 2, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------------
# Bad input: `error: ...` naming the flag or file, exit code 2, no traceback


BAD = {
    # case: (arguments, what the message must name)
    "missing_data": (["--data", "nope"], "nope"),
    "empty_data": (["--data", "empty"], "empty"),
    "not_utf8": (["--data", "latin1"], "de.txt, line 3"),
    "unknown_preset": (["--preset", "huge"], "--preset"),
    "invalid_config": (["--n-heads", 3], "--n-heads"),
    "invalid_type": (["--n-experts", "many"], "--n-experts"),
    "no_checkpoint": (["--resume", "--out", "nothing"], "ckpt.pt"),
    "corrupt_checkpoint": (["--resume", "--out", "corrupt"], "corrupt"),
    "other_config": (["--resume", "--out", "other", "--n-experts", 8], "n_experts"),
    "indivisible_batch": (["--batch-size", 10, "--grad-accum", 3], "--batch-size"),
    "expert_parallel_alone": (["--expert-parallel"], "torchrun"),
    "missing_sentencepiece": (["--spm", "x.model"], "sentencepiece"),
    "corrupt_prepared": (["--data", "corrupt_prepared"], "en.bin is corrupt"),
    "unwritable_prepared": (["--prepared", "a_file"], "--prepared"),
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, runs):
    tmp = tmp_path_factory.mktemp("bad")
    data = write_corpus(tmp / "corpus", {"en": 60, "de": 60})
    (tmp / "empty").mkdir()
    latin = write_corpus(tmp / "latin1", {"en": 60})
    (latin / "de.txt").write_bytes("gut\nsehr gut\nstra\u00dfe\n".encode("latin-1"))  # line 3: not UTF-8
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint at all" * 10)
    shutil.copytree(runs[0] / "full", tmp / "other")
    shutil.copytree(runs[0] / "corpus", tmp / "corrupt_prepared")
    with open(tmp / "corrupt_prepared" / "prepared" / "en.bin", "r+b") as f:
        f.truncate(100)
    (tmp / "a_file").write_text("")
    (tmp / "no_sentencepiece").mkdir()  # a stand-in that fails to import, installed or not
    (tmp / "no_sentencepiece" / "sentencepiece.py").write_text("raise ImportError('not installed')\n")
    procs = {}
    for case, (args, _) in BAD.items():
        if "--resume" not in args:
            args = ["--preset", "tiny", "--steps", 2, *([] if "--data" in args else ["--data", data]), *args]
        path = [tmp / "no_sentencepiece"] if case == "missing_sentencepiece" else []
        procs[case] = start("train_mlm.py", *args, cwd=tmp, path=path)
    return {case: finish(p) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_a_clear_error_and_exit_code_2(bad, case):
    assert_clean_error(bad[case], BAD[case][1])
