"""
How a script runs, owned once: what train_mlm.py, finetune.py, reproduce.py, bench.py and corpus.py
share, and what a first reading of the method can skip. Errors and exit codes (BadInput 2, Diverged
and DiskFull 1, Ctrl-C 130: one `error:` line, no traceback); atomic and durable writes, whole log
lines, a lock for data that processes started together would prepare at once; torchrun (NCCL on CUDA,
Gloo on the CPU), printing on rank 0, stops decided by every rank, bf16 autocast, the DDP wrap that
leaves sharded experts alone; the optimizer step (the model's own loss, Eq. 9, weighted once per
micro-batch; expert-gradient scaling; clipping; the schedule); checkpoints.

    from runtime import cli, setup_distributed, distribute, accumulate, step_optimizer, save_checkpoint
"""

import errno
import gc
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from xmoe import MaskedLM, MoELayer, XMoEConfig, shard_experts, upcast

# ------------------------------------------------------------------------------------------------
# Errors and exit codes


class BadInput(Exception):
    """A user error (a flag, a file, a line): one `error: ...` line, exit code 2, no traceback."""


class Diverged(Exception):
    """A non-finite loss: one `error: ...` line with the step, exit code 1; the last checkpoint stays."""


class DiskFull(Exception):
    """A full disk: one `error: ...` line, exit code 1; the file keeps its previous content (atomic)."""


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def check_bounds(bounds):
    """bounds: (flag, value, low, high or None[, why]); a value outside [low, high] is a BadInput naming it."""
    for flag, value, low, high, *why in bounds:
        if value is not None and (value < low or (high is not None and value > high)):
            where = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise BadInput(f"--{flag} must be {where}{''.join(why)}, got {value}")


def cli(main, interrupted="interrupted", bad_input=()):
    """Run main() as a command: bad input (BadInput and the types in `bad_input`), divergence and a full
    disk end in one `error:` line, never a traceback from deep inside torch."""
    try:
        main()
    except (BadInput, Diverged, DiskFull, *bad_input) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, (Diverged, DiskFull)) else 2)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------------
# Files: atomic and durable writes, whole log lines, a lock


@contextmanager
def atomic(path, size=None):
    """Yields a temporary path beside `path` to write, then renames it to `path`: a kill never leaves
    a half-written file, nor do processes writing one file at once trample each other. The file is
    fsync'ed before the rename and the folder after, so after a power loss the name points at the
    whole new file or the old one. `size` (bytes, when known) is checked against the free space first;
    running out, then or while writing, is a DiskFull naming both. After any failure (an I/O error,
    an interrupt) the temporary file is gone and `path` is as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        if size is not None and shutil.disk_usage(path.parent).free < size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        if os.name != "nt":  # Windows cannot open a folder; its renames are journalled
            fsync(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports ENOSPC as a RuntimeError of its zip writer
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        if getattr(e, "errno", None) in DISK_FULL or (isinstance(e, RuntimeError) and free < 2**20):
            need = max(size or 0, written)
            raise DiskFull(f"the disk is full: writing {path} needs {need / 1e6:.1f} MB"
                           f"{'' if size else ' or more'}, {free / 1e6:.1f} MB are free there") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def fsync(path):
    """Flush a file's bytes, or a folder's names, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, text):
    data = text.encode("utf-8")
    with atomic(path, size=len(data)) as tmp:
        tmp.write_bytes(data)


