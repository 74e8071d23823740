"""
Masked-LM pre-training of X-MoE (Chi et al. 2022, section 4.1 and Appendix B).

    python train_mlm.py                     # CPU, minutes: `small` on the built-in synthetic corpus
    python train_mlm.py --routing smoe      # the SMoE baseline, on the same batches
    python train_mlm.py --preset base --data corpus/ --spm sentencepiece.bpe.model
                                            # one GPU: the paper's model on your corpus, XLM-R's vocabulary
    torchrun --standalone --nproc_per_node=8 train_mlm.py --preset base --data corpus/ --spm sentencepiece.bpe.model
                                            # 8 GPUs; add --expert-parallel to shard the experts
    python train_mlm.py --resume            # continue out/ckpt.pt up to --steps

--data DIR holds one UTF-8 text file per language, DIR/<lang>.txt, one sentence or document a line;
the first run tokenizes it once into DIR/prepared (or --prepared), which later runs memory-map
(corpus.py). Without --data, the synthetic world (synthetic.py) is written once to data/synthetic
and its mlm/ folder is the corpus. A run writes <out>/ckpt.pt (at every evaluation and at the end)
and <out>/log.jsonl (first the data: languages, n_i, q_i; then an evaluation of the initial state,
step 0, the control that every routing of one seed shares; a row per step and an evaluation row
every --eval-every steps). An evaluation logs the validation MLM loss, the expert loads, RC (Eq. 10)
and RF, and measures the router's input h without reference to a router (evaluate).

Reproducibility: the sequences and masks of global batch `step` are a function of (seed, step), and
dropout is reseeded from (seed, step, rank, micro-batch); --resume ends bit-identical to the
uninterrupted run. With dropout off, K processes and 1 process with K micro-batches give the same
run (to ~1e-10 with --float64): the balance loss is computed per micro-batch, as in the paper's
fairseq; with the balance loss off too, any accumulation does.

The first section is the runtime that finetune.py and reproduce.py import from here: the errors
(BadInput, which corpus.py raises too, Diverged and DiskFull) and their exit codes, distributed
setup, stops decided by every rank together, printing on rank 0, autocast, the DDP wrap that leaves
the experts alone, expert-gradient scaling, clipping, checkpoints and atomic writes.
"""

import argparse
import gc
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from corpus import (DISK_FULL, SYNTHETIC_DIR, BadInput, ByteTokenizer, DiskFull, SentencePieceTokenizer, atomic,
                    bert_mask, global_batch, open_corpus, prepare_corpus, read_manifest, sampling_probs,
                    synthetic_corpus, unigram_entropy, validation_rows, write_atomic)
from xmoe import (PRESETS, MaskedLM, MoELayer, XMoEConfig, expert_load, gather_experts, local_experts,
                  participation_ratio, representation_collapse, routing_fluctuation, shared_grouping, subspace_share,
                  upcast)

# ------------------------------------------------------------------------------------------------
# The runtime shared by the scripts


class Diverged(Exception):
    """A non-finite loss: one `error: ...` line with the step, exit code 1; the last checkpoint stays."""


@contextmanager
def together(rt):
    """A stop decided by every rank at once: if the block raises on some ranks, every rank raises the
    same error after it (its own, or the first failing rank's, rebuilt), instead of the others waiting
    in their next collective until the process group's timeout. Costs one small all-reduce; the block
    must not itself hold a collective that a failing rank could skip."""
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
            if err is None:
                known = kind if issubclass(kind, (BadInput, Diverged, DiskFull)) else RuntimeError
                err = known(f"{text} (on rank {rank})")
    if err is not None:
        raise err


def cli(main, interrupted="interrupted", bad_input=()):
    """Run main() as a command: bad input (BadInput and the types in `bad_input`) and divergence end in
    one `error:` line, never a traceback from deep inside torch."""
    try:
        main()
    except (BadInput, *bad_input) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (Diverged, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)


class Runtime(NamedTuple):
    ddp: bool  # launched by torchrun
    rank: int
    world: int  # the number of processes
    device: torch.device
    master: bool  # rank 0: the one process that prints, evaluates, logs and saves
    local_rank: int  # the process's number on its machine (0 prepares the corpus there)


