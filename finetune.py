"""
Fine-tuning a pre-trained X-MoE checkpoint on an XTREME task, with frozen routing (Chi et al. 2022,
section 3.3), several seeds, zero-shot evaluation on every language, and the inter-run consistency
of the routing through fine-tuning (section 4.5, Figure 3b).

    python train_mlm.py              # once: out/ckpt.pt, and the synthetic world in data/synthetic
    python finetune.py --task udpos --data data/synthetic --init out/ckpt.pt --out runs/xmoe/udpos
                                     # CPU, 1.5 to 4 min: train on English, test zero-shot on every language
    python finetune.py --task xquad --data data/synthetic --init out/ckpt.pt --out runs/xmoe/xquad --seeds 1 2
                                     # two seeds: mean ± std and the inter-run consistency (IC)
    python finetune.py --task xnli --data download --init base.pt --out runs/xmoe/xnli --seeds 1 2 3 4 5
                                     # one GPU, real XTREME (download/ of XTREME's scripts/download_data.sh)
    torchrun --standalone --nproc_per_node=8 finetune.py --task mlqa --data download --init base.pt --out runs/xmoe/mlqa
                                     # 8 GPUs: each batch split over them; --expert-parallel shards the experts
    python eval_xtreme.py table runs/dense runs/smoe runs/xmoe        # the paper's Table 1

Tasks: udpos, panx (tagging), xnli, pawsx (sentence pairs), xquad, mlqa, tydiqa (extractive QA). Train on
English, select the epoch on English dev (tydiqa has none: the final model, as XTREME), predict every test
language, and score every dev language when the test files carry no labels (as after XTREME's download). Writes
  OUT/results.json                                  what `eval_xtreme.py table` reads
  OUT/predictions/seed<k>/<task>/test-<lang>.tsv    XTREME's official prediction files (.json for QA)
  OUT/seed<k>/log.jsonl, OUT/seed<k>/expert_loads.json   training loss per step, English dev scores per
                                                    epoch; tokens per expert per window of --ic-every steps

Frozen routing fixes the router (W, e_i, tau) and the experts; the layers below still learn, so the hidden
states the router sees move and a token's expert can still change (IC measures how alike the seeds' routings end).
"""

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from analysis import counting_experts, ic_curve
from corpus import ByteTokenizer, make_tokenizer
from eval_xtreme import (METRICS, TASKS, DataError, format_scores, languages, load_split, score_task, summarize,
                         write_predictions)
from runtime import (BadInput, Diverged, accumulate, add_runtime_flags, autocast_for, build_model, check_bounds,
                     check_expert_parallel, cli, distribute, load_checkpoint, lr_at, moe_layers, on_disk_full,
                     param_groups, pretraining_key, print0, setup_distributed, step_optimizer, takes_part,
                     teardown_distributed, together, write_atomic)
from xmoe import freeze_moe, upcast


def main(argv=None):
    t0 = time.time()
    args = get_parser().parse_args(argv)
    torch.set_default_dtype(torch.float64 if args.float64 else torch.float32)
    ckpt, cfg = load_checkpoint(args.init, "--init")
    tok = make_tokenizer(ckpt["tokenizer"])
    if tok.vocab_size > cfg.vocab_size:
        raise BadInput(f"--init {args.init}: its vocabulary ({cfg.vocab_size}) is smaller than its tokenizer's "
                       f"({tok.vocab_size}); the checkpoint does not belong to this tokenizer")
    encoder = build_model(cfg, ckpt["model"], "--init", args.init).encoder  # the MLM head is not needed
    args = resolve_args(args, cfg, ckpt["args"]["preset"], byte_level(tok))
    args.name = args.name or ("dense" if cfg.routing == "dense" else f"{cfg.routing}-{cfg.gate}")
    rt = setup_distributed(args.device)
    if args.expert_parallel:
        check_expert_parallel(cfg, rt)

    # --- data: English training set, English dev for selection, every test and dev language ------
    train_examples = load_split(args.data, args.task, "train", "en")[:args.max_train]
    train = featurize(args.task, train_examples, tok, args, train=True)
    if not train:
        raise DataError(f"no usable {args.task} training examples under {args.data}")
    sets = load_eval_sets(args, tok)
    print0(f"{args.task}: {len(train_examples)} English training examples ({len(train)} features of at most "
           f"{args.max_length} tokens), test languages {' '.join(l for s, l in sets if s == 'test')}; {args.name} "
           f"from {args.init}; recipe {args.recipe}: batch {args.batch_size}, lr {args.lr}, warmup {args.warmup}, "
           f"weight decay {args.weight_decay}, {args.epochs} epochs; {rt.world} process(es) on {rt.device}")

    # --- one fine-tuning run per seed, then zero-shot evaluation --------------------------------
    per_seed, dev_per_seed, loads_per_seed = {}, {}, []
    advice = (f"{Path(args.out) / 'results.json'} is written last, aside and then renamed, so it is never "
              "half-written; free some space and run the same command again (the fine-tuning is redone)")
    for seed in args.seeds:
        trained = train_seed(seed, encoder, train, sets.get(("dev", "en")), tok, args, rt)
        loads_per_seed.append(trained[2])
        with together(rt, DataError), on_disk_full(advice):  # rank 0 alone writes: a full disk there stops all
            if takes_part(rt, args.expert_parallel):
                per_seed[str(seed)], dev_per_seed[str(seed)] = zero_shot(trained, sets, seed, tok, args, rt)
    with together(rt, DataError), on_disk_full(advice):  # rank 0 decides what is reported (may find no labels)
        if rt.master:
            finish(args, ckpt["config"], pretraining_key(ckpt), per_seed, dev_per_seed, loads_per_seed,
                   time.time() - t0)
    teardown_distributed()


