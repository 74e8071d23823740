"""
Faults: a full disk while a checkpoint, a result or a record is written (one error line, the previous
file intact, no log row without its checkpoint), an interrupted or failed write (no temporary file
left, no partial log line), durable renames (fsync before and after), and a stop on one rank of two
(both ranks end at once with the same clear error naming the rank, not one hanging in a collective).
Each fault is made by patching the writer or the loss in the process, never by filling a disk.

    python -m pytest -q test_faults.py
"""

import errno
import json
import os
import stat

import pytest

import runtime
from conftest import ROOT, finish, start
from synthetic import make_synthetic
from test_train_mlm import load_ckpt, log_rows, write_corpus


def launcher(tmp, script, patch):
    """A script that runs `patch` (Python source) in the process, then `script` as its command line
    would; under torchrun each rank's stderr goes to stderr<rank>.txt beside it."""
    path = tmp / f"with_{patch.__name__}_{script}"
    path.write_text(
        "import errno, os, sys\n"
        f"if 'RANK' in os.environ: sys.stderr = open({str(tmp)!r} + f'/stderr{{os.environ[\"RANK\"]}}.txt', 'w', "
        "buffering=1)\n"
        + patch() +
        f"import runpy; sys.argv[0] = {str(ROOT / script)!r}; runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return path


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error: ")]


# ------------------------------------------------------------------------------------------------
# Durability: the file reaches the disk before its new name does, and the name after


def test_atomic_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.stat(a))), real_replace(a, b))[1])
    runtime.write_atomic(tmp_path / "f.txt", "hello")
    assert (tmp_path / "f.txt").read_text() == "hello"
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], kinds
    (_, synced), (_, renamed), (_, folder) = events
    assert synced.st_ino == renamed.st_ino and stat.S_ISREG(synced.st_mode)  # the temporary file itself
    assert stat.S_ISDIR(folder.st_mode) and folder.st_ino == os.stat(tmp_path).st_ino


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    runtime.write_atomic(tmp_path / "f.txt", "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(runtime.DiskFull, match=r"the disk is full: writing .*f\.txt needs 0\.0 MB"):
        runtime.write_atomic(tmp_path / "f.txt", "new")
    assert (tmp_path / "f.txt").read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("fault", [KeyboardInterrupt, lambda: OSError(errno.EIO, "Input/output error")])
def test_an_interrupted_or_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, fault):
    runtime.write_atomic(tmp_path / "f.txt", "old")
    with pytest.raises((KeyboardInterrupt, OSError)):
        with runtime.atomic(tmp_path / "f.txt") as tmp:
            tmp.write_text("half of the new")
            raise fault()
    assert (tmp_path / "f.txt").read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("fault", ["disk_full", "interrupt"])
def test_a_failed_append_leaves_the_log_without_a_partial_line(tmp_path, monkeypatch, fault):
    log = tmp_path / "log.jsonl"
    runtime.append_jsonl(log, {"step": 1})
    real, calls = os.write, []

    def write(fd, data):  # the first call writes 5 bytes of the line, the second fails
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, data[:5])
        if fault == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(KeyboardInterrupt if fault == "interrupt" else runtime.DiskFull):
        runtime.append_jsonl(log, {"step": 2, "loss": 3.5})
    assert len(calls) == 2  # the line was begun: the file held a partial line before it was cut back
    monkeypatch.setattr(os, "write", real)
    assert log.read_text() == '{"step": 1}\n'
    runtime.append_jsonl(log, {"step": 2})
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": 1}, {"step": 2}]


def test_the_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(runtime.DiskFull, match=r"needs 0\.0 MB, 0\.0 MB are free"):
        runtime.write_atomic(tmp_path / "f.txt", "x" * 5000)
    assert not (tmp_path / "f.txt").exists()


# ------------------------------------------------------------------------------------------------
# A full disk in each script: one error line, exit 1, what was written before is intact


def second_save_fails():
    return ("import torch\nreal, calls = torch.save, []\n"
            "def save(obj, f, *a, **k):\n"
            "    calls.append(f)\n"
            "    if len(calls) == 2: raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return real(obj, f, *a, **k)\n"
            "torch.save = save\n")


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    base = ["--preset", "tiny", "--data", write_corpus(tmp / "corpus"), "--steps", 4, "--eval-every", 2]
    res = finish(start(launcher(tmp, "train_mlm.py", second_save_fails), *base, "--out", tmp / "run", cwd=tmp))
    return tmp, base, res


def test_a_full_disk_at_a_checkpoint_is_one_error_and_keeps_the_last_one(full_disk):
    tmp, base, res = full_disk
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    (line,) = error_lines(res.stderr)
    assert "the disk is full" in line and str(tmp / "run" / "ckpt.pt") in line and "MB are free" in line
    assert "(step 2)" in line and "intact" in line and "--resume" in line
    assert load_ckpt(tmp / "run")["step"] == 2  # the previous checkpoint
    assert [r["step"] for r in log_rows(tmp / "run", "eval")] == [0, 2]  # no row for step 4's evaluation
    assert not [p for p in (tmp / "run").iterdir() if p.suffix == ".tmp"]
    again = finish(start("train_mlm.py", *base, "--out", tmp / "run", "--resume", cwd=tmp))  # as the line says
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in log_rows(tmp / "run", "eval")] == [0, 2, 4]


def results_do_not_fit():
    return ("import runtime\nreal = runtime.fsync\n"
            "def fsync(path):\n"
            "    if str(path).endswith('.tmp') and 'results.json' in str(path):\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return real(path)\n"
            "runtime.fsync = fsync\n")