def setup_distributed(device_flag):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on CUDA, Gloo on the CPU. Without torchrun:
    one process."""
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


def add_runtime_flags(p):
    """The flags of how a script runs, shared by train_mlm.py and finetune.py."""
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or mps (default auto)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: shard the experts over the processes (all_to_all)")
    p.add_argument("--float64", action="store_true", help="compute in float64, without autocast (slow; for "
                   "checking that two arrangements of one computation, such as 1 and K processes, agree to rounding)")


def teardown_distributed():
    """The autograd graph and DDP's reducer hold the process group: collect them before the teardown,
    or Gloo can abort at exit ("terminate called without an active exception"); the barrier keeps
    a rank from closing its connections while another still uses them."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def print0(*args):
    """Print on rank 0 only, without breaking a tqdm bar."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(map(str, args)))


def autocast_for(device, float64=False):
    """bf16 autocast on CUDA (mixed precision, as the paper's fairseq runs); none on the CPU or in float64."""
    if device.type == "cuda" and not float64:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def is_expert_param(name):
    return ".experts." in name


def check_expert_parallel(cfg, rt, flag="--expert-parallel"):
    if not rt.ddp:
        raise BadInput(f"{flag} shards the experts over processes: launch with torchrun --nproc_per_node=K")
    if cfg.routing == "dense":
        raise BadInput(f"{flag} needs sparse layers, not a dense model")
    if cfg.n_experts % rt.world:
        raise BadInput(f"{flag}: the {cfg.n_experts} experts must be divisible by the {rt.world} processes")


def distribute(model, rt, expert_parallel):
    """-> the model to call: under torchrun wrapped in DDP. With expert parallelism each rank first
    keeps its n_experts / world experts (tokens travel to them), and DDP neither broadcasts nor
    averages those, which differ per rank."""
    if expert_parallel:
        for layer in moe_layers(model):
            layer.shard_experts()
    if not rt.ddp:
        return model
    if expert_parallel:
        DDP._set_params_and_buffers_to_ignore_for_model(
            model, [n for n, _ in model.named_parameters() if is_expert_param(n)])
    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def step_optimizer(optimizer, named_params, clip, rt, expert_parallel):
    """Expert-gradient scaling, global clipping and the update. -> the gradient norm before clipping.

    The loss of each rank carries a factor `world` that undoes DDP's averaging of the gradients; the
    experts are not averaged under expert parallelism, and an expert's gradient already sums the
    tokens of every rank (they travelled to it), so its gradient is divided by `world` here. Then the
    squared norm of the experts is summed over the ranks (each holds others) and every rank scales by
    the same factor, so the shared weights stay in sync."""
    experts = [p.grad for n, p in named_params if is_expert_param(n)]
    if expert_parallel:
        for g in experts:
            g.div_(rt.world)
    squares = lambda gs: torch.stack([upcast(g).pow(2).sum() for g in gs]).sum() if gs else torch.zeros(())
    experts_sq = squares(experts).to(rt.device)
    if expert_parallel:
        dist.all_reduce(experts_sq)
    shared = [p.grad for n, p in named_params if not is_expert_param(n)]
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


def append_jsonl(path, row):
    """One line, whole or not at all: a failed append (a full disk) is cut back off."""
    with open(path, "a") as f:
        end = f.tell()
        try:
            f.write(json.dumps(row) + "\n")
            f.flush()
        except OSError as e:
            f.truncate(end)
            if e.errno in DISK_FULL:
                raise DiskFull(f"the disk is full: {path} could not take another line") from None
            raise


def nbytes(obj):
    """What torch.save writes for a (nested) checkpoint, at least: its tensors' bytes, and a zip entry
    and some pickle (under 512 bytes) for each."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() + 512
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    return sum(nbytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def save_checkpoint(path, ckpt):
    with atomic(path, size=nbytes(ckpt) + 2**16) as tmp:  # never a half-written checkpoint, even if killed here
        torch.save(ckpt, tmp)


def load_checkpoint(path, flag):
    """A checkpoint of this script (model, optimizer, step, config, args, tokenizer, routing), or a
    BadInput naming the flag and the file: missing, unreadable, or not ours."""
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


def micro_seed(seed, step, rank, micro):
    """Dropout's torch seed for one micro-batch: no dependence on RNG history, so resume is exact."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------
# Evaluation: validation MLM loss per language, expert load, RC (Eq. 10), RF against the last one

RC_TOKENS = 65536  # validation tokens for RC (Eq. 10), at most: all of them for the synthetic world


class Validation(NamedTuple):
    ids: np.ndarray  # (V, L) the held-out sequences
    inp: np.ndarray  # (V, L) with BERT masking, fixed for the run
    labels: np.ndarray  # (V, L) -100 where not masked
    lang: np.ndarray  # (V,) language index
    rc_mask: np.ndarray  # (V, L) bool, the tokens RC is measured on


def validation_set(corpus, L, seed, tok):
    """The held-out sequences with fixed masks, and an evenly spread subset of their tokens for RC."""
    val, lang = validation_rows(corpus, L, tok)
    inp, labels = bert_mask(val, np.random.default_rng([seed, 2**32 - 1]), tok)
    real = np.flatnonzero(val != tok.pad)
    rc_mask = np.zeros(val.shape, dtype=bool)
    rc_mask.flat[real[np.linspace(0, len(real) - 1, min(RC_TOKENS, len(real))).astype(int)]] = True
    return Validation(val, inp, labels, lang, rc_mask)


@torch.no_grad()
def evaluate(model, v, langs, tok, autocast, device, groups=None, batch=16):
    """-> (routing: the (V, L) top-1 experts per sparse layer, -1 at padding; the figures to log;
    groups: each RC token's class in the shared grouping, per sparse-layer position).

    Where a sparse layer sits (for Dense, where it would sit), the router's input h of the RC tokens
    is measured without reference to any router: its participation ratio, and RC (Eq. 10) under the
    shared grouping, made from the step-0 states (`groups` None: this is step 0) and then kept. Per
    sparse layer: RC under its own routing (the paper's), the share of h's variance in the directions
    the router reads (against k/d, an isotropic h's share), and the mean gate g(s_k)."""
    model.eval()
    ce_lang, n_lang = np.zeros(len(langs)), np.zeros(len(langs))
    n_probe, layers = len(model.cfg.moe_after), moe_layers(model)
    experts, gates, hidden = [[] for _ in layers], [[] for _ in layers], [[] for _ in range(n_probe)]
    for i in range(0, len(v.ids), batch):
        rows = slice(i, i + batch)
        labels, pad = torch.from_numpy(v.labels[rows]).to(device), torch.from_numpy(v.ids[rows] == tok.pad).to(device)
        with autocast:
            out = model(torch.from_numpy(v.inp[rows]).to(device), pad_mask=pad)
        ce = F.cross_entropy(upcast(out.logits).transpose(1, 2), labels, ignore_index=-100, reduction="none")
        np.add.at(ce_lang, v.lang[rows], ce.sum(1).cpu().numpy())
        np.add.at(n_lang, v.lang[rows], (labels != -100).sum(1).cpu().numpy())
        rc_rows = torch.from_numpy(v.rc_mask[rows]).to(device)
        for l, h in enumerate(out.probe):
            hidden[l].append(upcast(h[rc_rows]).cpu())
        for l, r in enumerate(out.routing):
            experts[l].append(r.experts.cpu())
            gates[l].append(r.gate[~pad].double().cpu())
    model.train()
    routing, hidden = [torch.cat(e) for e in experts], [torch.cat(h) for h in hidden]
    rc_mask = torch.from_numpy(v.rc_mask)
    if groups is None:
        groups = [shared_grouping(h, model.cfg.n_experts, seed=0) for h in hidden]
    reads = [m.router.read_subspace() for m in layers]
    return routing, {
        "val_mlm_loss": float(ce_lang.sum() / n_lang.sum()),
        "val_mlm_loss_by_lang": {l: float(c / n) for l, c, n in zip(langs, ce_lang, n_lang) if n > 0},
        "expert_load": [expert_load(e, model.cfg.n_experts).tolist() for e in routing],
        "rc": [representation_collapse(h, e[rc_mask]) for h, e in zip(hidden, routing)],
        "rc_trace": [representation_collapse(h, e[rc_mask], trace=True) for h, e in zip(hidden, routing)],
        "rc_shared": [representation_collapse(h, g) for h, g in zip(hidden, groups)],
        "participation_ratio": [participation_ratio(h) for h in hidden],
        "read_share": [subspace_share(h, r) for h, r in zip(hidden, reads)],
        "read_share_isotropic": [len(r) / model.cfg.d_model for r in reads],  # k/d
        "gate": [float(torch.cat(g).mean()) for g in gates],
        "tau": [float(m.router.tau.detach()) for m in layers]}, groups


# ------------------------------------------------------------------------------------------------
# Command line. Flags left unset take the checkpoint's value on --resume, else the preset's (TRAINING)
# or the common default (DEFAULTS); model flags left unset keep the preset's XMoEConfig.

TRAINING = {  # base: the paper's Table 7 (125k steps, 10k warmup, 2048 sequences of 512 tokens, 5e-4)
    "base": dict(steps=125_000, warmup=10_000, batch_size=2048, grad_accum=16, lr=5e-4, eval_every=2000),
    "small": dict(steps=200, warmup=20, batch_size=16, grad_accum=1, lr=2e-3, eval_every=50),  # <= 5 min, 2 CPUs
    "mini": dict(steps=150, warmup=15, batch_size=16, grad_accum=1, lr=2e-3, eval_every=25),  # reproduce.py's STUDY
    "tiny": dict(steps=60, warmup=6, batch_size=16, grad_accum=1, lr=2e-3, eval_every=20),  # the tests
}
DEFAULTS = dict(preset="small", data=None, prepared=None, spm=None, alpha=0.7, seed=0, clip=1.0)
ADAM_BETAS, ADAM_EPS, WEIGHT_DECAY = (0.9, 0.98), 1e-6, 0.01  # Table 7
MODEL_FLAGS = ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ffn", "dropout", "n_experts",
               "expert_depth", "moe_after", "routing", "gate", "d_route", "dim_reduction", "l2_norm", "learn_tau",
               "tau_init", "balance_tau", "balance_coef", "capacity_factor", "moe_dropout", "detach_route")