def finish(args, config, pretraining, per_seed, dev_per_seed, loads_per_seed, wall):
    """results.json (the format `eval_xtreme.py table` reads) and the printed summary. `pretraining`
    names the checkpoint fine-tuned (pretraining_key), so that a result is never read against another."""
    out = Path(args.out)
    split = "test" if all(per_seed.values()) else "dev"  # XTREME's download strips the test labels
    seeds = per_seed if split == "test" else dev_per_seed
    if not all(seeds.values()):
        raise DataError(f"neither the test nor the dev files of {args.task} under {args.data} carry labels: "
                        f"predictions are in {out / 'predictions'}, score them with eval_xtreme.py score")
    mean, std = mean_std(list(seeds.values()))
    curve = ic_curve(loads_per_seed)
    ic = curve[-1][1] if curve else None
    dev = mean_std(list(dev_per_seed.values())) if dev_per_seed and all(dev_per_seed.values()) else None
    results = {"task": args.task, "name": args.name, "init": str(args.init), "pretraining": pretraining,
               "config": config, "args": vars(args), "seeds": seeds, "mean": mean, "std": std, "ic": ic,
               "ic_curve": curve, "split": split,
               "dev": None if dev is None else {"seeds": dev_per_seed, "mean": dev[0], "std": dev[1]}}
    write_json(out / "results.json", results)
    for seed, scores in seeds.items():
        print(f"seed {seed}, {split} split (x100): " + format_scores({args.task: scores}))
    print("mean ± std over the seeds: " + ", ".join(f"{k} {mean[k]:.2f} ± {std[k]:.2f}" for k in mean))
    if split == "dev":
        print("(the test files carry no labels, as XTREME's download leaves them: scores above are on dev)")
    print(f"inter-run consistency (IC, last window of {args.ic_every} steps): "
          + (f"{ic:.3f}" if ic is not None else "- (needs 2 or more seeds and sparse layers)"))
    print(f"done in {wall / 60:.1f} min; results {out / 'results.json'}, predictions {out / 'predictions'}")


def mean_std(per_seed):
    """Mean and std over the seeds of every avg_ key; sample std (ddof 1) for two seeds or more, 0 for one."""
    values = {k: np.array([s[k] for s in per_seed], dtype=np.float64) for k in per_seed[0] if k.startswith("avg_")}
    return ({k: float(v.mean()) for k, v in values.items()},
            {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()})


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


# ------------------------------------------------------------------------------------------------
# Training one seed: AdamW on the trainable parameters, linear warmup and decay, Eq. 9, dev selection every epoch

