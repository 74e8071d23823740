"""
Fine-tuning a pre-trained X-MoE checkpoint on an XTREME task, with frozen routing (Chi et al. 2022,
section 3.3), several seeds, zero-shot evaluation on every language, and the inter-run consistency
of the routing through fine-tuning (section 4.5, Figure 3b).

    python train_mlm.py              # once, 4-7 min: out/ckpt.pt, and the synthetic world in data/synthetic
    python finetune.py --task udpos --data data/synthetic --init out/ckpt.pt --out runs/xmoe/udpos
                                     # CPU, ~1-2 min: train on English, test zero-shot on every language
    python finetune.py --task xquad --data data/synthetic --init out/ckpt.pt --out runs/xmoe/xquad --seeds 1 2
                                     # two seeds: mean ± std and the inter-run consistency (IC)
    python finetune.py --task xnli --data download --init base.pt --out runs/xmoe/xnli --seeds 1 2 3 4 5
                                     # one GPU, real XTREME (download/ of XT scripts/download_data.sh)
    torchrun --standalone --nproc_per_node=8 finetune.py --task mlqa --data download --init base.pt --out runs/xmoe/mlqa
                                     # 8 GPUs (or CPU processes with Gloo): each batch split over the ranks;
                                     # add --expert-parallel to shard the experts over them
    python eval_xtreme.py table runs/dense runs/smoe runs/xmoe        # the paper's Table 1

Tasks: udpos, panx (tagging: label on the first subword of each word), xnli, pawsx (sentence pairs,
classified from the first token), xquad, mlqa, tydiqa (extractive QA: start/end logits over sliding
windows). Train on English, select the epoch on the English dev set (tydiqa has none: the final model,
as XTREME), then predict every language of the test split (and score every dev language). Writes
  OUT/results.json                                  what `eval_xtreme.py table` reads (format below)
  OUT/predictions/seed<k>/<task>/test-<lang>.tsv    XTREME's official prediction files (.json for QA)
  OUT/seed<k>/log.jsonl, OUT/seed<k>/expert_loads.json   training loss per step, English dev scores per
                                                    epoch; tokens per expert per window

Defaults: the paper's Table 8 for the `base` model; a scaled recipe (larger learning rate, fewer
epochs) for the `small` and `tiny` presets, whose pre-training is a few hundred steps on the CPU.
Every value is a flag. Reading order: defaults -> command line -> checkpoint and tokenizer ->
features (tagging, pairs, QA windows) -> the model -> predictions (QA span search) -> training one
seed -> zero-shot evaluation -> results over seeds (mean, std, IC) -> main.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from eval_xtreme import (METRICS, TASKS, DataError, languages, load_split, score_task, summarize,
                         write_predictions)
from train_mlm import (BadInput, ByteTokenizer, Parser, SentencePieceTokenizer, autocast_for, clip_grad_norm,
                       is_expert_param, load_checkpoint, lr_at, param_groups, setup_distributed, teardown_distributed)
from xmoe import PRESETS, MaskedLM, MoELayer, XMoEConfig, expert_load, freeze_moe, inter_run_consistency, upcast

# ------------------------------------------------------------------------------------------------
# Defaults. `paper` is Table 8 (Appendix C); where Table 8 gives a grid we take one value, the middle
# (lr {1,2,3}e-5 -> 2e-5, {5..9}e-6 -> 7e-6, {2,3,4}e-5 -> 3e-5; QA epochs {2,3,4} -> 3, TyDiQA
# {10,20,40} -> 20; PAWS-X lr {1,2}e-5 has no middle: 2e-5). `scaled` is for the `small`/`tiny`
# models pre-trained for minutes on a CPU: they need a larger learning rate, and the synthetic
# world's 2000 training examples need few epochs; it keeps each task within a few CPU minutes. Span
# prediction over bytes learns slowest: 6 epochs at 1e-3 (English dev F1 30 where 2 epochs at 5e-4
# gave 13, on the default 500-step checkpoint).

PAPER = {  # batch, peak lr, warmup (fraction of the steps), weight decay, epochs
    "udpos": dict(batch_size=8, lr=2e-5, warmup=0.1, weight_decay=0.0, epochs=10),
    "panx": dict(batch_size=8, lr=7e-6, warmup=0.1, weight_decay=0.0, epochs=10),
    "xquad": dict(batch_size=32, lr=3e-5, warmup=0.1, weight_decay=0.0, epochs=3),
    "mlqa": dict(batch_size=32, lr=3e-5, warmup=0.1, weight_decay=0.0, epochs=3),
    "tydiqa": dict(batch_size=32, lr=3e-5, warmup=0.1, weight_decay=0.0, epochs=20),
    "xnli": dict(batch_size=32, lr=2e-5, warmup=0.2, weight_decay=0.01, epochs=5),
    "pawsx": dict(batch_size=32, lr=2e-5, warmup=0.1, weight_decay=0.0, epochs=10),
}
SCALED = {
    "udpos": dict(batch_size=16, lr=1e-3, warmup=0.1, weight_decay=0.0, epochs=4),
    "panx": dict(batch_size=16, lr=1e-3, warmup=0.1, weight_decay=0.0, epochs=4),
    "xquad": dict(batch_size=32, lr=1e-3, warmup=0.1, weight_decay=0.0, epochs=6),
    "mlqa": dict(batch_size=32, lr=1e-3, warmup=0.1, weight_decay=0.0, epochs=6),
    "tydiqa": dict(batch_size=32, lr=5e-4, warmup=0.1, weight_decay=0.0, epochs=4),
    "xnli": dict(batch_size=32, lr=3e-4, warmup=0.2, weight_decay=0.01, epochs=3),
    "pawsx": dict(batch_size=32, lr=3e-4, warmup=0.1, weight_decay=0.0, epochs=3),
}
RECIPES = {"base": PAPER, "small": SCALED, "tiny": SCALED}
# XTREME's sequence lengths (XTREME.md section 5), capped by the checkpoint's max_len. They count
# SentencePiece subwords; a byte-level checkpoint counts bytes, about BYTES_PER_SUBWORD per subword, so
# its lengths are scaled by that (otherwise a Devanagari sentence pair, 3 bytes a letter, is cut in half)
XTREME_MAX_LENGTH = {"tag": 128, "pair": 128, "qa": 384}
DOC_STRIDE, MAX_QUERY, N_BEST, MAX_ANSWER = 128, 64, 20, 30  # XT run_squad.py / train_qa.sh
BYTES_PER_SUBWORD = 4
ADAM_BETAS, ADAM_EPS, CLIP = (0.9, 0.999), 1e-8, 1.0  # XTREME's run_*.py: AdamW defaults, max_grad_norm 1
EVAL_BATCH = 64


# ------------------------------------------------------------------------------------------------
# Command line (Parser, BadInput and the distributed setup are train_mlm.py's)


def build_parser():
    p = Parser(description="Fine-tune an X-MoE checkpoint on an XTREME task; zero-shot evaluation on every "
               "language. Recipe defaults (by the checkpoint's preset): " + "; ".join(
                   f"{t}: paper " + "/".join(str(v) for v in PAPER[t].values()) + ", scaled "
                   + "/".join(str(v) for v in SCALED[t].values()) for t in PAPER)
               + " (batch/lr/warmup/weight decay/epochs)")
    a = p.add_argument
    a("--task", required=True, choices=list(TASKS), help="the XTREME task")
    a("--data", required=True, metavar="DIR", help="XTREME's download/ folder (or make-synthetic's)")
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
    a("--balance-coef", type=float, default=1e-2, help="alpha of Eq. 9 during fine-tuning (default 1e-2, the "
      "pre-training value; Table 5 grid: 0, 1e-3, 1e-2, 1e-1)")
    a("--freeze-moe", action=argparse.BooleanOptionalAction, default=True,
      help="frozen routing (section 3.3): every parameter of every sparse layer is fixed; --no-freeze-moe "
      "trains them (Table 3 ablation)")
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
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda or mps")
    a("--expert-parallel", action="store_true", help="under torchrun: shard the experts over the processes "
      "(all_to_all); every process then evaluates too")
    a("--float64", action="store_true", help="compute in float64, without autocast (slow; for checking that "
      "two arrangements of one computation, such as 1 and K processes, agree to rounding)")
    a("--name", help="the model's name in results.json (default: routing-gate of the checkpoint, or dense)")
    return p


def resolve_args(args, cfg, preset, kind, byte=False):
    """Fill the recipe and length defaults from the checkpoint, its tokenizer (byte: lengths in bytes)
    and the task; check the ranges."""
    args.recipe = args.recipe or ("paper" if preset == "base" else "scaled")
    for k, v in (PAPER if args.recipe == "paper" else SCALED)[args.task].items():
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
    checks = [("max-length", args.max_length, 8, cfg.max_len), ("batch-size", args.batch_size, 1, None),
              ("epochs", args.epochs, 1, None), ("ic-every", args.ic_every, 1, None),
              ("n-best", args.n_best, 1, None), ("max-answer-length", args.max_answer_length, 1, None),
              ("max-steps", args.max_steps, 1, None), ("max-train", args.max_train, 1, None)]
    if kind == "qa":
        checks += [("doc-stride", args.doc_stride, 1, None),
                   ("max-query-length", args.max_query_length, 1, args.max_length - 5)]
    for flag, v, low, high in checks:
        if v is not None and (v < low or (high is not None and v > high)):
            where = f"between {low} and {high}" if high is not None else f"at least {low}"
            why = " (the checkpoint's max_len)" if flag == "max-length" else ""
            raise BadInput(f"--{flag} must be {where}{why}, got {v}")
    if not (args.lr > 0 and 0 <= args.warmup <= 1 and args.weight_decay >= 0 and args.balance_coef >= 0):
        raise BadInput(f"--lr must be positive, --warmup in [0, 1], --weight-decay and --balance-coef "
                       f"non-negative; got {args.lr}, {args.warmup}, {args.weight_decay}, {args.balance_coef}")
    return args


# ------------------------------------------------------------------------------------------------
# The checkpoint and its tokenizer


def load_init(path):
    """-> (checkpoint dict, XMoEConfig). Every way a checkpoint can be wrong is a BadInput naming it."""
    ckpt = load_checkpoint(path, "--init", required=("model", "config"))
    try:
        cfg = XMoEConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise BadInput(f"--init {path}: its config is invalid ({e})") from None
    return ckpt, cfg


def build_mlm(ckpt, cfg, path):
    """The pre-trained MaskedLM with every weight of the checkpoint; a state dict of another config
    (other sizes, another routing, missing experts) is a BadInput, not a torch traceback."""
    model = MaskedLM(cfg)
    missing, unexpected = model.state_dict().keys() - ckpt["model"].keys(), ckpt["model"].keys() - model.state_dict().keys()
    shapes = [k for k, v in model.state_dict().items() if k in ckpt["model"] and ckpt["model"][k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(s)} {what} (e.g. {sorted(s)[0]})" for s, what in
                 ((missing, "weights missing"), (unexpected, "unexpected weights"), (shapes, "of another shape")) if s]
        raise BadInput(f"--init {path}: its weights do not match its config ({'; '.join(parts)}); the checkpoint "
                       "was written for another model, or edited")
    model.load_state_dict(ckpt["model"])
    return model


def preset_of(ckpt, cfg):
    """The preset the checkpoint was trained as: its own record, else the preset of the same shape."""
    saved = (ckpt.get("args") or {}).get("preset")
    if saved in PRESETS:
        return saved
    shape = lambda c: (c.d_model, c.n_layers, c.n_heads, c.d_ffn)
    return next((n for n, p in PRESETS.items() if shape(p) == shape(cfg)), "base" if cfg.d_model >= 768 else "small")


class Tokenizer:
    """What fine-tuning needs from the pre-training tokenizer (train_mlm.py's): text -> ids, and words
    -> their subwords, every word at least one (XTREME: a word with no subword becomes <unk>)."""

    def __init__(self, ckpt):
        spec = ckpt.get("tokenizer")
        if not spec:  # checkpoints without the record: train_mlm.py's --spm flag, else bytes
            spm = (ckpt.get("args") or {}).get("spm")
            spec = {"kind": "spm", "path": spm} if spm else {"kind": "byte"}
        self.byte = spec.get("kind") == "byte"
        self.base = ByteTokenizer() if self.byte else SentencePieceTokenizer(spec["path"])
        self.pad, self.bos, self.eos = self.base.pad, self.base.bos, self.base.eos
        # bytes have no <unk> (only an empty word has no byte): <mask>, "a token we do not see", stands in
        self.unk = getattr(self.base, "unk", self.base.mask)
        self.vocab_size = self.base.vocab_size

    def encode(self, text):
        return self.base.encode_lines([text.encode("utf-8")])[0].tolist()

    def word_pieces(self, words):
        """Subwords of each word. SentencePiece marks a word start itself ("▁"); for bytes, each word
        but the last is followed by one space byte, so the words read as the text the model was
        pre-trained on and a word's first subword is its own first byte."""
        if not self.byte:
            return [self.encode(w) or [self.unk] for w in words]
        space = self.encode(" ")
        return [(self.encode(w) or [self.unk]) + (space if i < len(words) - 1 else []) for i, w in enumerate(words)]


# ------------------------------------------------------------------------------------------------
# Features. Tagging: <s> words </s>, the label on each word's first subword and -100 on the other
# subwords and the specials (XT utils_tag.py). Pairs: <s> a </s></s> b </s> (XLM-R's pair format).
# QA: <s> question </s></s> context window </s>, windows of the context every `doc_stride` tokens
# (XT run_squad.py). Each feature is a dict; "ex" is the index of its example.


def tag_features(examples, tok, label_list, max_length):
    """Sentences longer than the window are cut between words into pieces that fit, as XTREME's
    preprocessing does (utils_preprocess.py, 128 subwords); predictions are put back together per word.
    Features: ids, labels (train targets: -100 off first subwords), first (positions), words (their indices)."""
    label_id = {l: i for i, l in enumerate(label_list)}
    budget, feats = max_length - 2, []
    for n, ex in enumerate(examples):
        pieces, gold = tok.word_pieces(ex["words"]), ex["labels"]
        cur = dict(ids=[], labels=[], first=[], words=[], ex=n)
        for w, piece in enumerate(pieces):
            piece = piece[:budget]  # one word longer than a window keeps its first subwords
            if cur["ids"] and len(cur["ids"]) + len(piece) > budget:
                feats.append(_close_tag_feature(cur, tok))
                cur = dict(ids=[], labels=[], first=[], words=[], ex=n)
            cur["first"].append(len(cur["ids"]) + 1)  # + 1 for <s>
            cur["words"].append(w)
            cur["labels"] += [label_id[gold[w]] if gold else -100] + [-100] * (len(piece) - 1)
            cur["ids"] += piece
        feats.append(_close_tag_feature(cur, tok))
    return feats


def _close_tag_feature(f, tok):
    return {**f, "ids": [tok.bos] + f["ids"] + [tok.eos], "labels": [-100] + f["labels"] + [-100]}


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
    words, starts, i = [], [], 0
    for j, ch in enumerate(context + " "):
        if ch in " \t\r\n\u202f":
            if j > i:
                words.append(context[i:j])
                starts.append(i)
            i = j + 1
    ids, spans = [], []
    for w, (word, s, piece) in enumerate(zip(words, starts, tok.word_pieces(words))):
        if tok.byte and word:
            chars = [s + k for k, ch in enumerate(word) for _ in ch.encode("utf-8")]  # the char of each byte
            spans += [(c, c + 1) for c in chars] + [(s + len(word), s + len(word))] * (len(piece) - len(chars))
        else:
            spans += [(s, s + len(word))] * len(piece)
        ids += piece
    return ids, spans


def word_bounds(spans):
    """Byte tokens: which may start a span (a word's first byte) and which may end one (its last byte),
    so that byte-level answers are whole words, as SentencePiece ones are (XTREME maps subwords to
    whole words). The space byte after a word has an empty span."""
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
    the answer is not fully inside (XT squad.py). Features: ids, ex, offset (of the window in ids),
    doc_start, length, max_ctx (per window token: is this its max-context window), start, end; for
    bytes also can_start, can_end (word_bounds)."""
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
        can_start, can_end = word_bounds(spans) if tok.byte else (None, None)
        for w, s in enumerate(starts):
            length = min(capacity, len(ctx) - s)
            f = dict(ids=[tok.bos] + q + [tok.eos, tok.eos] + ctx[s:s + length] + [tok.eos], ex=n, offset=offset,
                     doc_start=s, length=length, max_ctx=(best[s:s + length] == w).tolist(), start=0, end=0)
            if tok.byte:
                f["can_start"], f["can_end"] = can_start[s:s + length], can_end[s:s + length]
            if answer and s <= answer[0] and answer[1] < s + length:
                f["start"], f["end"] = offset + answer[0] - s, offset + answer[1] - s
            feats.append(f)
    return feats, skipped


def featurize(task, examples, tok, args, train):
    spec = TASKS[task]
    if spec["kind"] == "tag":
        return tag_features(examples, tok, spec["labels"], args.max_length)
    if spec["kind"] == "pair":
        return pair_features(examples, tok, spec["labels"], args.max_length)
    feats, skipped = qa_features(examples, tok, args.max_length, args.doc_stride, args.max_query_length, train)
    if skipped:
        print(f"warning: {skipped} training question(s) skipped: the answer text is not at its answer_start",
              file=sys.stderr)
    return feats


# ------------------------------------------------------------------------------------------------
# The model: the pre-trained encoder and a linear head (with dropout) on its hidden states


class TaskModel(nn.Module):
    """Tagging: a label per position; pairs: labels from the first token (<s>); QA: start and end
    logits per position. forward -> (logits, EncoderOutput)."""

    def __init__(self, encoder, kind, n_out, dropout):
        super().__init__()
        self.encoder, self.kind = encoder, kind
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.cfg.d_model, n_out)
        nn.init.normal_(self.head.weight, std=0.02)  # as the pre-trained weights (BERT-style)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, pad_mask):
        enc = self.encoder(ids, pad_mask)
        logits = self.head(self.drop(enc.hidden))  # (B, L, n_out)
        return (logits[:, 0] if self.kind == "pair" else logits), enc


def task_loss(kind, logits, batch):
    """Summed over the targets (tag: labelled tokens; pair: examples; QA: (start CE + end CE) / 2 per
    window, as transformers' QA head); the caller divides by the global batch's count."""
    if kind == "tag":
        return F.cross_entropy(upcast(logits).flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    if kind == "pair":
        return F.cross_entropy(upcast(logits), batch["label"], reduction="sum")
    start, end = upcast(logits).unbind(-1)  # (B, L) each
    start, end = start.masked_fill(batch["pad"], -1e4), end.masked_fill(batch["pad"], -1e4)
    return (F.cross_entropy(start, batch["start"], reduction="sum") + F.cross_entropy(end, batch["end"], reduction="sum")) / 2


def collate(feats, tok, device):
    """Pad to the longest feature of the batch; targets as tensors."""
    L = max(len(f["ids"]) for f in feats)
    ids = torch.full((len(feats), L), tok.pad, dtype=torch.long)
    labels = torch.full((len(feats), L), -100, dtype=torch.long)
    for i, f in enumerate(feats):
        ids[i, :len(f["ids"])] = torch.tensor(f["ids"])
        if "labels" in f:
            labels[i, :len(f["labels"])] = torch.tensor(f["labels"])
    batch = dict(ids=ids, pad=ids == tok.pad, labels=labels)
    for key in ("label", "start", "end"):
        if key in feats[0]:
            batch[key] = torch.tensor([f[key] for f in feats])
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# Predictions: per-word tags, pair labels, and the QA span search over all windows


def best_span(windows, n_best, max_answer):
    """XT run_squad.py (transformers compute_predictions_logits) for one question. windows: dicts with
    start/end logits (1-D, over the window's tokens), offset, doc_start, length, max_ctx. In each window
    the n_best top start and end positions are paired; a pair counts if both lie in the context, the
    start has its max context in this window, end >= start and end - start < max_answer. The best
    start + end logit over all windows wins -> (score, first, last context token) or None. Windows
    with can_start/can_end (byte checkpoints) rank only the positions those allow."""
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
    """Official-format predictions: tag -> a tag list per sentence; pair -> a label per example;
    qa -> {question id: answer text}."""
    kind, labels = TASKS[task]["kind"], TASKS[task]["labels"]
    model.eval()
    outputs = []
    for i in range(0, len(feats), EVAL_BATCH):
        chunk = feats[i:i + EVAL_BATCH]
        batch = collate(chunk, tok, device)
        with autocast_for(device, args.float64):
            logits, _ = model(batch["ids"], batch["pad"])
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
    """What score_task compares with: tag lists, labels, or the QA examples themselves."""
    kind = TASKS[task]["kind"]
    return [ex["labels"] for ex in examples] if kind == "tag" else \
        [ex["label"] for ex in examples] if kind == "pair" else examples


def headline(task, scores):
    """The number model selection maximises: F1 (tagging), accuracy (pairs), (EM + F1) / 2 (QA)."""
    kind = TASKS[task]["kind"]
    return scores["f1"] if kind == "tag" else scores["accuracy"] if kind == "pair" else \
        (scores["exact_match"] + scores["f1"]) / 2


# ------------------------------------------------------------------------------------------------
# Training one seed: AdamW on the trainable parameters, linear warmup and decay, loss = task loss +
# balance_coef * balance loss (Eq. 9), dev selection every epoch, expert loads every ic_every steps


def build_model(mlm_state, cfg, task, freeze, ep, dropout_seed):
    torch.manual_seed(dropout_seed)  # the head's initialisation: same on every rank
    mlm = MaskedLM(cfg)
    mlm.load_state_dict(mlm_state)
    spec = TASKS[task]
    n_out = 2 if spec["kind"] == "qa" else len(spec["labels"])
    model = TaskModel(mlm.encoder, spec["kind"], n_out, cfg.dropout)  # the MLM head is not needed
    n_frozen = freeze_moe(model) if freeze else 0
    if ep:  # keep this rank's n_experts / K experts; tokens travel to them (all_to_all)
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                layer.shard_experts()
    return model, n_frozen


def train_seed(seed, ctx):
    """Fine-tune one seed -> (best model, dev history, expert-load windows). Every rank runs this; rank 0
    alone scores the dev set and decides which epoch is kept (under expert parallelism every rank
    takes part in the dev forward passes and learns rank 0's decision)."""
    args, task, dist_info, device = ctx["args"], ctx["task"], ctx["dist"], ctx["device"]
    rank, master, ep = dist_info["rank"], dist_info["rank"] == 0, dist_info["ep"]
    kind, tok, train, cfg = TASKS[task]["kind"], ctx["tok"], ctx["train_feats"], ctx["cfg"]
    model, n_frozen = build_model(ctx["mlm_state"], cfg, task, args.freeze_moe, ep, seed)
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(master, f"seed {seed}: {trainable:,} trainable parameters, {n_frozen:,} frozen "
        f"({'frozen routing' if args.freeze_moe else 'sparse layers trained: --no-freeze-moe'})")
    raw = model
    if dist_info["ddp"]:
        if ep:  # expert weights differ per rank: DDP must neither broadcast nor average them
            DDP._set_params_and_buffers_to_ignore_for_model(
                raw, [n for n, _ in raw.named_parameters() if is_expert_param(n)])
        model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    G = args.batch_size
    per_epoch = math.ceil(len(train) / G)
    total = per_epoch * args.epochs if args.max_steps is None else min(per_epoch * args.epochs, args.max_steps)
    warmup = round(args.warmup * total)
    layers = [m for m in raw.modules() if isinstance(m, MoELayer)]
    loads, window = [], torch.zeros(len(layers), cfg.n_experts, dtype=torch.long)
    history, best_state, best_score = [], None, -math.inf
    torch.manual_seed(seed * 1000 + rank)  # dropout: its own stream on each rank
    step = 0
    for epoch in range(1, args.epochs + 1):
        order = np.random.default_rng([seed, epoch]).permutation(len(train))  # the same on every rank
        n_steps = min(per_epoch, total - step)
        bar = tqdm(total=n_steps, desc=f"seed {seed} epoch {epoch}/{args.epochs}", disable=not master,
                   dynamic_ncols=True, leave=False)
        for b in range(n_steps):
            rows = order[b * G:(b + 1) * G]
            lr = lr_at(step, args.lr, warmup, total)
            loss = train_step(model, optimizer, [train[i] for i in rows], kind, ctx, lr, window)
            step += 1
            history.append({"step": step, "loss": loss, "lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if layers and (step % args.ic_every == 0 or step == total):
                if dist_info["ddp"]:
                    dist.all_reduce(window)  # every rank routed its own share of the batches
                loads.append({"step": step, "loads": window.tolist()})
                window.zero_()
        bar.close()
        if ctx["dev"] is not None and (master or ep):
            examples, feats = ctx["dev"]
            predictions = predict(raw, task, examples, feats, tok, args, device)
            better = False
            if master:
                scores = score_task(task, "en", gold_of(task, examples), predictions)
                history.append({"epoch": epoch, "step": step, "dev_en": scores})
                say(master, f"seed {seed} epoch {epoch}: step {step}/{total}, English dev "
                    + ", ".join(f"{m} {scores[m]:.2f}" for m in METRICS[kind]))
                better, best_score = headline(task, scores) > best_score, max(best_score, headline(task, scores))
            if ep:  # every rank keeps its own experts of the epoch rank 0 chose
                flag = torch.tensor([int(better)], device=device)
                dist.broadcast(flag, 0)
                better = bool(flag.item())
            if better:
                best_state = {k: v.detach().clone() for k, v in raw.state_dict().items()}
        if step >= total:
            break
    if best_state is not None:
        raw.load_state_dict(best_state)
    return raw, history, loads


def train_step(model, optimizer, feats, kind, ctx, lr, window):
    """One optimizer step on a global batch. Rank r takes rows r, r + K, ... of it. The loss is the task
    loss summed over the global batch's targets and divided by their number (times K: DDP averages
    the ranks' gradients), plus balance_coef times this rank's balance loss (averaged by DDP): Eq. 9."""
    args, device, tok, d = ctx["args"], ctx["device"], ctx["tok"], ctx["dist"]
    count = (lambda f: sum(l != -100 for l in f["labels"])) if kind == "tag" else (lambda f: 1)
    total = max(1, sum(count(f) for f in feats))
    mine = feats[d["rank"]::d["world"]] or feats[:1]  # a rank short of rows computes one with weight 0
    weight = 1.0 if feats[d["rank"]::d["world"]] else 0.0
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = collate(mine, tok, device)
    with autocast_for(device, args.float64):
        logits, enc = model(batch["ids"], batch["pad"])
    task = task_loss(kind, logits, batch)
    loss = weight * (task * d["world"] / total + args.balance_coef * enc.balance_loss)  # Eq. 9
    if not math.isfinite(loss.item()):
        raise BadInput(f"the loss is {loss.item()} (not finite); try a lower --lr (now {args.lr})")
    loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if d["ep"]:  # as in train_mlm.py: an expert's gradient already sums all ranks' tokens; undo the K above
        for n, p in named:
            if is_expert_param(n):
                p.grad.div_(d["world"])
    clip_grad_norm(named, CLIP, d["ep"])  # one global norm, the experts' summed over the ranks
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if weight:
        for l, r in enumerate(enc.routing):  # tokens per expert (padding is -1 and not counted)
            window[l] += expert_load(r.experts.cpu(), window.shape[1])
    task_sum = torch.tensor([weight * task.item()], dtype=torch.float64, device=device)
    if d["ddp"]:
        dist.all_reduce(task_sum)  # the global batch's task loss, for the log
    return task_sum.item() / total


# ------------------------------------------------------------------------------------------------
# Zero-shot evaluation: every language of the test split (predictions; scores where labelled) and
# of the dev split (scores)


def evaluate_languages(model, ctx, split, pred_dir=None):
    """{lang: scores} for the labelled files of this split; writes the official prediction files
    (test split) under pred_dir."""
    args, task, tok, device = ctx["args"], ctx["task"], ctx["tok"], ctx["device"]
    scores = {}
    for lang in ctx["langs"][split]:
        examples, feats = ctx["eval_sets"][split, lang]
        predictions = predict(model, task, examples, feats, tok, args, device)
        if pred_dir is not None:
            write_predictions(pred_dir, task, lang, predictions)
        labelled = all(g is not None for g in gold_of(task, examples)) if TASKS[task]["kind"] != "qa" else \
            all(ex["answers"] is not None for ex in examples)
        if labelled and examples:
            scores[lang] = score_task(task, lang, gold_of(task, examples), predictions)
    return scores


def load_eval_sets(ctx):
    """The examples and features of every language of the test and dev splits (once, for all seeds)."""
    args, task, data = ctx["args"], ctx["task"], ctx["args"].data
    has_dev = "dev" in TASKS[task]["files"]
    ctx["langs"] = {"test": languages(data, task, "test"), "dev": languages(data, task, "dev") if has_dev else []}
    if not ctx["langs"]["test"]:
        raise DataError(f"no {task} test files under {data} (expected e.g. {TASKS[task]['files']['test'][0]}); "
                        "nothing to evaluate zero-shot")
    ctx["eval_sets"] = {}
    for split in ("test", "dev"):
        for lang in ctx["langs"][split]:
            examples = load_split(data, task, split, lang)
            ctx["eval_sets"][split, lang] = examples, featurize(task, examples, ctx["tok"], args, train=False)
    ctx["dev"] = ctx["eval_sets"].get(("dev", "en"))


# ------------------------------------------------------------------------------------------------
# Results over seeds: mean and sample std of every avg_ key, and the inter-run consistency


def mean_std(per_seed):
    """Mean and std over the seeds of every avg_ key; sample std (ddof 1) for two seeds or more, 0 for one."""
    keys = [k for k in per_seed[0] if k.startswith("avg_")]
    values = {k: np.array([s[k] for s in per_seed], dtype=np.float64) for k in keys}
    mean = {k: float(v.mean()) for k, v in values.items()}
    std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    return mean, std


def ic_curve(loads_per_seed):
    """IC (section 4.5) of the seeds' expert loads over the same window of steps, averaged over the
    sparse layers -> [[step, ic], ...]; a layer whose load is constant in some run has no correlation
    and is left out of the average (None if no layer remains)."""
    if len(loads_per_seed) < 2 or not all(loads_per_seed):
        return []
    curve = []
    for windows in zip(*loads_per_seed):
        loads = np.array([w["loads"] for w in windows], dtype=np.float64)  # (m seeds, layers, N)
        ics = [inter_run_consistency(loads[:, l]) for l in range(loads.shape[1])]
        ics = [x for x in ics if math.isfinite(x)]
        curve.append([windows[0]["step"], float(np.mean(ics)) if ics else None])
    return curve


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)  # never a half-written results.json


def score_table(task, seeds, per_seed, mean, std):
    """Rows = languages, columns = seeds and mean ± std of the task's main numbers."""
    metrics = ("f1", "exact_match") if TASKS[task]["kind"] == "qa" else (METRICS[TASKS[task]["kind"]][0],)
    langs = sorted({l for s in per_seed for l in s if not l.startswith("avg_")})
    lines = ["lang    " + "".join(f"{'seed ' + str(s):>15}" for s in seeds) + f"{'mean ± std':>26}"]
    for lang in langs + ["avg"]:
        cells = []
        for s in per_seed:
            vals = [s[f"avg_{m}"] if lang == "avg" else s.get(lang, {}).get(m, float("nan")) for m in metrics]
            cells.append(" / ".join(f"{v:.1f}" for v in vals))
        row = f"{lang:<8}" + "".join(f"{c:>15}" for c in cells)
        if lang == "avg":
            spread = " / ".join(f"{mean['avg_' + m]:.1f} ± {std['avg_' + m]:.1f}" for m in metrics)
            row += f"{spread:>26}"
        lines.append(row)
    return f"{task} ({' / '.join(metrics)}, x100):\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# main


def say(master, *a):
    if master:
        tqdm.write(" ".join(map(str, a)))


def run(argv=None):
    t0 = time.time()
    args = build_parser().parse_args(argv)
    ckpt, cfg = load_init(args.init)
    kind = TASKS[args.task]["kind"]
    build_mlm(ckpt, cfg, args.init)  # fail early on a checkpoint of another config
    tok = Tokenizer(ckpt)
    args = resolve_args(args, cfg, preset_of(ckpt, cfg), kind, byte=tok.byte)
    args.name = args.name or ("dense" if cfg.routing == "dense" else f"{cfg.routing}-{cfg.gate}")
    if tok.vocab_size > cfg.vocab_size:
        raise BadInput(f"--init {args.init}: its vocabulary ({cfg.vocab_size}) is smaller than its tokenizer's "
                       f"({tok.vocab_size}); the checkpoint does not belong to this tokenizer")
    ddp, rank, world, device = setup_distributed(args.device)
    torch.set_default_dtype(torch.float64 if args.float64 else torch.float32)
    dist_info = dict(ddp=ddp, rank=rank, world=world, ep=args.expert_parallel)
    master = rank == 0
    if args.expert_parallel and not ddp:
        raise BadInput("--expert-parallel shards the experts over processes: launch with torchrun --nproc_per_node=K")
    if args.expert_parallel and (cfg.routing == "dense" or cfg.n_experts % world):
        raise BadInput(f"--expert-parallel: the checkpoint's {cfg.n_experts} experts must be divisible by the {world} "
                       "processes" if cfg.routing != "dense" else "--expert-parallel needs a sparse checkpoint, not dense")
    ctx = dict(args=args, task=args.task, cfg=cfg, tok=tok, dist=dist_info, device=device, mlm_state=ckpt["model"])
    out = Path(args.out)

    # --- data: English training set, English dev for selection, every test and dev language ------
    train_examples = load_split(args.data, args.task, "train", "en")[:args.max_train]
    ctx["train_feats"] = featurize(args.task, train_examples, tok, args, train=True)
    if not ctx["train_feats"]:
        raise DataError(f"no usable {args.task} training examples under {args.data}")
    load_eval_sets(ctx)
    say(master, f"{args.task}: {len(train_examples)} English training examples ({len(ctx['train_feats'])} "
        f"features of at most {args.max_length} tokens), test languages {' '.join(ctx['langs']['test'])}; "
        f"model {args.name} from {args.init} ({cfg.n_layers} blocks, d {cfg.d_model}, "
        f"{cfg.n_experts if cfg.routing != 'dense' else 0} experts); recipe {args.recipe}: batch {args.batch_size}, "
        f"lr {args.lr}, warmup {args.warmup}, weight decay {args.weight_decay}, {args.epochs} epochs, "
        f"balance coef {args.balance_coef}; {dist_info['world']} process(es) on {device}")

    # --- one fine-tuning run per seed, then zero-shot evaluation --------------------------------
    per_seed, dev_per_seed, loads_per_seed = {}, {}, []
    for seed in args.seeds:
        model, history, loads = train_seed(seed, ctx)
        loads_per_seed.append(loads)
        if not (master or dist_info["ep"]):
            continue  # under expert parallelism every rank takes part in the forward passes
        test = evaluate_languages(model, ctx, "test", out / "predictions" / f"seed{seed}" if master else None)
        dev = evaluate_languages(model, ctx, "dev")
        if not master:
            continue
        per_seed[str(seed)] = summarize(args.task, test) if test else None
        dev_per_seed[str(seed)] = summarize(args.task, dev) if dev else None
        (out / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        (out / f"seed{seed}" / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        write_json(out / f"seed{seed}" / "expert_loads.json",
                   {"every": args.ic_every, "sparse_after": list(cfg.sparse_after), "n_experts": cfg.n_experts,
                    "windows": loads})
    if master:
        finish(ctx, per_seed, dev_per_seed, loads_per_seed, ckpt, time.time() - t0)
    teardown_distributed()


def finish(ctx, per_seed, dev_per_seed, loads_per_seed, ckpt, wall):
    """results.json (the format eval_xtreme.py `table` reads) and the printed summary."""
    args, task, out = ctx["args"], ctx["task"], Path(ctx["args"].out)
    split = "test" if all(per_seed.values()) else "dev"  # XTREME's download strips the test labels
    seeds = per_seed if split == "test" else dev_per_seed
    if not all(seeds.values()):
        raise DataError(f"neither the test nor the dev files of {task} under {args.data} carry labels: "
                        f"predictions are in {out / 'predictions'}, score them with eval_xtreme.py score")
    mean, std = mean_std(list(seeds.values()))
    curve = ic_curve(loads_per_seed)
    dev_mean = mean_std(list(dev_per_seed.values())) if all(dev_per_seed.values()) and dev_per_seed else None
    results = {"task": task, "name": args.name, "init": str(args.init), "config": ckpt["config"],
               "args": {k: v for k, v in vars(args).items()}, "seeds": seeds, "mean": mean, "std": std,
               "ic": curve[-1][1] if curve else None, "ic_curve": curve, "split": split,
               "dev": None if dev_mean is None else {"seeds": dev_per_seed, "mean": dev_mean[0], "std": dev_mean[1]}}
    write_json(out / "results.json", results)
    print(score_table(task, list(seeds), list(seeds.values()), mean, std))
    if split == "dev":
        print("(the test files carry no labels, as XTREME's download leaves them: scores above are on dev)")
    ic = results["ic"]
    print(f"inter-run consistency (IC, last window of {args.ic_every} steps): "
          + (f"{ic:.3f}" if ic is not None else "- (needs 2 or more seeds and sparse layers)"))
    print(f"done in {wall / 60:.1f} min; results {out / 'results.json'}, predictions {out / 'predictions'}")


def main(argv=None):
    try:
        run(argv)
    except (BadInput, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
