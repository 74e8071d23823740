"""
Masked-LM pre-training of X-MoE (Chi et al. 2022, section 4.1 and Appendix B).

    python train_mlm.py                     # CPU, minutes: `small` on the built-in synthetic corpus
    python train_mlm.py --routing smoe      # the SMoE baseline, on the same batches
    python train_mlm.py --preset base --data corpus/ --spm sentencepiece.bpe.model
                                            # one GPU: the paper's model on your corpus, XLM-R's vocabulary
    torchrun --standalone --nproc_per_node=8 train_mlm.py --preset base --data corpus/ --spm sentencepiece.bpe.model
                                            # 8 GPUs; add --expert-parallel to shard the experts
    python train_mlm.py --resume            # continue out/ckpt.pt up to --steps

--data DIR holds one UTF-8 text file per language, DIR/<lang>.txt, one sentence or document a line,
tokenized once into DIR/prepared (corpus.py); without it, the synthetic world (synthetic.py) is
written once to data/synthetic and its mlm/ folder is the corpus. A run writes <out>/ckpt.pt (at
every evaluation) and <out>/log.jsonl: the data (languages, n_i, q_i), an evaluation of the initial
state (step 0, shared by every routing of one seed), a row per step and an evaluation every
--eval-every steps (analysis.evaluate: MLM loss, expert loads, RC, RF, measures of the router's input).

Reproducibility: the sequences and masks of global batch `step` are a function of (seed, step), and
dropout is reseeded from (seed, step, rank); --resume ends bit-identical to the uninterrupted run.
With dropout off, K processes and 1 process with K micro-batches give the same run (to ~1e-10 with
--float64): the balance loss is computed per micro-batch and weighted by its masked tokens, as in the
paper's fairseq.
"""

import argparse
import json
import math
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from analysis import evaluate, routing_fluctuation, validation_set
from corpus import ByteTokenizer, SentencePieceTokenizer, global_batch, load_corpus, sampling_probs, unigram_entropy
from runtime import (BadInput, Diverged, accumulate, add_runtime_flags, append_jsonl, autocast_for, build_model,
                     check_bounds, check_expert_parallel, cli, distribute, load_checkpoint, lr_at, moe_layers,
                     on_disk_full, param_groups, print0, save_checkpoint, setup_distributed, step_optimizer,
                     takes_part, teardown_distributed, together, write_atomic)
from xmoe import PRESETS, XMoEConfig, gather_experts, local_experts, parameter_counts