def train_seed(seed, encoder, train, dev, tok, args, rt):
    """Fine-tune a copy of the pre-trained encoder -> (best model, history, expert-load windows). Every
    rank runs this; rank 0 alone scores the English dev set and decides which epoch is kept (under
    expert parallelism every rank takes part in the dev forward passes and learns the decision)."""
    kind, labels = TASKS[args.task]["kind"], TASKS[args.task]["labels"]
    torch.manual_seed(seed)  # the head's initialisation: the same on every rank
    raw = TaskModel(copy.deepcopy(encoder), kind, 2 if kind == "qa" else len(labels), encoder.cfg.dropout,
                    args.balance_coef)
    n_frozen = freeze_moe(raw) if args.freeze_moe else 0
    print0(f"seed {seed}: {sum(p.numel() for p in raw.parameters() if p.requires_grad):,} trainable parameters, "
           f"{n_frozen:,} frozen ({'frozen routing' if args.freeze_moe else 'sparse layers trained: --no-freeze-moe'})")
    model = distribute(raw.to(rt.device), rt, args.expert_parallel)
    optimizer = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=args.lr, betas=XTREME_BETAS, eps=XTREME_EPS)
    G, per_epoch = args.batch_size, math.ceil(len(train) / args.batch_size)
    total = min(per_epoch * args.epochs, args.max_steps or math.inf)  # optimizer steps
    window = torch.zeros(len(moe_layers(raw)), encoder.cfg.n_experts, dtype=torch.long)  # tokens per expert
    history, loads, best_state, best_score, step = [], [], None, -math.inf, 0
    torch.manual_seed(seed * 1000 + rt.rank)  # dropout: its own stream on each rank
    for epoch in range(1, args.epochs + 1):
        order = np.random.default_rng([seed, epoch]).permutation(len(train))  # the same on every rank
        for b in tqdm(range(min(per_epoch, total - step)), desc=f"seed {seed} epoch {epoch}/{args.epochs}",
                      disable=not rt.master, dynamic_ncols=True, leave=False):
            lr = lr_at(step, args.lr, round(args.warmup * total), total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                loss = train_step(model, optimizer, [train[i] for i in order[b * G:(b + 1) * G]], window, tok, args, rt)
            except Diverged as e:
                raise Diverged(f"the fine-tuning {e}; try a lower --lr (now {args.lr}) (seed {seed}, step {step + 1}, "
                               "before its update)") from None
            step += 1
            history.append({"step": step, "loss": loss, "lr": lr})
            if len(window) and (step % args.ic_every == 0 or step == total):
                counts = window.to(rt.device)  # NCCL reduces tensors on the GPU only
                if rt.ddp:
                    dist.all_reduce(counts)  # every rank routed its own share of the batches
                loads.append({"step": step, "loads": counts.tolist()})
                window.zero_()
        better = False
        if dev is not None:
            with together(rt, DataError):  # rank 0 scores and decides: a failure there stops every rank
                if takes_part(rt, args.expert_parallel):
                    predictions = predict(raw, args.task, dev.examples, dev.feats, tok, args, rt.device)
                if rt.master:
                    scores = score_task(args.task, "en", gold_of(args.task, dev.examples), predictions)
                    history.append({"epoch": epoch, "step": step, "dev_en": scores})
                    print0(f"seed {seed} epoch {epoch}: step {step}/{total}, English dev "
                           + ", ".join(f"{m} {scores[m]:.2f}" for m in METRICS[kind]))
                    score = summarize(args.task, {"en": scores})["avg_metric"]  # F1, accuracy or (EM + F1) / 2
                    better, best_score = score > best_score, max(best_score, score)
            if args.expert_parallel:  # every rank keeps its own experts of the epoch rank 0 chose
                flag = torch.tensor([int(better)], device=rt.device)
                dist.broadcast(flag, 0)
                better = bool(flag.item())
            if better:
                best_state = {k: v.detach().clone() for k, v in raw.state_dict().items()}
        if step >= total:
            break
    if best_state is not None:
        raw.load_state_dict(best_state)
    return raw, history, loads


def train_step(model, optimizer, feats, window, tok, args, rt):
    """One optimizer step on a global batch, in world x --grad-accum micro-batches: micro-batch j of rank r
    takes rows m, m + M, ... (m = j * world + r, M = world * grad_accum), its loss (Eq. 9) weighted by its
    share of the batch's targets (runtime.accumulate), so that 1 process with --grad-accum K and K processes
    make the same step. Adds the tokens each expert took to `window`. -> the global batch's mean task loss."""
    kind, A, raw = TASKS[args.task]["kind"], args.grad_accum, model.module if rt.ddp else model
    rows = [feats[j * rt.world + rt.rank::rt.world * A] for j in range(A)]  # this rank's micro-batches
    # a micro-batch short of rows (the last batch) still runs forward and backward, on one row with
    # weight 0: DDP's all-reduce needs every rank
    batches = [collate(r or feats[:1], tok, rt.device) for r in rows]
    micro = [(dict(ids=b["ids"], pad_mask=b["pad"], targets=b), n_targets(kind, r)) for b, r in zip(batches, rows)]
    task_sum = torch.zeros(1, dtype=torch.float64, device=rt.device)
    with counting_experts(raw) as counts:
        for j, (out, n) in enumerate(accumulate(model, micro, n_targets(kind, feats), rt, args.float64)):
            if rows[j]:  # tokens per expert (padding is not routed)
                window += counts
            counts.zero_()
            task_sum += out.task_loss.item() * n
    step_optimizer(optimizer, [(n, p) for n, p in raw.named_parameters() if p.requires_grad], CLIP, rt,
                   args.expert_parallel)
    if rt.ddp:
        dist.all_reduce(task_sum)  # the global batch's task loss, for the log
    return task_sum.item() / max(n_targets(kind, feats), 1)


# ------------------------------------------------------------------------------------------------
# The model: the pre-trained encoder and a linear head (with dropout) on its hidden states

class TaskOutput(NamedTuple):
    loss: torch.Tensor  # task_loss + balance_coef * balance_loss (Eq. 9), None without targets
    task_loss: torch.Tensor  # the mean over the targets (0 when there are none)
    balance_loss: torch.Tensor  # unweighted sum over the sparse layers
    logits: torch.Tensor  # (B, L, n_out), or (B, n_out) for pairs


class TaskModel(nn.Module):
    """Tagging: a label per position; pairs: labels from the first token; QA: start and end logits per position."""

    def __init__(self, encoder, kind, n_out, dropout, balance_coef):
        super().__init__()
        self.encoder, self.kind, self.balance_coef = encoder, kind, balance_coef
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.cfg.d_model, n_out)
        nn.init.normal_(self.head.weight, std=0.02)  # as the pre-trained weights (BERT-style)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, pad_mask, targets=None):
        enc = self.encoder(ids, pad_mask)
        logits = self.head(self.drop(enc.hidden))  # (B, L, n_out)
        logits = logits[:, 0] if self.kind == "pair" else logits  # pairs: from <s>, (B, n_out)
        if targets is None:
            return TaskOutput(None, None, enc.balance_loss, logits)
        n = (targets["labels"] != -100).sum() if self.kind == "tag" else torch.tensor(len(ids))
        task = task_loss(self.kind, logits, targets) / n.clamp(min=1)
        return TaskOutput(task + self.balance_coef * enc.balance_loss, task, enc.balance_loss, logits)  # Eq. 9