def append_jsonl(path, row):
    """One line, whole or not at all: after any failure (a full disk, an interrupt) the file is cut
    back to where it ended."""
    data = (json.dumps(row) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        while data:  # os.write may write a part only
            data = data[os.write(fd, data):]
    except BaseException as e:
        os.ftruncate(fd, end)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise DiskFull(f"the disk is full: {path} could not take another line") from None
        raise
    finally:
        os.close(fd)


@contextmanager
def on_disk_full(advice):
    """A full disk inside the block is one DiskFull whose message ends with `advice`: what is intact and
    what to run."""
    try:
        yield
    except (DiskFull, OSError) as e:
        if isinstance(e, OSError) and e.errno not in DISK_FULL:
            raise
        raise DiskFull(f"{e if isinstance(e, DiskFull) else f'the disk is full: {e}'}. {advice}") from None


@contextmanager
def locked(path):
    """An exclusive lock on the file `path` for the block: processes take turns; a dead one's is released."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if os.name == "nt":
            import msvcrt
            while True:  # LK_LOCK gives up after 10 s: wait as long as the holder needs
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
        else:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


# ------------------------------------------------------------------------------------------------
# Distributed set-up, printing, autocast, collective stops


class Runtime(NamedTuple):
    ddp: bool  # launched by torchrun
    rank: int
    world: int  # the number of processes
    device: torch.device
    master: bool  # rank 0: the one process that prints, evaluates, logs and saves
    local_rank: int  # the process's number on its machine (0 prepares the corpus there)


def setup_distributed(device_flag):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (without it: one process); NCCL on CUDA, Gloo on the CPU."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    want = device_flag if device_flag != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device_flag}: CUDA is not available here; use --device cpu")
    device = torch.device(f"cuda:{local_rank}" if want.startswith("cuda") and ddp else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:  # rank 0 alone evaluates (XTREME's seven languages take a while): a long timeout
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return Runtime(ddp, rank, world, device, rank == 0, local_rank)


def teardown_distributed():
    """The autograd graph and DDP's reducer hold the process group: collect them first, or Gloo can abort
    at exit ("terminate called without an active exception"); the barrier keeps a rank from closing
    its connections while another still uses them."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def add_runtime_flags(p):
    """The flags of how a script runs, shared by train_mlm.py and finetune.py."""
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or mps (default auto)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: shard the experts over the processes (all_to_all)")
    p.add_argument("--float64", action="store_true", help="compute in float64, without autocast (slow; for "
                   "checking that two arrangements of one computation, such as 1 and K processes, agree to rounding)")


def print0(*args):
    """Print on rank 0 only, without breaking a tqdm bar."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(map(str, args)))


def autocast_for(device, float64=False):
    """bf16 autocast on CUDA (mixed precision, as the paper's fairseq runs); none on the CPU or in float64."""
    if device.type == "cuda" and not float64:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def takes_part(rt, expert_parallel):
    """Whether this rank evaluates: rank 0 alone, or every rank when each holds some of the experts."""
    return rt.master or expert_parallel


@contextmanager
def together(rt, *reported):
    """A stop decided by every rank at once: if the block raises on some ranks, every rank raises the same
    error after it, naming the rank where it happened, instead of waiting in a collective until the
    timeout. cli's one-line errors (and `reported` types) keep their type; a bug is a RuntimeError on
    the others. One small all-reduce; the block must hold no collective a failing rank could skip."""
    err = None
    try:
        yield
    except Exception as e:
        err = e
    if rt.ddp:
        flag = torch.tensor([float(err is not None)], device=rt.device)
        dist.all_reduce(flag)
        if flag.item():
            errors = [None] * rt.world
            dist.all_gather_object(errors, None if err is None else (type(err), str(err)))
            rank, (kind, text) = next((r, e) for r, e in enumerate(errors) if e is not None)
            known = kind if issubclass(kind, (BadInput, Diverged, DiskFull, *reported)) else RuntimeError
            if err is None or known is not RuntimeError:  # a bug keeps its own traceback where it happened
                err = known(f"{text} (on rank {rank})")
    if err is not None:
        raise err


# ------------------------------------------------------------------------------------------------
# The model across processes: the DDP wrap and expert sharding


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def check_expert_parallel(cfg, rt):
    if not rt.ddp:
        raise BadInput("--expert-parallel shards the experts over processes: launch with torchrun --nproc_per_node=K")
    if cfg.routing == "dense":
        raise BadInput("--expert-parallel needs sparse layers, not a dense model")
    if cfg.n_experts % rt.world:
        raise BadInput(f"--expert-parallel: the {cfg.n_experts} experts must be divisible by the {rt.world} processes")


def distribute(model, rt, expert_parallel):
    """-> the model to call: under torchrun wrapped in DDP. With expert parallelism each rank first
    keeps its n_experts / world experts (tokens travel to them), and DDP neither broadcasts nor
    averages those, which differ per rank."""
    if expert_parallel:
        for layer in moe_layers(model):
            shard_experts(layer)
    if not rt.ddp:
        return model
    if expert_parallel:
        DDP._set_params_and_buffers_to_ignore_for_model(
            model, [n for n, _ in model.named_parameters() if ".experts." in n])
    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------
# One optimizer step: gradients accumulated over micro-batches, experts scaled, clipped, applied


def accumulate(model, micro_batches, n_total, rt, float64=False):
    """Forward and backward of this rank's micro-batches of a global batch, each (the model's inputs as
    keywords, its number of targets n): yields each (output, n) once its gradient is in. n_total counts
    the global batch's targets. Iterate it to the end (not in zip): a non-finite loss on any rank then
    stops every rank after the last backward, before the update (Diverged)."""
    bad = None  # this rank's first non-finite loss
    for j, (inputs, n) in enumerate(micro_batches):
        # DDP all-reduces the gradients on the last backward only; no_sync must wrap the forward too
        with model.no_sync() if rt.ddp and j < len(micro_batches) - 1 else nullcontext():
            with autocast_for(rt.device, float64):
                out = model(**inputs)
            # out.loss is Eq. 9 on the micro-batch's n targets. Gradients add up over micro-batches and DDP
            # averages ranks, so n * world / n_total makes the global batch's Eq. 9: its mean task loss plus
            # each micro-batch's balance loss weighted by its share of targets (as fairseq's MoECriterion)
            (out.loss * (n * rt.world / max(n_total, 1))).backward()
        loss = out.loss.item()  # one host sync per micro-batch
        bad = loss if bad is None and not math.isfinite(loss) else bad
        yield out, n
    with together(rt):  # after the last backward, where DDP's all-reduce is: no rank is left waiting in it
        if bad is not None:
            raise Diverged(f"loss is {bad}")


def step_optimizer(optimizer, named_params, clip, rt, expert_parallel):
    """Expert-gradient scaling, global clipping and the update. -> the gradient norm before clipping.
    Each rank's loss carries a factor `world` that undoes DDP's averaging; experts are not averaged
    under expert parallelism and already sum every rank's tokens (they travelled to them), so their
    gradients are divided by `world`. Their squared norm is summed over the ranks (each holds others)
    and every rank scales by the same factor, so the shared weights stay in sync."""
    experts = [p.grad for n, p in named_params if ".experts." in n]
    if expert_parallel:
        for g in experts:
            g.div_(rt.world)
    squares = lambda gs: torch.stack([upcast(g).pow(2).sum() for g in gs]).sum() if gs else torch.zeros(())
    experts_sq = squares(experts).to(rt.device)
    if expert_parallel:
        dist.all_reduce(experts_sq)
    shared = [p.grad for n, p in named_params if ".experts." not in n]
    norm = (squares(shared).to(rt.device) + experts_sq).sqrt()
    if clip > 0:
        scale = (clip / (norm + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for _, p in named_params:
            p.grad.mul_(scale.to(p.grad.device))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def lr_at(step, peak, warmup, steps):
    """Linear warmup over `warmup` steps, then linear decay to 0 at `steps` (Table 7). step counts from 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (steps - step) / max(1, steps - warmup))


def param_groups(model, weight_decay):
    """AdamW groups of the trainable parameters: weight decay on the weight matrices and embeddings
    (Linear, token/position embeddings, the router's W and e_i); none on biases, LayerNorm and tau,
    which are not weights to shrink (log tau would be pulled towards tau = 1). fairseq, the paper's
    code base, decays every parameter; we follow BERT's and XTREME's practice. Frozen parameters
    (fine-tuning) are left out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in trainable if p.dim() >= 2], weight_decay=weight_decay),
            dict(params=[p for p in trainable if p.dim() < 2], weight_decay=0.0)]


# ------------------------------------------------------------------------------------------------
# Checkpoints of train_mlm.py: one dict that rebuilds the model by itself


def nbytes(obj):
    """What torch.save writes for a (nested) checkpoint, at least: its tensors' bytes, and a zip entry
    and some pickle (under 512 bytes) for each."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() + 512
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(nbytes(v) for v in items)


def save_checkpoint(path, ckpt):
    with atomic(path, size=nbytes(ckpt) + 2**16) as tmp:  # never a half-written checkpoint, even if killed here
        torch.save(ckpt, tmp)


def load_checkpoint(path, flag):
    """A checkpoint of train_mlm.py (model, optimizer, step, config, args, tokenizer, ...), or a
    BadInput naming the flag and the file: missing, unreadable, or not ours. -> (ckpt, XMoEConfig)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{flag}: no checkpoint at {path}; give a checkpoint written by train_mlm.py"
                       + ("; start without --resume, or point --out at the run" if flag == "--resume" else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        missing = {"model", "optimizer", "step", "config", "args", "tokenizer"} - set(ckpt)
        cfg = XMoEConfig.from_dict(ckpt["config"]) if not missing else None
    except Exception as e:  # torch raises many kinds here (zip, pickle, EOF): all mean "unreadable"
        raise BadInput(f"{flag}: {path} is corrupt or not a checkpoint of train_mlm.py "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if missing:
        raise BadInput(f"{flag}: {path} is not a checkpoint of train_mlm.py (missing {', '.join(sorted(missing))})")
    return ckpt, cfg


def build_model(cfg, state=None, flag="--init", path=None):
    """The one model builder: MaskedLM(cfg), with `state` loaded when given. Weights of another model
    (other sizes, another routing, missing experts) are a BadInput, not a torch traceback."""
    model = MaskedLM(cfg)
    if state is not None:
        own = model.state_dict()
        missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
        shapes = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            parts = [f"{len(s)} {what} (e.g. {sorted(s)[0]})" for s, what in ((missing, "weights missing"),
                     (unexpected, "unexpected weights"), (shapes, "of another shape")) if s]
            raise BadInput(f"{flag} {path}: its weights do not match its config ({'; '.join(parts)}); the "
                           "checkpoint was written for another model, or edited")
        model.load_state_dict(state)
    return model


def pretraining_key(ckpt):
    """What identifies a pre-training checkpoint: its step and the arguments of its run (JSON types);
    finetune.py writes it into results.json, reproduce.py compares it."""
    return {"step": int(ckpt["step"]), "args": json.loads(json.dumps(ckpt["args"], default=str))}