def main(argv=None):
    t_start = time.time()
    args, cfg, tok, ckpt = resolve(get_parser().parse_args(argv))
    rt = setup_distributed(args.device)  # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
    if args.expert_parallel:
        check_expert_parallel(cfg, rt)
    if args.batch_size % (rt.world * args.grad_accum):
        raise BadInput(f"--batch-size {args.batch_size} must be divisible by processes x --grad-accum = "
                       f"{rt.world} x {args.grad_accum}")

    # --- data: prepared once (by one process a machine), then memory-mapped by every process ----
    corpus = load_corpus(args.data, args.prepared, tok, rt, args.workers, args.prepare_only)
    if corpus is None:  # --prepare-only
        return teardown_distributed()
    q = sampling_probs(corpus.n_tokens, args.alpha)
    val = validation_set(corpus, cfg.max_len, args.seed, tok)
    entropy = unigram_entropy(val.ids, tok)  # the loss of a model that ignores the context, for comparison
    print0(f"corpus: {len(corpus.langs)} languages, {int(corpus.n_tokens.sum()):,} training tokens, "
           f"{len(val.ids)} validation sequences; sampling q (alpha {args.alpha}): "
           + " ".join(f"{lang} {p:.3f}" for lang, p in zip(corpus.langs, q)))

    # --- model and optimizer --------------------------------------------------------------------
    torch.set_default_dtype(torch.float64 if args.float64 else torch.float32)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = build_model(cfg, ckpt["model"] if ckpt else None, "--resume", Path(args.out) / "ckpt.pt")
    raw_model = raw_model.to(rt.device)
    print0(f"X-MoE {args.preset}, {describe(raw_model, cfg)}; {rt.world} process(es) on {rt.device}"
           + (", experts sharded" if args.expert_parallel else ""))
    model = distribute(raw_model, rt, args.expert_parallel)  # DDP under torchrun; raw_model is what we save
    optimizer = torch.optim.AdamW(param_groups(raw_model, WEIGHT_DECAY), lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    run = Run(args, cfg, tok, rt, raw_model, model, optimizer, corpus, q, val, entropy,
              Path(args.out) / "ckpt.pt", Path(args.out) / "log.jsonl")

    # --- resume, or a new log that opens with the data and the evaluation of step 0 -------------
    if ckpt:
        last = resume(run, ckpt)
        del ckpt  # release the (memory-mapped) checkpoint
    else:
        new_log(run, time.time() - t_start)
        last = evaluation(run, 0, None)  # the initial state: the control every routing of one seed shares
    start = step = last.step

    # --- the training loop: a step on each global batch, an evaluation every --eval-every steps ---
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    bar = tqdm(total=args.steps, initial=start, disable=not rt.master, dynamic_ncols=True)
    tokens, seconds = 0, 0.0
    try:  # the bar ends its line before any error line
        while step < stop:
            row, step_tokens, step_seconds = train_step(run, step, last.step)
            step, tokens, seconds = step + 1, tokens + step_tokens, seconds + step_seconds
            with together(rt):  # a full disk on rank 0 stops every rank
                if rt.master:
                    append_jsonl(run.log_path, row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens / seconds:,.0f}")
            if step % args.eval_every == 0 or step == args.steps:
                last = evaluation(run, step, last)
            elif step == stop:  # --stop-after: a checkpoint as if interrupted here
                with together(rt):
                    if takes_part(rt, args.expert_parallel):
                        save(run, step, last)
    finally:
        bar.close()

    # --- summary --------------------------------------------------------------------------------
    if step < args.steps:
        print0(f"stopped at step {step} of {args.steps} (--stop-after); {run.ckpt_path} continues with --resume")
    elif last.metrics is None:
        print0(f"nothing to do: {run.ckpt_path} is already at step {start} of --steps {args.steps}")
    else:
        print0(summary(run, last.metrics, tokens, seconds, time.time() - t_start))
    teardown_distributed()


# ------------------------------------------------------------------------------------------------
# The steps of the story above


class Run(NamedTuple):
    """What a pre-training run holds fixed, for the helpers of main."""
    args: argparse.Namespace
    cfg: XMoEConfig
    tok: object  # ByteTokenizer or SentencePieceTokenizer (corpus.py)
    rt: object  # runtime.Runtime: rank, world, device
    raw_model: torch.nn.Module  # the MaskedLM: what is evaluated and saved
    model: torch.nn.Module  # what is trained: raw_model, under torchrun wrapped in DDP
    optimizer: torch.optim.Optimizer
    corpus: object  # corpus.Corpus, memory-mapped
    q: np.ndarray  # (languages,) sampling probabilities, q_i ~ n_i^alpha
    val: object  # analysis.Validation: the held-out sequences, masked once
    entropy: float  # the unigram entropy of the validation tokens
    ckpt_path: Path  # <out>/ckpt.pt
    log_path: Path  # <out>/log.jsonl


class Evaluation(NamedTuple):
    step: int  # 0 (the initial state) or the step of the checkpoint it was saved with
    routing: list  # (V, L) top-1 experts per sparse layer, -1 at padding: RF at the next evaluation
    metrics: dict  # what the log's evaluation row holds; None for a checkpoint resumed
    reference: dict  # what later evaluations measure against, made at step 0 (analysis.evaluate)


def train_step(run, step, saved):
    """One optimizer step on global batch `step`, shared out over processes and --grad-accum micro-batches
    (saved: the last checkpoint's step, for an error). -> (the log's row, the step's tokens, seconds)."""
    args, rt, t0 = run.args, run.rt, time.time()
    lr = lr_at(step, args.lr, args.warmup, args.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    inp, labels = global_batch(step, args.seed, args.batch_size, run.cfg.max_len, run.q, run.corpus, run.tok)
    rows = args.batch_size // (rt.world * args.grad_accum)  # sequences per micro-batch
    micro = []
    for j in range(rt.rank * args.grad_accum, (rt.rank + 1) * args.grad_accum):  # this rank's micro-batches
        ids, lab = (torch.from_numpy(a[j * rows:(j + 1) * rows]).to(rt.device) for a in (inp, labels))
        micro.append((dict(input_ids=ids, labels=lab, pad_mask=ids == run.tok.pad), int((lab != -100).sum())))
    n_masked = int((labels != -100).sum())  # in the whole global batch
    torch.manual_seed(dropout_seed(args.seed, step, rt.rank))  # no dependence on RNG history: resume is exact
    sums = torch.zeros(3, dtype=torch.float64)  # masked-token loss and balance loss, each weighted by n; tokens
    sums[2] = sum((~inputs["pad_mask"]).sum().item() for inputs, _ in micro)
    try:
        for out, n in accumulate(run.model, micro, n_masked, rt, args.float64):
            sums[:2] += torch.tensor([out.mlm_loss.item(), out.balance_loss.item()], dtype=torch.float64) * n
    except Diverged as e:
        raise Diverged(f"{e} at step {step + 1}; stopped before its update. {last_good(run.ckpt_path, saved)} "
                       "Try a lower --lr.") from None
    if rt.ddp:  # the global batch's figures, for the log (NCCL reduces tensors on the GPU only)
        sums = sums.to(rt.device)
        dist.all_reduce(sums)
    mlm, balance, tokens = sums[0].item() / max(n_masked, 1), sums[1].item() / max(n_masked, 1), sums[2].item()
    grad_norm = step_optimizer(run.optimizer, list(run.raw_model.named_parameters()), args.clip, rt,
                               args.expert_parallel)
    seconds = time.time() - t0
    tau = [float(m.router.tau.detach()) for m in moe_layers(run.raw_model)]
    return {"step": step + 1, "loss": mlm + run.cfg.balance_coef * balance, "mlm_loss": mlm, "balance_loss": balance,
            "lr": lr, "tau": tau, "grad_norm": grad_norm, "tokens_per_s": round(tokens / seconds, 1)}, tokens, seconds


def evaluation(run, step, last):
    """Evaluate, save, then log (a logged evaluation has its checkpoint; step 0, the initial state every
    routing shares, is not saved). A failure on any rank stops every rank. -> Evaluation."""
    rt = run.rt
    with together(rt):
        if not takes_part(rt, run.args.expert_parallel):
            return Evaluation(step, None, None, None)
        routing, metrics, reference = evaluate(run.raw_model, run.val, run.corpus.langs, run.tok.pad,
                                               autocast_for(rt.device, run.args.float64),
                                               last.reference if last else None)
        metrics["rf"] = None if last is None or last.routing is None else \
            [routing_fluctuation(a, b) for a, b in zip(last.routing, routing)]
        if not math.isfinite(metrics["val_mlm_loss"]):
            raise Diverged(f"validation loss is {metrics['val_mlm_loss']} at step {step}; stopped. "
                           + last_good(run.ckpt_path, last.step if last else 0))
        this = Evaluation(step, routing, metrics, reference)
        if step > 0:
            save(run, step, this, saved=last.step)
        if rt.master:
            append_jsonl(run.log_path, {"step": step, **metrics, "unigram_entropy": run.entropy})
        print0(f"step {step}: val MLM loss {metrics['val_mlm_loss']:.4f} (unigram entropy {run.entropy:.4f}), "
               f"RC {fmt(metrics['rc'])}, RF {fmt(metrics['rf'])}, tau {fmt(metrics['tau'])}, mean gate "
               f"{fmt(metrics['gate'])}, participation ratio of h {fmt(metrics['participation_ratio'])}")
    return this


def save(run, step, last, saved=None):
    """The whole model (every expert, unwrapped) and AdamW's moments, by parameter name, written by
    rank 0; under expert parallelism every rank takes part in gathering the experts. `saved`: the
    step of the checkpoint there now (default last.step)."""
    raw, named = run.raw_model, list(run.raw_model.named_parameters())
    state = gather_experts(raw, raw.state_dict())
    moments = {k: gather_experts(raw, {n: run.optimizer.state[p][k] for n, p in named})
               for k in ("exp_avg", "exp_avg_sq")}
    saved = last.step if saved is None else saved
    if run.rt.master:
        with on_disk_full(last_good(run.ckpt_path, saved) + (
                f" It is intact: free some space, then `python train_mlm.py --resume --out {run.args.out}` continues "
                "from it." if saved else " Free some space and start again.")):
            save_checkpoint(run.ckpt_path, {"model": state, "optimizer": moments, "step": step,
                                            "config": run.cfg.to_dict(), "args": vars(run.args),
                                            "tokenizer": run.tok.spec, "routing": last.routing,
                                            "reference": last.reference})


def new_log(run, startup_s):
    """The log's first row: the data the run samples from."""
    with together(run.rt):  # a full disk on rank 0 stops every rank
        if run.rt.master:
            run.log_path.parent.mkdir(parents=True, exist_ok=True)
            c = run.corpus
            write_atomic(run.log_path, json.dumps({"step": 0, "languages": c.langs, "q": run.q.tolist(),
                                                   "tokens": c.n_tokens.tolist(), "alpha": run.args.alpha,
                                                   "startup_s": round(startup_s, 2)}) + "\n")


def resume(run, ckpt):
    """AdamW's state from the checkpoint; the log keeps its rows up to the checkpoint (later ones are
    redone), after a check that the corpus is the one the log opens with. The moments are saved by
    parameter name, not position, so they survive expert sharding. -> the checkpoint's Evaluation."""
    start = int(ckpt["step"])
    moments = {k: local_experts(run.raw_model, m) for k, m in ckpt["optimizer"].items()}
    for n, p in run.raw_model.named_parameters():
        run.optimizer.state[p] = {"step": torch.tensor(float(start)),  # AdamW's own step counter, on the CPU
                                  **{k: moments[k][n].to(run.rt.device, p.dtype) for k in moments}}
    with together(run.rt):  # rank 0 reads and writes the log: a bad one stops every rank
        if run.rt.master:
            log = run.log_path
            rows = [json.loads(s) for s in (log.read_text().splitlines() if log.exists() else []) if s]
            data = next((r for r in rows if "q" in r), None)
            if data and (data["languages"], data["tokens"]) != (run.corpus.langs, run.corpus.n_tokens.tolist()):
                raise BadInput(f"--resume: the corpus is not the one {log} began with (languages or their token "
                               "counts differ), so the batches would differ too; restore it, or start a new --out")
            write_atomic(log, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start))
    print0(f"resumed {run.ckpt_path} at step {start}")
    return Evaluation(start, ckpt["routing"], None, ckpt["reference"])


def dropout_seed(seed, step, rank):
    """Dropout's torch seed for one step of one rank: no dependence on RNG history, so resume is exact."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def last_good(ckpt_path, step):
    return f"The last good checkpoint is {ckpt_path} (step {step})." if step else "No checkpoint was written yet."


def fmt(xs):
    return "/".join(f"{x:.3f}" for x in xs) if xs else "-"


def describe(model, cfg):
    """The routing, the sparse layers and the parameter counts, total and active per token."""
    total, active = parameter_counts(model)
    if cfg.routing == "dense":
        return f"Dense baseline: {total / 1e6:.2f}M parameters"
    return (f"{cfg.routing}/{cfg.gate}, {cfg.n_experts} experts after block(s) {','.join(map(str, cfg.sparse_after))}: "
            f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token")


def summary(run, m, tokens, seconds, wall):
    cfg, loads = run.cfg, [np.array(l) for l in m["expert_load"]]
    balance = " ".join(f"layer after block {b}: busiest expert {l.max() / l.sum():.1%} of tokens (uniform "
                       f"{1 / len(l):.1%}), {int((l == 0).sum())} idle" for b, l in zip(cfg.sparse_after, loads))
    tasks = "data/synthetic" if run.args.data is None else "<XTREME folder>"
    return "\n".join([
        f"done in {wall / 60:.1f} min: {tokens / 1e6:.2f}M tokens trained on at {tokens / max(seconds, 1e-9):,.0f} "
        "tokens/s",
        f"validation MLM loss {m['val_mlm_loss']:.4f} nats/token; unigram entropy of the corpus {run.entropy:.4f} "
        "(the best a model that ignores context can do)",
        f"expert load: {balance or 'dense model, no experts'}",
        f"RC (Eq. 10, larger = less collapse) {fmt(m['rc'])}; tau {fmt(m['tau'])}",
        f"the router's input h: participation ratio {fmt(m['participation_ratio'])} of d = {cfg.d_model}; share of "
        f"its variance in the directions the router reads {fmt(m['read_share'])} (95% of random spans of as many "
        f"directions: {'/'.join(f'{lo:.3f} to {hi:.3f}' for _, lo, hi in m['read_share_chance'])}); "
        f"mean gate {fmt(m['gate'])}",
        f"checkpoint {run.ckpt_path}, log {run.log_path}",
        f"next: python finetune.py --task udpos --data {tasks} --init {run.ckpt_path} --out runs/{cfg.routing}/udpos"])


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
      "routing and gates, without the gradient through the router into h (J_2 of Eqs. 4-5, Eq. 8's), the "
      "collapse study's ablation")
    return p


def resolve(args):
    """Fill the unset flags; the tokenizer and the config. -> (args, cfg, tokenizer, checkpoint or None)."""
    ckpt, saved_cfg = load_checkpoint(Path(args.out) / "ckpt.pt", "--resume") if args.resume else (None, None)
    if ckpt is not None and "reference" not in ckpt:
        raise BadInput(f"--resume: {args.out}/ckpt.pt was written by an older train_mlm.py, without the step-0 "
                       "reference its evaluations measure against; start a new --out")
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
    check_bounds([(k.replace("_", "-"), getattr(args, k), low, None) for k, low in
                  dict(steps=1, batch_size=1, grad_accum=1, warmup=0, eval_every=1, stop_after=1).items()])
    if not (args.lr > 0 and args.alpha >= 0 and args.clip >= 0 and cfg.max_len >= 3):
        raise BadInput(f"--lr must be positive, --alpha and --clip non-negative, --max-len at least 3; got "
                       f"{args.lr}, {args.alpha}, {args.clip}, {cfg.max_len}")
    return args, cfg, tok, ckpt


if __name__ == "__main__":
    cli(main, interrupted="interrupted: `python train_mlm.py --resume` (same --out) continues from the last checkpoint")