def n_targets(kind, feats):
    """What task_loss sums over: labelled tokens (tag), examples (pair) or windows (QA)."""
    return sum(t != -100 for f in feats for t in f["labels"]) if kind == "tag" else len(feats)


def task_loss(kind, logits, batch):
    """Summed over the targets (n_targets); QA: (start CE + end CE) / 2 per window, as transformers' QA head."""
    logits, ce = upcast(logits), lambda x, y: F.cross_entropy(x, y, ignore_index=-100, reduction="sum")
    if kind == "tag":
        return ce(logits.flatten(0, 1), batch["labels"].flatten())
    if kind == "pair":
        return ce(logits, batch["label"])
    start, end = logits.masked_fill(batch["pad"][..., None], -1e4).unbind(-1)  # (B, L) each
    return (ce(start, batch["start"]) + ce(end, batch["end"])) / 2


def collate(feats, tok, device):
    """Pad to the longest feature of the batch; targets as tensors."""
    L = max(len(f["ids"]) for f in feats)
    padded = lambda rows, fill: torch.tensor([row + [fill] * (L - len(row)) for row in rows], dtype=torch.long)
    ids = padded([f["ids"] for f in feats], tok.pad)
    batch = dict(ids=ids, pad=ids == tok.pad, labels=padded([f.get("labels", []) for f in feats], -100))
    batch.update({key: torch.tensor([f[key] for f in feats]) for key in ("label", "start", "end") if key in feats[0]})
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# Zero-shot evaluation: every test language (predictions; scores where labelled) and dev language (scores)

