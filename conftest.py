"""
What the test files share: launching a script as a user would (or under torchrun), and the check
that bad input ends in one clear `error:` line. Run the suite with `python -m pytest -q`.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

torch.use_deterministic_algorithms(True)


def start(script, *args, cwd=ROOT, nproc=None, path=()):
    """Start `python script args` (or `torchrun --nproc_per_node=nproc`) in the background, with the
    folders `path` before the project on PYTHONPATH. The processes inherit OMP_NUM_THREADS (default
    1), so the suite can be run as another machine would."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*path, ROOT])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, str(ROOT / script), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout=400):
    """-> CompletedProcess(returncode, stdout, stderr) of a started script."""
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(script, *args, cwd=ROOT, nproc=None):
    return finish(start(script, *args, cwd=cwd, nproc=nproc))


def assert_clean_error(result, *needles):
    """Bad input: exit code 2, no traceback, and an `error:` line (argparse's `prog: error:` too) that
    names each needle."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if re.match(r"(\S+: )?error: ", line)]
    assert errors, result.stderr
    for needle in needles:
        assert str(needle) in errors[0], (needle, result.stderr)
