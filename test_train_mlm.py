"""
train_mlm.py: masking and language sampling against hand computations, the corpus and its batches,
and the command line end to end: the loss falls, the log and checkpoint hold what they should, resume
is bit-identical, a NaN keeps the last good checkpoint, 2 processes (DDP and expert parallelism)
reproduce 1 process in float64, and every bad input ends in one clear error.

    python -m pytest -q test_train_mlm.py
"""

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, finish, run, start
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


# ------------------------------------------------------------------------------------------------
# End to end: the loss falls; resume is bit-identical; a NaN keeps the last good checkpoint


TINY = ["--preset", "tiny", "--steps", 16, "--eval-every", 8, "--batch-size", 8, "--lr", 2e-3, "--warmup", 6]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """full: 16 steps. part: the same run stopped after 8 (a checkpoint), then resumed to 16 twice:
    as is (resumed) and with an absurd learning rate that must blow up (nan)."""
    tmp = tmp_path_factory.mktemp("train")
    base = [*TINY, "--data", write_corpus(tmp / "corpus")]
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
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[0]["rf"] is None and 0 <= evals[1]["rf"][0] <= 1
    assert len(evals[0]["expert_load"][0]) == 4 and sum(evals[0]["expert_load"][0]) == sum(evals[1]["expert_load"][0])
    assert evals[1]["rc"][0] > 0 and evals[1]["val_mlm_loss"] < rows[0]["mlm_loss"]
    assert "unigram entropy" in res["full"].stdout and "python finetune.py --task udpos" in res["full"].stdout
    ckpt = load_ckpt(tmp / "full")
    assert set(ckpt) == {"model", "optimizer", "step", "config", "args", "tokenizer", "routing"}
    assert ckpt["step"] == 16 and ckpt["tokenizer"] == {"kind": "byte"} and ckpt["routing"][0].shape[1] == 64
    model = MaskedLM(XMoEConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])  # the unwrapped model, no "module." prefixes


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
    base = ["--preset", "tiny", "--data", write_corpus(tmp / "corpus"), "--steps", 6, "--eval-every", 6,
            "--batch-size", 8, "--dropout", 0, "--balance-coef", 0, "--float64"]  # float64: equal to rounding
    procs = {"one": start("train_mlm.py", *base, "--grad-accum", 2, "--out", tmp / "one", cwd=tmp),
             "ddp": start("train_mlm.py", *base, "--out", tmp / "ddp", cwd=tmp, nproc=2),
             "ep": start("train_mlm.py", *base, "--out", tmp / "ep", "--expert-parallel", cwd=tmp, nproc=2)}
    return tmp, {k: finish(p) for k, p in procs.items()}


@pytest.mark.parametrize("mode", ["ddp", "ep"])
def test_two_processes_reproduce_one_process(two_processes, mode):
    tmp, res = two_processes
    assert res["one"].returncode == 0, res["one"].stderr
    assert res[mode].returncode == 0, res[mode].stdout + res[mode].stderr
    one, two = log_rows(tmp / "one", "train"), log_rows(tmp / mode, "train")
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert abs(a["mlm_loss"] - b["mlm_loss"]) < 1e-10 and abs(a["loss"] - b["loss"]) < 1e-10
    a, b = load_ckpt(tmp / "one")["model"], load_ckpt(tmp / mode)["model"]
    assert a.keys() == b.keys()  # under expert parallelism the checkpoint still holds every expert
    for k in a:
        assert a[k].dtype == torch.float64
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-12, msg=k)
    one_eval, two_eval = log_rows(tmp / "one", "eval")[0], log_rows(tmp / mode, "eval")[0]
    assert abs(one_eval["val_mlm_loss"] - two_eval["val_mlm_loss"]) < 1e-10
    assert one_eval["expert_load"] == two_eval["expert_load"]  # discrete: identical in float64


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