def zero_shot(trained, sets, seed, tok, args, rt):
    """Predict every test and dev language with a seed's model; rank 0 writes the prediction files, the
    expert loads and the seed's log. -> (test, dev) summaries (None for a split without labels)."""
    model, history, loads = trained
    out, scores, predictions = Path(args.out), {"test": {}, "dev": {}}, {}
    for (split, lang), (examples, feats) in sets.items():
        preds = predict(model, args.task, examples, feats, tok, args, rt.device)
        if split == "test":
            predictions[lang] = preds
        if gold_of(args.task, examples) is not None:
            scores[split][lang] = score_task(args.task, lang, gold_of(args.task, examples), preds)
    if rt.master:  # the files, once every forward pass is done
        for lang, preds in predictions.items():
            write_predictions(out / "predictions" / f"seed{seed}", args.task, lang, preds)
        write_json(out / f"seed{seed}" / "expert_loads.json", {"every": args.ic_every, "windows": loads})
        write_atomic(out / f"seed{seed}" / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    return tuple(summarize(args.task, scores[split]) if scores[split] else None for split in ("test", "dev"))


class EvalSet(NamedTuple):
    examples: list  # as load_split returns them
    feats: list  # featurize's


def load_eval_sets(args, tok):
    """{(split, lang): EvalSet}, once for all seeds: every language of the test split, English dev (for
    model selection), and the other dev languages when the test files carry no labels (to report instead)."""
    examples = {("test", lang): load_split(args.data, args.task, "test", lang)
                for lang in languages(args.data, args.task, "test")}
    if not examples:
        raise DataError(f"no {args.task} test files under {args.data} (expected e.g. "
                        f"{TASKS[args.task]['files']['test'][0]}); nothing to evaluate zero-shot")
    if "dev" in TASKS[args.task]["files"]:
        unlabelled = any(gold_of(args.task, ex) is None for ex in examples.values())
        examples.update({("dev", lang): load_split(args.data, args.task, "dev", lang)
                         for lang in languages(args.data, args.task, "dev") if lang == "en" or unlabelled})
    return {key: EvalSet(ex, featurize(args.task, ex, tok, args, train=False)) for key, ex in examples.items()}


# ------------------------------------------------------------------------------------------------
# Predictions: per-word tags, pair labels, and the QA span search over all windows

def best_span(windows, n_best, max_answer):
    """XT run_squad.py (transformers compute_predictions_logits) for one question. windows: dicts with start/end
    logits (1-D, over the window's tokens), offset, doc_start, length, max_ctx. In each window the n_best top
    start and end positions are paired; a pair counts if both lie in the context, the start has its max context
    in this window, end >= start and end - start < max_answer. The best start + end logit over all windows wins
    -> (score, first, last context token) or None. Byte windows rank only the positions can_start/can_end allow."""
    best = None
    for w in windows:
        sl, el = np.array(w["start_logits"], dtype=np.float64), np.array(w["end_logits"], dtype=np.float64)
        if w.get("can_start") is not None:
            o, n = w["offset"], w["length"]
            sl[o:o + n][~np.asarray(w["can_start"], dtype=bool)] = -np.inf
            el[o:o + n][~np.asarray(w["can_end"], dtype=bool)] = -np.inf
        starts = np.argsort(-sl, kind="stable")[:n_best]
        ends = np.argsort(-el, kind="stable")[:n_best]
        for i in starts:
            a = i - w["offset"]
            if not (0 <= a < w["length"] and w["max_ctx"][a]):
                continue
            for j in ends:
                b = j - w["offset"]
                if 0 <= b < w["length"] and a <= b < a + max_answer and sl[i] + el[j] > -np.inf:
                    score = float(sl[i] + el[j])
                    if best is None or score > best[0]:
                        best = (score, w["doc_start"] + a, w["doc_start"] + b)
    return best


def span_text(context, spans, first, last):
    """The original context text of tokens first..last (whitespace at either end removed)."""
    return context[spans[first][0]:max(spans[last][1], spans[first][0])].strip()


@torch.no_grad()
def predict(model, task, examples, feats, tok, args, device):
    """Official-format predictions: a tag list per sentence, a label per example, or {question id: answer text}."""
    kind, labels = TASKS[task]["kind"], TASKS[task]["labels"]
    model.eval()
    outputs = []
    for i in range(0, len(feats), EVAL_BATCH):
        chunk = feats[i:i + EVAL_BATCH]
        batch = collate(chunk, tok, device)
        with autocast_for(device, args.float64):
            logits = model(batch["ids"], batch["pad"]).logits
        logits = upcast(logits).cpu().numpy()
        outputs += [logits[k, :len(f["ids"])] if kind != "pair" else logits[k] for k, f in enumerate(chunk)]
    model.train()
    if kind == "pair":
        return [labels[int(o.argmax())] for o in outputs]
    if kind == "tag":
        tags = [[None] * len(ex["words"]) for ex in examples]
        for f, o in zip(feats, outputs):
            for pos, w in zip(f["first"], f["words"]):
                tags[f["ex"]][w] = labels[int(o[pos].argmax())]
        return tags
    by_example = [[] for _ in examples]
    for f, o in zip(feats, outputs):
        by_example[f["ex"]].append({**f, "start_logits": o[:, 0], "end_logits": o[:, 1]})
    answers = {}
    for ex, windows in zip(examples, by_example):
        best = best_span(windows, args.n_best, args.max_answer_length)
        spans = context_tokens(ex["context"], tok)[1]
        answers[ex["id"]] = "" if best is None else span_text(ex["context"], spans, best[1], best[2])
    return answers


def gold_of(task, examples):
    """What score_task compares with (tag lists, labels, or the QA examples themselves); None when the
    file carries no labels (a test file after XTREME's download) or is empty."""
    key = {"tag": "labels", "pair": "label", "qa": "answers"}[TASKS[task]["kind"]]
    if not examples or any(ex[key] is None for ex in examples):
        return None
    return examples if key == "answers" else [ex[key] for ex in examples]


# ------------------------------------------------------------------------------------------------
# Features. Tagging: <s> words </s>, the label on each word's first subword and -100 on the other
# subwords and the specials (XT utils_tag.py). Pairs: <s> a </s></s> b </s> (XLM-R's pair format).
# QA: <s> question </s></s> context window </s>, windows of the context every `doc_stride` tokens
# (XT run_squad.py). Each feature is a dict; "ex" is the index of its example.

def byte_level(tok):
    return isinstance(tok, ByteTokenizer)


def word_pieces(tok, words):
    """Subwords of each word, every word at least one (XTREME: a word with no subword becomes <unk>).
    SentencePiece marks a word start itself ("▁"); for bytes, each word but the last is followed by one
    space byte, so the words read as the pre-training text and a word's first subword is its own first byte."""
    space = tok.encode(" ") if byte_level(tok) else []
    return [(tok.encode(w) or [tok.unk]) + (space if i < len(words) - 1 else []) for i, w in enumerate(words)]


def tag_features(examples, tok, label_list, max_length):
    """Sentences longer than the window are cut between words into pieces that fit, as XTREME's
    preprocessing does (utils_preprocess.py, 128 subwords); predictions are put back together per word.
    Features: ids, labels (train targets: -100 off first subwords), first (positions), words (their indices)."""
    label_id = {l: i for i, l in enumerate(label_list)}
    budget, feats = max_length - 2, []
    for n, ex in enumerate(examples):
        pieces, gold = word_pieces(tok, ex["words"]), ex["labels"]
        cur = dict(ids=[], labels=[], first=[], words=[], ex=n)
        feats.append(cur)
        for w, piece in enumerate(pieces):
            piece = piece[:budget]  # one word longer than a window keeps its first subwords
            if cur["ids"] and len(cur["ids"]) + len(piece) > budget:
                cur = dict(ids=[], labels=[], first=[], words=[], ex=n)
                feats.append(cur)
            cur["first"].append(len(cur["ids"]) + 1)  # + 1 for <s>
            cur["words"].append(w)
            cur["labels"] += [label_id[gold[w]] if gold else -100] + [-100] * (len(piece) - 1)
            cur["ids"] += piece
    return [{**f, "ids": [tok.bos, *f["ids"], tok.eos], "labels": [-100, *f["labels"], -100]} for f in feats]


def pair_features(examples, tok, label_list, max_length):
    """Truncation 'longest_first' (transformers encode_plus, max_length 128 in XTREME): drop the last
    token of the longer text (of text_b on a tie) until the pair fits."""
    label_id, feats = {l: i for i, l in enumerate(label_list)}, []
    for n, ex in enumerate(examples):
        a, b = tok.encode(ex["text_a"]), tok.encode(ex["text_b"])
        while len(a) + len(b) > max_length - 4:
            (a if len(a) > len(b) else b).pop()
        feats.append(dict(ids=[tok.bos] + a + [tok.eos, tok.eos] + b + [tok.eos], ex=n,
                          label=label_id[ex["label"]] if ex["label"] is not None else -100))
    return feats


def context_tokens(context, tok):
    """The context split into words on whitespace (XT squad.py _is_whitespace), each word into its
    subwords -> (ids, spans): spans[t] = (first char, end char) of token t in the context. A byte
    token spans its character; a SentencePiece token spans its whole word (answers end on word
    boundaries, as XTREME's word-level token_to_orig_map); the space byte after a word spans nothing."""
    matches = list(re.finditer("[^ \t\r\n\u202f]+", context))
    words, starts = [m.group() for m in matches], [m.start() for m in matches]
    ids, spans = [], []
    for word, s, piece in zip(words, starts, word_pieces(tok, words)):
        if byte_level(tok) and word:
            chars = [s + k for k, ch in enumerate(word) for _ in ch.encode("utf-8")]  # the char of each byte
            spans += [(c, c + 1) for c in chars] + [(s + len(word), s + len(word))] * (len(piece) - len(chars))
        else:
            spans += [(s, s + len(word))] * len(piece)
        ids += piece
    return ids, spans


def word_bounds(spans):
    """Byte tokens: which may start a span (a word's first byte) and which may end one (its last byte),
    so that byte-level answers are whole words, as SentencePiece ones are (XTREME maps subwords to words)."""
    filled = [e > s for s, e in spans]
    can_start = [f and (t == 0 or not filled[t - 1]) for t, f in enumerate(filled)]
    can_end = [f and (t == len(spans) - 1 or not filled[t + 1]) for t, f in enumerate(filled)]
    return can_start, can_end


def window_starts(n, capacity, stride):
    """Where each window of the n context tokens begins: 0, stride, 2 stride, ... until one reaches the
    end (BERT's run_squad.py; never a gap, also when the stride exceeds the window)."""
    starts, s = [], 0
    while True:
        starts.append(s)
        if s + capacity >= n:
            return starts
        s += min(capacity, stride)


def max_context_windows(n, starts, capacity):
    """For each context token, the window where it has the most context: the largest
    min(left, right) + 0.01 * window length, the first window on a tie (XT squad.py _new_check_is_max_context)."""
    best = np.zeros(n, dtype=np.int64)
    for p in range(n):
        scores = [(min(p - s, s + min(capacity, n - s) - 1 - p) + 0.01 * min(capacity, n - s), -w)
                  for w, s in enumerate(starts) if s <= p < s + capacity]
        best[p] = -max(scores)[1]
    return best


def answer_tokens(ex, spans):
    """First and last context token of the first gold answer (XT squad.py uses answers[0] only), or
    None when the answer text is not where answer_start says (such examples are skipped, as XTREME)."""
    a = ex["answers"][0]
    start, end = a["answer_start"], a["answer_start"] + len(a["text"])
    if ex["context"][start:end] != a["text"] or not a["text"].strip():
        return None
    inside = [t for t, (s, e) in enumerate(spans) if s < end and e > start]  # tokens overlapping the answer
    return (inside[0], inside[-1]) if inside else None


def qa_features(examples, tok, max_length, stride, max_query, train):
    """Every window of every question. Training windows point at the answer, or at <s> (position 0) when
    the answer is not fully inside (XT squad.py). Features: ids, ex, offset (of the window in ids), doc_start,
    length, max_ctx (per window token: is this its max-context window), start, end; bytes: can_start, can_end."""
    feats, skipped = [], 0
    for n, ex in enumerate(examples):
        q = tok.encode(ex["question"])[:max_query]
        ctx, spans = context_tokens(ex["context"], tok)
        capacity, offset = max_length - len(q) - 4, len(q) + 3  # <s> q </s></s> window </s>
        answer = answer_tokens(ex, spans) if train else None
        if train and answer is None:
            skipped += 1
            continue
        starts = window_starts(len(ctx), capacity, stride)
        best = max_context_windows(len(ctx), starts, capacity)
        can_start, can_end = word_bounds(spans) if byte_level(tok) else (None, None)
        for w, s in enumerate(starts):
            length = min(capacity, len(ctx) - s)
            f = dict(ids=[tok.bos] + q + [tok.eos, tok.eos] + ctx[s:s + length] + [tok.eos], ex=n, offset=offset,
                     doc_start=s, length=length, max_ctx=(best[s:s + length] == w).tolist(), start=0, end=0)
            if byte_level(tok):
                f["can_start"], f["can_end"] = can_start[s:s + length], can_end[s:s + length]
            if answer and s <= answer[0] and answer[1] < s + length:
                f["start"], f["end"] = offset + answer[0] - s, offset + answer[1] - s
            feats.append(f)
    if skipped:
        print0(f"warning: {skipped} training question(s) skipped: the answer text is not at its answer_start")
    return feats


def featurize(task, examples, tok, args, train):
    spec = TASKS[task]
    if spec["kind"] == "tag":
        return tag_features(examples, tok, spec["labels"], args.max_length)
    if spec["kind"] == "pair":
        return pair_features(examples, tok, spec["labels"], args.max_length)
    return qa_features(examples, tok, args.max_length, args.doc_stride, args.max_query_length, train)


# ------------------------------------------------------------------------------------------------
# Command line. Defaults. `paper` is Table 8 (Appendix C), the middle of each grid (lr {1,2,3}e-5 -> 2e-5, {5..9}e-6
# -> 7e-6, {2,3,4}e-5 -> 3e-5; QA epochs {2,3,4} -> 3, TyDiQA {10,20,40} -> 20; PAWS-X {1,2}e-5 -> 2e-5).
# `scaled` is for models pre-trained for minutes on a CPU: a larger learning rate, few epochs over
# the synthetic world's 2000 examples (span prediction over bytes learns slowest: 6 at 1e-3).

RECIPE = ("batch_size", "lr", "warmup", "weight_decay", "epochs")  # warmup: a fraction of the steps
RECIPES = {  # task: (paper, scaled)
    "udpos": ((8, 2e-5, 0.1, 0.0, 10), (16, 1e-3, 0.1, 0.0, 4)),
    "panx": ((8, 7e-6, 0.1, 0.0, 10), (16, 1e-3, 0.1, 0.0, 4)),
    "xquad": ((32, 3e-5, 0.1, 0.0, 3), (32, 1e-3, 0.1, 0.0, 6)),
    "mlqa": ((32, 3e-5, 0.1, 0.0, 3), (32, 1e-3, 0.1, 0.0, 6)),
    "tydiqa": ((32, 3e-5, 0.1, 0.0, 20), (32, 5e-4, 0.1, 0.0, 4)),
    "xnli": ((32, 2e-5, 0.2, 0.01, 5), (32, 3e-4, 0.2, 0.01, 3)),
    "pawsx": ((32, 2e-5, 0.1, 0.0, 10), (32, 3e-4, 0.1, 0.0, 3)),
}
# XTREME's sequence lengths (XTREME.md section 5), capped by the checkpoint's max_len. They count
# SentencePiece subwords; a byte-level checkpoint counts bytes, about BYTES_PER_SUBWORD per subword, so
# its lengths are scaled by that (otherwise a Devanagari sentence pair, 3 bytes a letter, is cut in half)
XTREME_MAX_LENGTH = {"tag": 128, "pair": 128, "qa": 384}
DOC_STRIDE, MAX_QUERY, N_BEST, MAX_ANSWER = 128, 64, 20, 30  # XT run_squad.py / train_qa.sh
BYTES_PER_SUBWORD = 4
XTREME_BETAS, XTREME_EPS, CLIP = (0.9, 0.999), 1e-8, 1.0  # XTREME's run_*.py: AdamW defaults, max_grad_norm 1
EVAL_BATCH = 64


def get_parser():
    recipes = "; ".join(f"{t} paper {'/'.join(map(str, paper))}, scaled {'/'.join(map(str, scaled))}"
                        for t, (paper, scaled) in RECIPES.items())
    p = argparse.ArgumentParser(description="Fine-tune an X-MoE checkpoint on an XTREME task; zero-shot evaluation "
                                f"on every language. Recipes, batch/lr/warmup/weight decay/epochs: {recipes}")
    a = p.add_argument
    a("--task", required=True, choices=list(TASKS), help="the XTREME task")
    a("--data", required=True, metavar="DIR", help="XTREME's download/ folder (or the synthetic world's)")
    a("--init", required=True, metavar="CKPT", help="pre-training checkpoint written by train_mlm.py")
    a("--out", required=True, metavar="DIR", help="where results.json, predictions/ and seed<k>/ go")
    a("--seeds", type=int, nargs="+", default=[1], help="one fine-tuning run per seed (default 1; paper: 5)")
    a("--recipe", choices=["paper", "scaled"], help="paper = Table 8, scaled = for small CPU models "
      "(default: paper for the base preset, scaled for small and tiny)")
    a("--batch-size", type=int, help="examples (QA: windows) per optimizer step, over all processes")
    a("--lr", type=float, help="peak learning rate, linear warmup then linear decay to 0")
    a("--warmup", type=float, help="warmup as a fraction of the optimizer steps")
    a("--weight-decay", type=float, help="AdamW weight decay of the weight matrices")
    a("--epochs", type=int, help="passes over the training set")
    a("--grad-accum", type=int, default=1, help="micro-batches per process and step (default 1), for a batch "
      "that does not fit in memory at once")
    a("--balance-coef", type=float, default=1e-2, help="alpha of Eq. 9 during fine-tuning (default 1e-2, as in "
      "pre-training, Table 7; Table 5 grid: 0, 1e-3, 1e-2, 1e-1)")
    a("--freeze-moe", action=argparse.BooleanOptionalAction, default=True, help="frozen routing (section 3.3): every "
      "parameter of every sparse layer is fixed; --no-freeze-moe trains them (Table 3 ablation)")
    a("--max-steps", type=int, help="stop after this many optimizer steps (a cap for quick runs)")
    a("--max-train", type=int, metavar="N", help="use only the first N training examples (quick runs)")
    a("--max-length", type=int, help="tokens per sequence (default: min(XTREME's 128, or 384 for QA, the "
      f"checkpoint's max_len); XTREME's lengths count subwords: x{BYTES_PER_SUBWORD} for a byte-level checkpoint)")
    a("--doc-stride", type=int, help="QA: offset between windows (default: XTREME's 128, or max-length // 3 "
      "when the window is shorter than XTREME's 384)")
    a("--max-query-length", type=int, help="QA: question tokens kept (default min(64, max-length // 2))")
    a("--n-best", type=int, default=N_BEST, help=f"QA: start and end candidates per window (default {N_BEST})")
    a("--max-answer-length", type=int, help=f"QA: longest answer in tokens (default {MAX_ANSWER}, "
      f"x{BYTES_PER_SUBWORD} for bytes)")
    a("--ic-every", type=int, default=100, help="steps over which expert loads are accumulated (default 100)")
    add_runtime_flags(p)
    a("--name", help="the model's name in results.json (default: routing-gate of the checkpoint, or dense)")
    return p


def resolve_args(args, cfg, preset, byte):
    """Fill the recipe and length defaults from the checkpoint (its preset and max_len), its tokenizer
    (byte: lengths in bytes) and the task; check the ranges."""
    kind = TASKS[args.task]["kind"]
    args.recipe = args.recipe or ("paper" if preset == "base" else "scaled")
    for k, v in zip(RECIPE, RECIPES[args.task][args.recipe == "scaled"]):
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    scale = BYTES_PER_SUBWORD if byte else 1
    args.max_length = args.max_length or min(XTREME_MAX_LENGTH[kind] * scale, cfg.max_len)
    args.max_answer_length = args.max_answer_length or MAX_ANSWER * scale
    if kind == "qa":
        # XTREME's windows are 384 tokens with stride 128 and questions of at most 64 tokens. A shorter
        # window keeps the same proportions (stride a third of the window) so that the windows still
        # overlap and every token has a window where it sits near the middle (the max-context rule).
        full = args.max_length >= XTREME_MAX_LENGTH["qa"] * scale
        args.doc_stride = args.doc_stride or (DOC_STRIDE * scale if full else args.max_length // 3)
        args.max_query_length = args.max_query_length or min(MAX_QUERY * scale, args.max_length // 2)
    check_bounds([("max-length", args.max_length, 8, cfg.max_len, " (the checkpoint's max_len)"),
                  ("batch-size", args.batch_size, 1, None), ("epochs", args.epochs, 1, None),
                  ("ic-every", args.ic_every, 1, None), ("grad-accum", args.grad_accum, 1, None),
                  ("n-best", args.n_best, 1, None), ("max-answer-length", args.max_answer_length, 1, None),
                  ("max-steps", args.max_steps, 1, None), ("max-train", args.max_train, 1, None)]
                 + ([("doc-stride", args.doc_stride, 1, None),
                     ("max-query-length", args.max_query_length, 1, args.max_length - 5)] if kind == "qa" else []))
    if not (args.lr > 0 and 0 <= args.warmup <= 1 and args.weight_decay >= 0 and args.balance_coef >= 0):
        raise BadInput(f"--lr must be positive, --warmup in [0, 1], --weight-decay and --balance-coef "
                       f"non-negative; got {args.lr}, {args.warmup}, {args.weight_decay}, {args.balance_coef}")
    return args


if __name__ == "__main__":
    cli(main, bad_input=(DataError,))