def test_a_full_disk_in_finetune_is_one_error(tmp_path):
    make_synthetic(tmp_path / "world", seed=0)
    pre = finish(start("train_mlm.py", "--preset", "tiny", "--data", tmp_path / "world" / "mlm", "--steps", 2,
                       "--out", tmp_path / "pre", cwd=tmp_path))
    assert pre.returncode == 0, pre.stderr
    res = finish(start(launcher(tmp_path, "finetune.py", results_do_not_fit), "--task", "pawsx", "--data",
                       tmp_path / "world", "--init", tmp_path / "pre" / "ckpt.pt", "--out", tmp_path / "ft",
                       "--max-train", 32, "--epochs", 1, cwd=tmp_path))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    (line,) = error_lines(res.stderr)
    assert "the disk is full" in line and str(tmp_path / "ft" / "results.json") in line
    assert "run the same command again" in line
    assert not (tmp_path / "ft" / "results.json").exists()


def test_a_full_disk_in_reproduce_keeps_the_last_record(tmp_path, monkeypatch):
    import reproduce
    d = tmp_path / "runs" / "smoe-softmax" / "seed1"
    d.mkdir(parents=True)
    row = {"val_mlm_loss": 3.0, "unigram_entropy": 3.9, "expert_load": [[1, 2]], "rc": [5.0]}
    (d / "log.jsonl").write_text("".join(json.dumps({"step": s, **row}) + "\n" for s in (0, 25)))
    reproduce.record(tmp_path, "smoe-softmax", 1, [])
    before = (tmp_path / "runs" / "smoe-softmax-seed1.json").read_text()
    (d / "log.jsonl").write_text("".join(json.dumps({"step": s, **row}) + "\n" for s in (0, 25, 50)))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(runtime.DiskFull, match=r"smoe-softmax-seed1\.json needs .* MB.*The runs are intact.*nothing "
                                              r"is retrained"):
        reproduce.record(tmp_path, "smoe-softmax", 1, [])
    assert (tmp_path / "runs" / "smoe-softmax-seed1.json").read_text() == before


# ------------------------------------------------------------------------------------------------
# A stop on one rank of two: both ranks stop at once, with the same error


def nan_on_rank_1():
    return ("import torch.nn.functional as F\nreal = F.cross_entropy\n"
            "if os.environ['RANK'] == '1': F.cross_entropy = lambda *a, **k: real(*a, **k) * float('nan')\n")


def nan_validation_on_rank_0():  # rank 0 alone evaluates: a loss computed without gradients
    return ("import torch, torch.nn.functional as F\nreal = F.cross_entropy\n"
            "nan = lambda *a, **k: real(*a, **k) * (1 if torch.is_grad_enabled() else float('nan'))\n"
            "if os.environ['RANK'] == '0': F.cross_entropy = nan\n")


def data_error_on_rank_0():  # rank 0 alone scores the English dev set
    return ("import eval_xtreme\n"
            "def fail(*a, **k): raise eval_xtreme.DataError('the English dev set could not be scored')\n"
            "if os.environ['RANK'] == '0': eval_xtreme.score_task = fail\n")


def full_disk_on_rank_0():
    return second_save_fails().replace("torch.save = save\n", "if os.environ['RANK'] == '0': torch.save = save\n")


@pytest.fixture(scope="module")
def one_rank_stops(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stops")
    make_synthetic(tmp / "world", seed=0)
    pre = finish(start("train_mlm.py", "--preset", "tiny", "--data", tmp / "world" / "mlm", "--steps", 2,
                       "--out", tmp / "pre", cwd=tmp))
    assert pre.returncode == 0, pre.stderr
    cases = {"finetune_nan": ("finetune.py", nan_on_rank_1, ["--task", "pawsx", "--data", tmp / "world", "--init",
                                                            tmp / "pre" / "ckpt.pt", "--max-train", 32]),
             "finetune_data_error": ("finetune.py", data_error_on_rank_0, ["--task", "pawsx", "--data", tmp / "world",
                                                                     "--init", tmp / "pre" / "ckpt.pt", "--max-train", 32]),
             "validation_nan": ("train_mlm.py", nan_validation_on_rank_0, ["--preset", "tiny", "--data",
                                                                         tmp / "world" / "mlm", "--steps", 4,
                                                                         "--eval-every", 2, "--batch-size", 4]),
             "disk_full": ("train_mlm.py", full_disk_on_rank_0, ["--preset", "tiny", "--data", tmp / "world" / "mlm",
                                                               "--steps", 4, "--eval-every", 2, "--batch-size", 4])}
    res = {}
    for name, (script, patch, args) in cases.items():
        (tmp / name).mkdir()
        r = finish(start(launcher(tmp / name, script, patch), *args, "--out", tmp / name / "out", cwd=tmp / name,
                         nproc=2), timeout=300)  # before the fix a rank waited for the 2-hour process-group timeout
        res[name] = (r, [(tmp / name / f"stderr{k}.txt").read_text() for k in (0, 1)])
    return res


@pytest.mark.parametrize("case, needle, rank", [("finetune_nan", "the fine-tuning loss is nan", 1),
                                                ("finetune_data_error", "the English dev set could not be scored", 0),
                                                ("validation_nan", "validation loss is nan at step 0", 0),
                                                ("disk_full", "the disk is full", 0)])
def test_a_stop_on_one_rank_stops_both_with_the_same_error(one_rank_stops, case, needle, rank):
    res, stderr = one_rank_stops[case]
    assert res.returncode != 0, res.stderr  # a rank left waiting would hang until finish's timeout fails the test
    assert ("exitcode  : 2" in res.stderr) == (case == "finetune_data_error")  # bad data: exit 2 on every rank
    for text in stderr:  # each rank: one error line, no traceback, not killed in a collective
        assert "Traceback" not in text, text
        (line,) = error_lines(text)
        assert needle in line and f"(on rank {rank})" in line, text  # where it happened, on both ranks