def block_list(text):
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block counts, e.g. 2 or 3,6")


def get_parser():
    p = argparse.ArgumentParser(description="Masked-LM pre-training of X-MoE. Flags left unset: on --resume "
                                "the checkpoint's values, else the preset's (" + "; ".join(
                                    f"{k}: " + ", ".join(f"{n}={v}" for n, v in d.items()) for k, d in TRAINING.items())
                                + ").")
    a = p.add_argument
    a("--preset", choices=list(PRESETS), help="model size and training defaults: tiny (tests), mini (reproduce.py), "
      "small (default), base (the paper's Tables 6 and 7)")
    a("--data", metavar="DIR", help="folder of <lang>.txt files (default: the synthetic world's mlm/ folder)")
    a("--prepared", metavar="DIR", help="where the corpus's token files go, made once (default DATA/prepared)")
    a("--prepare-only", action="store_true", help="prepare the corpus (with a progress bar in MB), then stop")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes that tokenize a corpus "
      "being prepared (default: the cores, at most 8)")
    a("--spm", metavar="MODEL", help="SentencePiece model, e.g. XLM-R's (default: UTF-8 bytes)")
    a("--out", default="out", metavar="DIR", help="where ckpt.pt and log.jsonl go (default out)")
    a("--resume", action="store_true", help="continue <out>/ckpt.pt up to --steps; unset flags keep its values")
    a("--stop-after", type=int, metavar="N", help="stop after N steps of this launch with a checkpoint, as if "
      "interrupted (for time-limited jobs); --resume continues")
    add_runtime_flags(p)
    # training
    a("--steps", type=int, help="optimizer steps")
    a("--warmup", type=int, help="warmup steps of the learning rate (linear), then linear decay to 0")
    a("--batch-size", type=int, help="sequences per optimizer step, over all processes")
    a("--grad-accum", type=int, help="micro-batches per process and step")
    a("--lr", type=float, help="peak learning rate")
    a("--eval-every", type=int, help="steps between evaluations (and checkpoints)")
    a("--alpha", type=float, help="language sampling exponent: q_i ~ n_i^alpha (default 0.7)")
    a("--seed", type=int, help="seed of the initialisation, the batches, the masks and dropout (default 0)")
    a("--clip", type=float, help="gradient-norm clipping, 0 = off (default 1.0; not in the paper)")
    # the model (XMoEConfig, whose comments say more)
    a("--routing", choices=("xmoe", "smoe", "dense"), help="X-MoE (Eq. 6), SMoE (Eq. 1) or no sparse layer")
    a("--gate", choices=("softmax", "sigmoid"), help="the gate g(s_k) (Eq. 3 / 7)")
    a("--n-experts", type=int, help="N, experts per sparse layer")
    a("--d-route", type=int, help="d_e, X-MoE's routing dimension (default N / 2)")
    a("--dim-reduction", action=argparse.BooleanOptionalAction, help="X-MoE: project h to d_e (Table 3)")
    a("--l2-norm", action=argparse.BooleanOptionalAction, help="X-MoE: cosine scores (Table 3); without it tau is "
      "1 and fixed unless --tau-init / --learn-tau say otherwise")
    a("--tau-init", type=float, help="initial tau (default 0.3 softmax / 0.07 sigmoid for X-MoE, else 1)")
    a("--learn-tau", action=argparse.BooleanOptionalAction, help="learn tau (default: X-MoE with --l2-norm)")
    a("--balance-tau", type=float, help="tau_0 of the balance loss, Eq. 8 (default: the initial tau)")
    a("--balance-coef", type=float, help="alpha of Eq. 9 (default 1e-2)")
    a("--capacity-factor", type=float, help="keep at most ceil(c T / N) tokens per expert (default: dropless)")
    a("--moe-after", type=block_list, help="sparse layers after these blocks, e.g. 2 or 3,6")
    a("--expert-depth", type=int, help="FFN sublayers per expert (Table 6: 3)")
    for name in ("vocab-size", "max-len", "d-model", "n-layers", "n-heads", "d-ffn"):
        a(f"--{name}", type=int, help="model size (default: the preset's)")
    a("--dropout", type=float, help="dropout of the Transformer (Table 7: 0.1)")
    a("--moe-dropout", type=float, help="dropout inside the experts (default 0)")
    a("--detach-route", action=argparse.BooleanOptionalAction, help="the router scores h.detach(): the same "
      "routing and gates, without the gradient through the router into h (the collapse study's ablation)")
    return p


def resolve(args):
    """Fill the unset flags; the tokenizer and the config. -> (args, cfg, tokenizer, checkpoint or None)."""
    ckpt, saved_cfg = load_checkpoint(Path(args.out) / "ckpt.pt", "--resume") if args.resume else (None, None)
    saved = ckpt["args"] if ckpt else {}
    args.preset = args.preset or saved.get("preset", DEFAULTS["preset"])
    for k, v in {**DEFAULTS, **TRAINING[args.preset]}.items():
        if getattr(args, k) is None:
            setattr(args, k, saved.get(k, v))
    given = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    tok = SentencePieceTokenizer(args.spm) if args.spm else ByteTokenizer()
    if given.get("vocab_size", tok.vocab_size) < tok.vocab_size:
        raise BadInput(f"--vocab-size {given['vocab_size']} is smaller than the tokenizer's {tok.vocab_size}")
    try:  # the tokenizer decides the vocabulary (XLM-R's spm model gives base's 250002)
        base = saved_cfg or replace(XMoEConfig.preset(args.preset), vocab_size=tok.vocab_size)
        cfg = replace(base, **given)
    except ValueError as e:  # XMoEConfig names the field; the user typed a flag
        raise BadInput(re.sub(r"XMoEConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None
    if saved_cfg is not None and cfg != saved_cfg:
        diff = [f"{k} is {a!r} there, {b!r} here" for (k, a), b in zip(saved_cfg.to_dict().items(),
                                                                        cfg.to_dict().values()) if a != b]
        raise BadInput(f"--resume: {args.out}/ckpt.pt was trained with another config: {', '.join(diff)}; "
                       "drop the differing flags or use another --out")
    low = dict(steps=1, batch_size=1, grad_accum=1, warmup=0, eval_every=1, stop_after=1)
    for k, v in low.items():
        if getattr(args, k) is not None and getattr(args, k) < v:
            raise BadInput(f"--{k.replace('_', '-')} must be at least {v}, got {getattr(args, k)}")
    if not (args.lr > 0 and args.alpha >= 0 and args.clip >= 0 and cfg.max_len >= 3):
        raise BadInput(f"--lr must be positive, --alpha and --clip non-negative, --max-len at least 3; got "
                       f"{args.lr}, {args.alpha}, {args.clip}, {cfg.max_len}")
    return args, cfg, tok, ckpt


# ------------------------------------------------------------------------------------------------
# The training run, top to bottom

def main(argv=None):
    t_start = time.time()
    args, cfg, tok, ckpt = resolve(get_parser().parse_args(argv))
    out_dir = Path(args.out)
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "log.jsonl"

    # --- distributed init: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE ---------------------------
    rt = setup_distributed(args.device)
    ep = args.expert_parallel
    if ep:
        check_expert_parallel(cfg, rt)
    G, A = args.batch_size, args.grad_accum  # the global batch (sequences), micro-batches per process
    if G % (rt.world * A):
        raise BadInput(f"--batch-size {G} must be divisible by processes x --grad-accum = {rt.world} x {A}")

    # --- data: prepared once (by one process), then memory-mapped by every process ---------------
    corpus = load_corpus(args, tok, rt)
    if corpus is None:  # --prepare-only
        return teardown_distributed()
    q = sampling_probs(corpus.n_tokens, args.alpha)
    v = validation_set(corpus, cfg.max_len, args.seed, tok)
    H = unigram_entropy(v.ids, tok)  # the loss of a model that ignores the context, for comparison
    print0(f"corpus: {len(corpus.langs)} languages, {int(corpus.n_tokens.sum()):,} training tokens, "
           f"{len(v.ids)} validation sequences; sampling q (alpha {args.alpha}): "
           + " ".join(f"{lang} {p:.3f}" for lang, p in zip(corpus.langs, q)))

    # --- model and optimizer --------------------------------------------------------------------
    torch.set_default_dtype(torch.float64 if args.float64 else torch.float32)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = build_model(cfg, ckpt["model"] if ckpt else None, "--resume", ckpt_path).to(rt.device)
    print0(f"X-MoE {args.preset}, {describe(raw_model, cfg)}; {rt.world} process(es) on {rt.device}"
           + (", experts sharded" if ep else ""))
    model = distribute(raw_model, rt, ep)
    named_params = list(raw_model.named_parameters())
    optimizer = torch.optim.AdamW(param_groups(raw_model, WEIGHT_DECAY), lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    autocast = autocast_for(rt.device, args.float64)

    # --- resume, or a new log that opens with the data ------------------------------------------
    start, prev_routing, groups = 0, None, ckpt.get("groups") if ckpt else None  # groups: see evaluate
    with together(rt):  # rank 0 reads and writes the log: a bad one (or a full disk) stops every rank
        if ckpt is not None:
            start, prev_routing = restore(ckpt, raw_model, optimizer, log_path, corpus, rt)
            print0(f"resumed {ckpt_path} at step {start}")
        elif rt.master:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(log_path, json.dumps({"step": 0, "languages": corpus.langs, "q": q.tolist(),
                                               "tokens": corpus.n_tokens.tolist(), "alpha": args.alpha,
                                               "startup_s": round(time.time() - t_start, 2)}) + "\n")
    del ckpt  # release the (memory-mapped) checkpoint

    def save(step, routing):
        """The whole model (every expert, unwrapped) and AdamW's moments, written by rank 0 (under
        expert parallelism every rank takes part in gathering the experts)."""
        state = gather_experts(raw_model, raw_model.state_dict())
        moments = {k: gather_experts(raw_model, {n: optimizer.state[p][k] for n, p in named_params})
                   for k in ("exp_avg", "exp_avg_sq")}
        if rt.master:
            try:
                save_checkpoint(ckpt_path, {"model": state, "optimizer": moments, "step": step, "config": cfg.to_dict(),
                                            "args": vars(args), "tokenizer": tok.spec, "routing": routing,
                                            "groups": groups})
            except DiskFull as e:
                raise DiskFull(f"{e}. " + last_good(ckpt_path, last_saved) + (
                    f" It is intact: free some space, then `python train_mlm.py --resume --out {out_dir}` continues "
                    "from it." if last_saved else " Free some space and start again.")) from None

    def evaluation(step):
        """Evaluate, save, then log (a logged evaluation has its checkpoint; step 0, the initial state
        every routing shares, is not saved). A failure on any rank stops every rank."""
        nonlocal prev_routing, last_saved, metrics, groups
        with together(rt):
            if not (rt.master or ep):  # under expert parallelism every rank takes part in the forward
                return
            routing, metrics, groups = evaluate(raw_model, v, corpus.langs, tok, autocast, rt.device, groups)
            metrics["rf"] = None if prev_routing is None else \
                [routing_fluctuation(a, b) for a, b in zip(prev_routing, routing)]
            if not math.isfinite(metrics["val_mlm_loss"]):
                raise Diverged(f"validation loss is {metrics['val_mlm_loss']} at step {step}; stopped. "
                               + last_good(ckpt_path, last_saved))
            if step > 0:
                save(step, routing)
            if rt.master:
                append_jsonl(log_path, {"step": step, **metrics, "unigram_entropy": H})
            print0(f"step {step}: val MLM loss {metrics['val_mlm_loss']:.4f} (unigram entropy {H:.4f}), "
                   f"RC {fmt(metrics['rc'])}, RF {fmt(metrics['rf'])}, tau {fmt(metrics['tau'])}, "
                   f"participation ratio {fmt(metrics['participation_ratio'])}")
            prev_routing, last_saved = routing, step or None

    # --- training loop: an evaluation before the first update, then every --eval-every steps -----
    step, metrics, last_saved = start, None, (start or None)
    if start == 0:
        evaluation(0)
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    bar = tqdm(total=args.steps, initial=start, disable=not rt.master, dynamic_ncols=True)
    seen_tokens, train_time = 0, 0.0
    try:  # the bar ends its line before any error line
        while step < stop:
            t0 = time.time()
            lr = lr_at(step, args.lr, args.warmup, args.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inp, labels = global_batch(step, args.seed, G, cfg.max_len, q, corpus, tok)
            M = int((labels != -100).sum())  # masked tokens in the whole global batch
            sums = forward_backward(model, inp, labels, M, A, step, args.seed, rt, tok, cfg, autocast)
            mlm, balance = sums[0].item() / max(M, 1), sums[1].item() / (rt.world * A)
            loss = mlm + cfg.balance_coef * balance
            if not math.isfinite(loss):  # the same on every rank: the sums are all-reduced
                raise Diverged(f"loss is {loss} at step {step + 1}; stopped before its update. "
                               + last_good(ckpt_path, last_saved) + " Try a lower --lr.")
            grad_norm = step_optimizer(optimizer, named_params, args.clip, rt, ep)
            step += 1
            dt = time.time() - t0
            seen_tokens, train_time = seen_tokens + sums[2].item(), train_time + dt
            with together(rt):
                if rt.master:  # a full disk here stops every rank
                    tau = [float(m.router.tau.detach()) for m in moe_layers(raw_model)]
                    append_jsonl(log_path, {"step": step, "loss": loss, "mlm_loss": mlm, "balance_loss": balance,
                                            "lr": lr, "tau": tau, "grad_norm": grad_norm,
                                            "tokens_per_s": round(sums[2].item() / dt, 1)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{seen_tokens / train_time:,.0f}")
            if step % args.eval_every == 0 or step == args.steps:
                evaluation(step)
            elif step == stop:  # --stop-after: a checkpoint as if interrupted here
                with together(rt):
                    if rt.master or ep:
                        save(step, prev_routing)
    finally:
        bar.close()

    # --- summary --------------------------------------------------------------------------------
    if step < args.steps:
        print0(f"stopped at step {step} of {args.steps} (--stop-after); {ckpt_path} continues with --resume")
    elif metrics is None:
        print0(f"nothing to do: {ckpt_path} is already at step {start} of --steps {args.steps}")
    else:
        print0(summary(metrics, H, cfg, ckpt_path, log_path, args.data, seen_tokens, train_time,
                       time.time() - t_start))
    teardown_distributed()


def load_corpus(args, tok, rt):
    """Prepare the corpus (process 0 of each machine; the others wait), then memory-map it.
    -> Corpus, None on --prepare-only."""
    data_dir = Path(args.data) if args.data else SYNTHETIC_DIR / "mlm"
    prepared = Path(args.prepared) if args.prepared else data_dir / "prepared"
    if rt.local_rank == 0:
        prepare_corpus(data_dir if args.data else synthetic_corpus(), prepared, tok, args.workers)
    if rt.ddp:
        dist.barrier()
    if args.prepare_only:
        return print0(f"prepared {data_dir} in {prepared}")
    corpus = open_corpus(read_manifest(prepared), prepared, data_dir)
    if (corpus.n_train == [len(s) - 1 for s in corpus.starts]).all():
        raise BadInput(f"--data {data_dir}: too little text to hold out a validation split; a language "
                       "needs at least two lines")
    return corpus


def describe(model, cfg):
    """The routing, the sparse layers and the parameter counts, total and active per token."""
    total = sum(p.numel() for p in model.parameters())
    if cfg.routing == "dense":
        return f"Dense baseline: {total / 1e6:.2f}M parameters"
    experts = sum(p.numel() for m in moe_layers(model) for p in m.experts.parameters())
    active = total - experts + experts // cfg.n_experts  # one expert per sparse layer
    return (f"{cfg.routing}/{cfg.gate}, {cfg.n_experts} experts after block(s) {','.join(map(str, cfg.sparse_after))}: "
            f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token")


def forward_backward(model, inp, labels, M, A, step, seed, rt, tok, cfg, autocast):
    """Forward and backward of this rank's share of a global batch (G, L), in A micro-batches.
    -> the batch's summed token losses, summed balance losses and real tokens, over every rank.

    Normalisation: the 1-process loss is the mean over the global batch's M masked tokens. A micro-
    batch's summed token losses divided by M add up, over micro-batches and ranks, to that mean;
    times `world` because DDP averages the ranks' gradients. The balance loss (Eq. 8) is computed
    per micro-batch on its own tokens and averaged over all world * A micro-batches (1/A here,
    1/world by DDP). Together: Eq. 9, L_MLM + balance_coef * sum_layers L_balance, for the batch."""
    share = len(inp) // rt.world
    B = share // A  # sequences per micro-batch
    sums = torch.zeros(3, dtype=torch.float64)  # on the CPU; a copy travels for the all-reduce
    for j in range(A):
        rows = slice(rt.rank * share + j * B, rt.rank * share + (j + 1) * B)
        ids, lab = torch.from_numpy(inp[rows]).to(rt.device), torch.from_numpy(labels[rows]).to(rt.device)
        pad = ids == tok.pad  # <pad> is never masked or replaced, so the input shows the padding
        torch.manual_seed(micro_seed(seed, step, rt.rank, j))
        # DDP all-reduces the gradients only on the last micro-batch; no_sync must wrap the forward too
        with model.no_sync() if rt.ddp and j < A - 1 else nullcontext():
            with autocast:
                out = model(ids, pad_mask=pad)
            ce = F.cross_entropy(upcast(out.logits).flatten(0, 1), lab.flatten(), ignore_index=-100, reduction="sum")
            loss = ce * rt.world / max(M, 1) + cfg.balance_coef * out.balance_loss / A
            loss.backward()
        sums += torch.tensor([ce.item(), out.balance_loss.item(), (~pad).sum().item()], dtype=torch.float64)
    if rt.ddp:  # the global batch's figures, for the log (NCCL reduces tensors on the GPU only)
        sums = sums.to(rt.device)
        dist.all_reduce(sums)
    return sums.cpu()


def restore(ckpt, raw_model, optimizer, log_path, corpus, rt):
    """AdamW's state from the checkpoint; the log keeps its rows up to the checkpoint (later ones are
    redone), after a check that the corpus is the one the log opens with. The moments are saved by
    parameter name, not position, so they survive expert sharding. -> (step, the last routing)."""
    start = int(ckpt["step"])
    moments = {k: local_experts(raw_model, m) for k, m in ckpt["optimizer"].items()}
    for n, p in raw_model.named_parameters():
        optimizer.state[p] = {"step": torch.tensor(float(start)),  # AdamW's own step counter, on the CPU
                              **{k: moments[k][n].to(rt.device, p.dtype) for k in moments}}
    if rt.master:
        rows = [json.loads(s) for s in (log_path.read_text().splitlines() if log_path.exists() else []) if s]
        data = next((r for r in rows if "q" in r), None)
        if data and (data["languages"], data["tokens"]) != (corpus.langs, corpus.n_tokens.tolist()):
            raise BadInput(f"--resume: the corpus is not the one {log_path} began with (languages or their token "
                           "counts differ), so the batches would differ too; restore it, or start a new --out")
        write_atomic(log_path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start))
    return start, ckpt["routing"]


def last_good(ckpt_path, step):
    return f"The last good checkpoint is {ckpt_path} (step {step})." if step else "No checkpoint was written yet."


def fmt(xs):
    return "-" if xs is None else "/".join(f"{x:.3f}" for x in xs)


def summary(m, H, cfg, ckpt_path, log_path, data, tokens, train_time, wall):
    loads = [np.array(l) for l in m["expert_load"]]
    balance = " ".join(f"layer after block {b}: busiest expert {l.max() / l.sum():.1%} of tokens "
                       f"(uniform {1 / len(l):.1%}), {int((l == 0).sum())} idle"
                       for b, l in zip(cfg.sparse_after, loads))
    tasks = "data/synthetic" if data is None else "<XTREME folder>"
    return "\n".join([
        f"done in {wall / 60:.1f} min: {tokens / 1e6:.2f}M tokens trained on at {tokens / max(train_time, 1e-9):,.0f} "
        "tokens/s",
        f"validation MLM loss {m['val_mlm_loss']:.4f} nats/token; unigram entropy of the corpus {H:.4f} "
        "(the best a model that ignores context can do)",
        f"expert load: {balance or 'dense model, no experts'}",
        f"RC (Eq. 10, larger = less collapse) {fmt(m['rc'])}; tau {fmt(m['tau'])}",
        f"the router's input h: participation ratio {fmt(m['participation_ratio'])} of d = {cfg.d_model}; share of "
        f"its variance in the directions the router reads {fmt(m['read_share'])} (k/d "
        f"{fmt(m['read_share_isotropic'])}); mean gate {fmt(m['gate'])}",
        f"checkpoint {ckpt_path}, log {log_path}",
        f"next: python finetune.py --task udpos --data {tasks} --init {ckpt_path} --out runs/{cfg.routing}/udpos"])


if __name__ == "__main__":
    cli(main, interrupted="interrupted: `python train_mlm.py --resume` (same --out) continues from the last checkpoint")
