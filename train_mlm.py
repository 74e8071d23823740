"""
Masked-LM pre-training of X-MoE (Chi et al. 2022, section 4.1 and Appendix B).

    python train_mlm.py                          # CPU, ~4 min: `small` on the built-in synthetic corpus
    python train_mlm.py --routing smoe           # the SMoE baseline on the same corpus, for comparison
    python train_mlm.py --preset base --data corpus/ --spm sentencepiece.bpe.model --grad-accum 128
                                                 # one GPU, the paper's model (XLM-R vocabulary)
    torchrun --standalone --nproc_per_node=8 train_mlm.py --preset base --data corpus/ --spm sentencepiece.bpe.model
                                                 # 8 GPUs; add --expert-parallel to shard the experts
    python train_mlm.py --resume                 # continue out/ckpt.pt to --steps (flags default to the checkpoint's)

--data DIR holds one UTF-8 text file per language, DIR/<lang>.txt, one sentence or document a line.
Without it, the synthetic multilingual world is generated once into data/synthetic and its mlm/
folder is the corpus. The run writes <out>/ckpt.pt (at every evaluation and at the end) and
<out>/log.jsonl (a training row every step, an evaluation row every --eval-every steps).

Reproducibility: the sequences and masks of global batch `step` are a function of (seed, step) only,
and dropout is reseeded from (seed, step, rank, micro-batch). So the run does not depend on the
number of processes or accumulation steps (up to float rounding, with dropout off), and --resume
ends bit-identical to the uninterrupted run on the CPU.
"""

import argparse
import gc
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from eval_xtreme import make_synthetic
from xmoe import (PRESETS, MaskedLM, MoELayer, XMoEConfig, expert_load, full_state_dict, local_state_dict,
                  representation_collapse, routing_fluctuation, upcast)

# ------------------------------------------------------------------------------------------------
# Defaults. Training hyperparameters that depend on the model size live in this one table: `base`
# is the paper's Table 7 (125k steps, 10k warmup, 2048 sequences x 512 tokens = 1M tokens a batch,
# peak LR 5e-4); `small` is scaled down until the default run fits ~4 minutes on 2 CPU cores and
# still learns; `tiny` is for the tests.

TRAIN_DEFAULTS = {
    #          steps   warmup  batch_size grad_accum  lr    eval_every
    "base": dict(steps=125_000, warmup=10_000, batch_size=2048, grad_accum=16, lr=5e-4, eval_every=2000),
    "small": dict(steps=500, warmup=50, batch_size=16, grad_accum=1, lr=2e-3, eval_every=100),
    "tiny": dict(steps=60, warmup=6, batch_size=16, grad_accum=1, lr=2e-3, eval_every=20),
}
COMMON_DEFAULTS = dict(preset="small", data=None, spm=None, alpha=0.7, seed=0, out="out", resume=False,
                       clip=1.0, device="auto", expert_parallel=False, stop_after=None, float64=False)
RUNTIME_FLAGS = ("out", "resume", "device", "expert_parallel", "stop_after", "float64")
SYNTHETIC_DIR = Path("data/synthetic")  # the built-in corpus, generated on first use

ADAM_BETAS, ADAM_EPS, WEIGHT_DECAY = (0.9, 0.98), 1e-6, 0.01  # Table 7
MASK_PROB, MASK_TOKEN, MASK_RANDOM = 0.15, 0.8, 0.1  # BERT: 15% of tokens; 80% <mask>, 10% random, 10% kept
VAL_SEQS = 32  # held-out sequences per language (at most; 1 in 10 for small languages, at least 1)
RC_TOKENS = 4096  # validation tokens for RC (Eq. 10): a fixed subset, so evaluations compare


class BadInput(Exception):
    """A user error: printed as `error: ...` with exit code 2, no traceback."""


class Diverged(Exception):
    """A non-finite loss: stop with the step number, keep the last good checkpoint."""


# ------------------------------------------------------------------------------------------------
# Command line: every training flag, plus one flag per XMoEConfig field generated from the dataclass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors in our format: `error: ...`, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def _field_help():
    """The trailing comment of each XMoEConfig field in xmoe.py, so --help says what the model says."""
    try:
        src = inspect.getsource(XMoEConfig)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", src, flags=re.M))


def _config_flag(f):
    """argparse keyword arguments for an XMoEConfig field: its type, 'none' for Optional fields,
    --x/--no-x for booleans, comma-separated ints for tuples."""
    t, optional = f.type, False
    if typing.get_origin(t) is typing.Union:
        optional, t = True, next(a for a in typing.get_args(t) if a is not type(None))
    if t is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if t is tuple:
        def conv(s):
            return tuple(int(x) for x in s.split(",") if x.strip())
        conv.__name__ = "comma-separated int"
    else:
        def conv(s, base=t):
            return None if optional and s.lower() == "none" else base(s)
        conv.__name__ = t.__name__ + (" or none" if optional else "")
    return dict(type=conv, metavar=f.name.upper())


def build_parser():
    p = Parser(description="Masked-LM pre-training of X-MoE. Preset-dependent defaults: "
               + "; ".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in d.items()) for k, d in TRAIN_DEFAULTS.items()),
               argument_default=argparse.SUPPRESS)  # unset flags stay absent: we know what was given
    a = p.add_argument
    a("--preset", choices=list(PRESETS), help="model size: tiny (tests), small (default run), base (paper)")
    a("--data", metavar="DIR", help="folder of <lang>.txt files (default: the synthetic corpus in data/synthetic)")
    a("--spm", metavar="MODEL", help="SentencePiece model (e.g. XLM-R's); sets --vocab-size (default: UTF-8 bytes)")
    a("--steps", type=int, help="optimizer steps (by preset, see above)")
    a("--batch-size", type=int, help="sequences per optimizer step, over all processes (by preset)")
    a("--grad-accum", type=int, help="micro-batches per process and step (by preset)")
    a("--lr", type=float, help="peak learning rate after linear warmup, then linear decay to 0 (by preset)")
    a("--warmup", type=int, help="warmup steps (by preset)")
    a("--alpha", type=float, help="language sampling exponent, q_i ~ n_i^alpha (default 0.7)")
    a("--seed", type=int, help="seed of the initialisation, the batches, the masks and dropout (default 0)")
    a("--out", metavar="DIR", help="where ckpt.pt and log.jsonl go (default out)")
    a("--resume", action="store_true", help="continue <out>/ckpt.pt up to --steps; other flags default to its own")
    a("--eval-every", type=int, help="steps between evaluations and checkpoints (by preset)")
    a("--clip", type=float, help="gradient-norm clipping, 0 = off (default 1.0; not in the paper)")
    a("--device", help="auto (cuda if available), cpu, cuda or mps (default auto)")
    a("--expert-parallel", action="store_true", help="under torchrun: shard the experts over the processes")
    a("--float64", action="store_true", help="compute in float64, without autocast (slow; for checking that "
      "two arrangements of one computation, such as 1 and K processes, agree to rounding)")
    a("--stop-after", type=int, metavar="N", help="stop after N steps of this launch with a checkpoint, as if "
      "interrupted; --resume continues (for time-limited jobs)")
    helps = _field_help()
    for f in fields(XMoEConfig):
        a("--" + f.name.replace("_", "-"), dest=f.name, help=f"{helps.get(f.name, '')} (XMoEConfig.{f.name})",
          **_config_flag(f))
    return p


def config_error(e):
    """XMoEConfig's ValueError names the field; the user typed a flag, so name the flag."""
    return BadInput(re.sub(r"XMoEConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e)))


def resolve(given, ckpt):
    """Training args and model config from, in order of precedence: the flags given, the checkpoint
    (on --resume), the preset's row of TRAIN_DEFAULTS, COMMON_DEFAULTS."""
    names = {f.name for f in fields(XMoEConfig)}
    cfg_given = {k: v for k, v in given.items() if k in names}
    # how and where this launch runs is not inherited: a run may resume on another device or layout
    saved = {k: v for k, v in (ckpt["args"] if ckpt else {}).items() if k not in RUNTIME_FLAGS}
    preset = given.get("preset", saved.get("preset", COMMON_DEFAULTS["preset"]))
    args = {**COMMON_DEFAULTS, **TRAIN_DEFAULTS[preset], **saved,
            **{k: v for k, v in given.items() if k not in names}, "preset": preset}
    try:  # on resume, the checkpoint's config is the base unless another preset is asked for
        base = XMoEConfig.from_dict(ckpt["config"]) if ckpt and "preset" not in given else XMoEConfig.preset(preset)
        cfg = XMoEConfig.preset(preset, **{**base.to_dict(), **cfg_given})
    except ValueError as e:
        raise config_error(e) from None
    return argparse.Namespace(**args), cfg, cfg_given


def setup_distributed(device_flag):
    """-> (ddp, rank, world size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on
    CUDA, Gloo on the CPU. Without torchrun: one process. finetune.py uses it too."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, K = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    want = device_flag if device_flag != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device_flag}: CUDA is not available here; use --device cpu")
    device = torch.device(f"cuda:{local_rank}" if want.startswith("cuda") and ddp else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ddp, rank, K, device


def autocast_for(device, float64=False):
    """bf16 autocast on CUDA (Table 7 trains in mixed precision); none on the CPU or in float64."""
    if device.type == "cuda" and not float64:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def teardown_distributed():
    """The autograd graph and DDP's reducer hold the process group: collect them before the teardown,
    or Gloo can abort at exit ("terminate called without an active exception"); the barrier keeps
    a rank from closing its connections while another still uses them."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def load_checkpoint(path, flag="--resume", required=("model", "optimizer", "step", "config", "args")):
    """A checkpoint written by this script, or a BadInput naming the flag and the file: missing,
    unreadable, or lacking the keys `required`. finetune.py reads its --init with it."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{flag}: no checkpoint at {path}; give a checkpoint written by train_mlm.py"
                       + ("; start without --resume, or point --out at the run" if flag == "--resume" else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        missing = set(required) - set(ckpt) if isinstance(ckpt, dict) else set(required)
    except Exception as e:  # torch raises many kinds here (zip, pickle, EOF): all mean "unreadable"
        raise BadInput(f"{flag}: {path} is corrupt or not a checkpoint ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if missing:
        raise BadInput(f"{flag}: {path} is not a checkpoint of train_mlm.py (missing {', '.join(sorted(missing))})")
    return ckpt


# ------------------------------------------------------------------------------------------------
# Tokenizers. Both put <s>, </s>, <pad> and <mask> below id 4 (and <mask> last for SentencePiece),
# so "special" is `id < 4 or id == mask` and random replacements come from [4, random_hi).


class ByteTokenizer:
    """UTF-8 bytes: <pad>=0 <s>=1 </s>=2 <mask>=3, byte b -> 4 + b. Every language, no files."""
    pad, bos, eos, mask, vocab_size, random_hi = 0, 1, 2, 3, 260, 260
    name = "UTF-8 bytes"

    def encode_lines(self, lines):  # lines: bytes, already checked to be UTF-8
        return [np.frombuffer(s, dtype=np.uint8).astype(np.int64) + 4 for s in lines]


class SentencePieceTokenizer:
    """XLM-R's (fairseq's) layout: <s>=0 <pad>=1 </s>=2 <unk>=3, SentencePiece piece i>=3 -> i+1,
    <mask> last; XLM-R's sentencepiece.bpe.model (250000 pieces) gives vocab_size 250002, as in `base`."""

    def __init__(self, path):
        try:
            import sentencepiece
        except ImportError:
            raise BadInput("--spm needs the sentencepiece package: pip install sentencepiece") from None
        if not Path(path).is_file():
            raise BadInput(f"--spm {path}: no such file")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise BadInput(f"--spm {path} is not a SentencePiece model ({e})") from None
        n = self.sp.get_piece_size()
        self.bos, self.pad, self.eos, self.unk, self.mask = 0, 1, 2, 3, n + 1
        self.vocab_size, self.random_hi, self.name = n + 2, n + 1, f"SentencePiece {path}"

    def encode_lines(self, lines):
        ids = self.sp.encode([s.decode("utf-8") for s in lines])
        return [np.where(np.array(s, dtype=np.int64) == 0, self.unk, np.array(s, dtype=np.int64) + 1) for s in ids]


def is_special(ids, tok):
    return (ids < 4) | (ids == tok.mask)


# ------------------------------------------------------------------------------------------------
# Corpus: read <lang>.txt files, pack each language into max_len sequences, split off validation


def read_lines(path):
    """Non-blank lines of a UTF-8 file as bytes; a bad byte is an error that names the file and line."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise BadInput(f"{path}, line {line}: not UTF-8 ({e.reason} at byte {e.start}); "
                       f"convert the file to UTF-8 (e.g. iconv -t UTF-8) or remove the line") from None
    return [s for s in (s.strip() for s in raw.split(b"\n")) if s]


def pack(sentences, L, tok):
    """<s> sent </s> <s> sent </s> ... up to L tokens, whole sentences only (a sentence longer than
    L - 2 is cut into pieces); the tail of each row is padding. sentences: list of id arrays -> (n, L)."""
    rows, cur, used = [], [], 0
    for s in sentences:
        for i in range(0, len(s), L - 2):
            piece = s[i:i + L - 2]
            if used + len(piece) + 2 > L:
                rows.append(cur)
                cur, used = [], 0
            cur += [np.array([tok.bos]), piece, np.array([tok.eos])]
            used += len(piece) + 2
    if cur:
        rows.append(cur)
    out = np.full((len(rows), L), tok.pad, dtype=np.int64)
    for r, pieces in enumerate(rows):
        seq = np.concatenate(pieces)
        out[r, :len(seq)] = seq
    return out


def n_val_seqs(n):
    """Validation sequences held out of a language with n packed sequences: the last ones."""
    return 0 if n < 2 else max(1, min(VAL_SEQS, n // 10))


def read_corpus(data_dir, tok, L):
    """-> (languages, train (S, L) int64, train_lang (S,), val (V, L), val_lang (V,))."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BadInput(f"--data {data_dir}: no such folder; it should hold one <lang>.txt file per language")
    files = sorted(data_dir.glob("*.txt"))
    if not files:
        raise BadInput(f"--data {data_dir} has no <lang>.txt files; put one UTF-8 text file per language there")
    langs, train, val = [], [], []
    for path in files:
        lines = read_lines(path)
        if not lines:
            print(f"warning: {path} has no text; language {path.stem!r} skipped", file=sys.stderr)
            continue
        seqs = pack(tok.encode_lines(lines), L, tok)
        k = n_val_seqs(len(seqs))
        langs.append(path.stem)
        train.append(seqs[:len(seqs) - k])
        val.append(seqs[len(seqs) - k:])
    if not langs:
        raise BadInput(f"--data {data_dir}: every <lang>.txt file is empty; the corpus has no text")
    lang_of = lambda parts: np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    return langs, np.concatenate(train), lang_of(train), np.concatenate(val), lang_of(val)


def sampling_probs(n_tokens, alpha):
    """Language re-balanced sampling, q_i = n_i^alpha / sum_j n_j^alpha (Conneau and Lample 2019)."""
    w = np.asarray(n_tokens, dtype=np.float64) ** alpha
    return w / w.sum()


def bert_mask(ids, rng, tok):
    """BERT masking: 15% of the non-special tokens are predicted; of those 80% become <mask>, 10% a
    random ordinary token (a byte, never a special) and 10% stay. -> (input ids, labels: -100 elsewhere)."""
    selected = (rng.random(ids.shape) < MASK_PROB) & ~is_special(ids, tok)
    action = rng.random(ids.shape)
    random_ids = rng.integers(4, tok.random_hi, ids.shape)
    inp = np.where(selected & (action < MASK_TOKEN), tok.mask, ids)
    inp = np.where(selected & (action >= MASK_TOKEN) & (action < MASK_TOKEN + MASK_RANDOM), random_ids, inp)
    return inp, np.where(selected, ids, -100)


def global_batch(step, seed, G, q, train, train_lang, tok):
    """The G sequences and masks of optimizer step `step`: a function of (seed, step) alone, the same
    on every process whatever their number. -> (input ids, labels), each (G, L) int64."""
    rng = np.random.default_rng([seed, step])
    lang = rng.choice(len(q), size=G, p=q)  # language of each sequence, ~ q
    first = np.searchsorted(train_lang, np.arange(len(q)))  # where each language's rows start
    count = np.bincount(train_lang, minlength=len(q))
    rows = first[lang] + (rng.random(G) * count[lang]).astype(np.int64)  # a uniform row of that language
    return bert_mask(train[rows], rng, tok)


def unigram_entropy(ids, tok):
    """Entropy (nats) of the unigram distribution of the maskable tokens: the MLM loss of the best
    predictor that ignores the context, in the same units as the loss."""
    counts = np.bincount(ids[~is_special(ids, tok)].ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------------
# Optimizer pieces


def lr_at(step, peak, warmup, steps):
    """Linear warmup over `warmup` steps, then linear decay to 0 at `steps` (Table 7). step counts from 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (steps - step) / max(1, steps - warmup))


def param_groups(model, weight_decay=WEIGHT_DECAY):
    """AdamW groups of the trainable parameters: weight decay (Table 7: 0.01) on the weight matrices
    and embeddings (Linear, token/position embeddings, the router's W and e_i); none on biases,
    LayerNorm and the temperature tau, which are not weights to shrink (log tau would be pulled
    towards tau = 1). fairseq, the paper's code base, decays every parameter; we follow BERT's and
    XTREME's practice instead. Frozen parameters (fine-tuning) are left out. finetune.py uses it too."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in trainable if p.dim() >= 2], weight_decay=weight_decay),
            dict(params=[p for p in trainable if p.dim() < 2], weight_decay=0.0)]


def is_expert_param(name):
    return ".experts." in name


def clip_grad_norm(named_params, max_norm, ep):
    """Global gradient-norm clipping. Under expert parallelism each rank holds different experts, so the
    squared norm of the experts is summed over the ranks (the rest is the same on every rank after
    DDP's all-reduce); every rank then scales by the same factor and the shared weights stay in sync."""
    shared = [p.grad for n, p in named_params if not is_expert_param(n)]
    expert = [p.grad for n, p in named_params if is_expert_param(n)]
    sq = lambda gs: torch.stack([upcast(g).pow(2).sum() for g in gs]).sum() if gs else torch.zeros(())
    expert_sq = sq(expert).to(shared[0].device)
    if ep:
        dist.all_reduce(expert_sq)
    norm = (sq(shared).to(expert_sq.device) + expert_sq).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for _, p in named_params:
            p.grad.mul_(scale.to(p.grad.device))
    return norm.item()


def gather_experts(named, model):
    """full_state_dict's gathering for any name-keyed tensors (the optimizer's moments): the experts
    of every sharded MoELayer from all ranks, renumbered globally. A collective under expert parallelism."""
    named = dict(named)
    for lname, layer in model.named_modules():
        if not isinstance(layer, MoELayer) or layer.ep_group is None:
            continue
        K, E, prefix = dist.get_world_size(layer.ep_group), len(layer.experts), f"{lname}.experts."
        for k in sorted(k for k in named if k.startswith(prefix)):  # same order on every rank
            i, rest = k[len(prefix):].split(".", 1)
            v = named.pop(k)
            pieces = [torch.empty_like(v) for _ in range(K)]
            dist.all_gather(pieces, v.contiguous(), group=layer.ep_group)
            for r, piece in enumerate(pieces):
                named[f"{prefix}{r * E + int(i)}.{rest}"] = piece
    return named


def micro_seed(seed, step, rank, micro):
    """Dropout's torch seed for one micro-batch: no dependence on RNG history, so resume is exact."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0])


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def taus(model):
    return [float(m.router.tau.detach()) for m in moe_layers(model)]


# ------------------------------------------------------------------------------------------------
# The training run, top to bottom


def main(argv=None):
    # --- arguments ------------------------------------------------------------------------------
    t_start = time.time()
    given = vars(build_parser().parse_args(argv))
    out_dir = Path(given.get("out", COMMON_DEFAULTS["out"]))
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path) if given.get("resume") else None
    args, cfg, cfg_given = resolve(given, ckpt)
    minimum = dict(steps=1, batch_size=1, grad_accum=1, warmup=0, eval_every=1, stop_after=1)
    for name, low in minimum.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise BadInput(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if not (args.lr > 0 and args.alpha >= 0 and args.clip >= 0):
        raise BadInput(f"--lr must be positive and --alpha, --clip non-negative; got {args.lr}, {args.alpha}, {args.clip}")
    if cfg.max_len < 3:
        raise BadInput(f"--max-len must be at least 3 to hold <s> x </s>, got {cfg.max_len}")

    # --- distributed init: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE ---------------------------
    ddp, rank, K, device = setup_distributed(args.device)
    master = rank == 0  # this process alone prints, evaluates, logs and saves
    ep = args.expert_parallel
    if ep and not ddp:
        raise BadInput("--expert-parallel shards the experts over processes: launch with torchrun --nproc_per_node=K")
    if ep and (cfg.routing == "dense" or cfg.n_experts % K):
        raise BadInput(f"--expert-parallel: --n-experts {cfg.n_experts} must be divisible by the {K} processes"
                       if cfg.routing != "dense" else "--expert-parallel needs sparse layers, not --routing dense")
    G, A = args.batch_size, args.grad_accum
    if G % (K * A):
        raise BadInput(f"--batch-size {G} must be divisible by processes x --grad-accum = {K} x {A}")
    B = G // (K * A)  # sequences per micro-batch
    say = (lambda *a: tqdm.write(" ".join(map(str, a)))) if master else (lambda *a: None)

    # --- tokenizer and data ---------------------------------------------------------------------
    tok = SentencePieceTokenizer(args.spm) if args.spm else ByteTokenizer()
    if "vocab_size" in cfg_given and cfg.vocab_size < tok.vocab_size:
        raise BadInput(f"--vocab-size {cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size} ({tok.name})")
    if "vocab_size" not in cfg_given:
        try:  # the tokenizer decides the vocabulary (XLM-R's spm model gives base's 250002)
            cfg = XMoEConfig.preset(args.preset, **{**cfg.to_dict(), "vocab_size": tok.vocab_size})
        except ValueError as e:
            raise config_error(e) from None
    if ckpt is not None:
        diff = {k: (v, cfg.to_dict()[k]) for k, v in XMoEConfig.from_dict(ckpt["config"]).to_dict().items()
                if cfg.to_dict()[k] != v}
        if diff:
            raise BadInput(f"--resume: {ckpt_path} was trained with another config: "
                           + ", ".join(f"{k} is {a!r} there, {b!r} here" for k, (a, b) in diff.items())
                           + "; drop the differing flags or use another --out")
    data_dir = args.data
    if data_dir is None:  # the built-in synthetic world, generated once (by one process)
        data_dir = str(SYNTHETIC_DIR / "mlm")
        if master and not any((SYNTHETIC_DIR / "mlm").glob("*.txt")):
            make_synthetic_corpus(SYNTHETIC_DIR, say)
        if ddp:
            dist.barrier()
    langs, train, train_lang, val, val_lang = read_corpus(data_dir, tok, cfg.max_len)
    n_tokens = np.bincount(train_lang, weights=(train != tok.pad).sum(1), minlength=len(langs))  # n_i
    q = sampling_probs(n_tokens, args.alpha)
    H = unigram_entropy(val, tok)
    val_inp, val_labels = bert_mask(val, np.random.default_rng([args.seed, 2**32 - 1]), tok)  # fixed masks
    if not (val_labels != -100).any():
        raise BadInput(f"--data {data_dir}: too little text to hold out a validation split; a language needs "
                       f"at least two sequences of --max-len {cfg.max_len} tokens")
    say(f"corpus {data_dir}: {len(langs)} languages, {int(n_tokens.sum()):,} training tokens ({tok.name}), "
        f"{len(val)} validation sequences; sampling q (alpha {args.alpha}): "
        + " ".join(f"{l} {p:.3f}" for l, p in zip(langs, q)))

    # --- model ----------------------------------------------------------------------------------
    torch.set_default_dtype(torch.float64 if args.float64 else torch.float32)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = MaskedLM(cfg).to(device)
    n_params = sum(p.numel() for p in raw_model.parameters())
    per_expert = sum(p.numel() for m in moe_layers(raw_model) for p in m.experts[0].parameters())
    n_active = n_params - sum(p.numel() for m in moe_layers(raw_model) for p in m.experts.parameters()) + per_expert
    if ep:  # keep this rank's n_experts / K experts; tokens will travel to them (all_to_all)
        for layer in moe_layers(raw_model):
            layer.shard_experts()
    if ckpt is not None:
        raw_model.load_state_dict(local_state_dict(ckpt["model"], raw_model))
    model = raw_model
    if ddp:
        if ep:  # expert weights differ per rank: DDP must neither broadcast nor average them
            DDP._set_params_and_buffers_to_ignore_for_model(
                raw_model, [n for n, _ in raw_model.named_parameters() if is_expert_param(n)])
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    say(f"X-MoE {args.preset} ({cfg.routing}/{cfg.gate}, {cfg.n_experts} experts after block(s) "
        f"{','.join(map(str, cfg.sparse_after)) or '-'}): {n_params / 1e6:.2f}M parameters, "
        f"{n_active / 1e6:.2f}M active per token; {K} process(es) on {device}{', experts sharded' if ep else ''}")

    # --- optimizer and schedule -----------------------------------------------------------------
    named_params = list(raw_model.named_parameters())
    optimizer = torch.optim.AdamW(param_groups(raw_model), lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    autocast = autocast_for(device, args.float64)

    # --- resume ---------------------------------------------------------------------------------
    # the optimizer state is saved by parameter name (not position), so it survives expert sharding
    start, prev_routing = 0, None
    if ckpt is not None:
        start = int(ckpt["step"])
        moments = {k: local_state_dict(v, raw_model) for k, v in ckpt["optimizer"].items()}
        for n, p in named_params:
            optimizer.state[p] = {"step": torch.tensor(float(start)),  # AdamW's own step counter, on the CPU
                                  **{k: moments[k][n].to(device, p.dtype) for k in moments}}
        prev_routing = ckpt.get("routing")
        if master:  # the log keeps the rows up to the checkpoint; later ones are redone
            rows = [r for r in (json.loads(s) for s in (out_dir / "log.jsonl").read_text().splitlines() if s)
                    if r["step"] <= start] if (out_dir / "log.jsonl").exists() else []
            write_atomic(out_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        say(f"resumed {ckpt_path} at step {start}")
    elif master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "log.jsonl").write_text("")
    del ckpt  # release the (memory-mapped) checkpoint

    def log(row):
        if master:
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    if start == 0:  # the log opens with the data: languages, their training tokens n_i and q_i
        log({"step": 0, "languages": langs, "tokens": n_tokens.tolist(), "alpha": args.alpha, "q": q.tolist()})

    def save(step, routing):
        """The whole model (all experts, unwrapped) and optimizer, written atomically by rank 0.
        full_state_dict and gather_experts are collectives under expert parallelism."""
        state = full_state_dict(raw_model)
        moments = {k: gather_experts({n: optimizer.state[p][k] for n, p in named_params}, raw_model)
                   for k in ("exp_avg", "exp_avg_sq")}
        if not master:
            return
        ckpt = {"model": state, "optimizer": moments, "step": step, "config": cfg.to_dict(), "args": vars(args),
                "schedule": {"lr": args.lr, "warmup": args.warmup, "steps": args.steps},
                "rng": {"seed": args.seed, "scheme": "batch and masks from numpy (seed, step); dropout from "
                        "torch seeded by (seed, step, rank, micro-batch)"},
                "data": {"next_step": step, "languages": langs, "q": q.tolist(), "tokenizer": tok.name},
                "routing": routing, "tokenizer": {"kind": "spm", "path": str(args.spm)} if args.spm else {"kind": "byte"}}
        ckpt["config"]["moe_after"] = list(cfg.moe_after)
        tmp = ckpt_path.with_suffix(".pt.tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, ckpt_path)  # never a half-written checkpoint, even if killed here

    # --- evaluation: validation MLM loss, expert load, RC (Eq. 10), RF against the last evaluation ---
    n_val_tokens = int((val != tok.pad).sum())
    rc_mask = np.zeros(val.shape, dtype=bool)  # a fixed subset of the validation tokens for RC
    rc_mask.flat[np.flatnonzero(val != tok.pad)[np.linspace(0, n_val_tokens - 1, min(RC_TOKENS, n_val_tokens)).astype(int)]] = True

    @torch.no_grad()
    def evaluate(prev_routing):
        raw_model.eval()
        layers = moe_layers(raw_model)
        ce_lang, n_lang = np.zeros(len(langs)), np.zeros(len(langs))
        experts, hidden = [[] for _ in layers], [[] for _ in layers]
        for i in range(0, len(val), max(B, 16)):
            ids = torch.from_numpy(val_inp[i:i + max(B, 16)]).to(device)
            labels = torch.from_numpy(val_labels[i:i + max(B, 16)]).to(device)
            with autocast:
                out = raw_model(ids, pad_mask=torch.from_numpy(val[i:i + max(B, 16)] == tok.pad).to(device))
            ce = F.cross_entropy(upcast(out.logits).transpose(1, 2), labels, ignore_index=-100, reduction="none")
            np.add.at(ce_lang, val_lang[i:i + len(ids)], ce.sum(1).cpu().numpy())
            np.add.at(n_lang, val_lang[i:i + len(ids)], (labels != -100).sum(1).cpu().numpy())
            sel = torch.from_numpy(rc_mask[i:i + len(ids)]).to(device)
            for l, r in enumerate(out.routing):
                experts[l].append(r.experts.cpu())
                hidden[l].append(upcast(r.hidden[sel]).cpu())
        raw_model.train()
        routing = [torch.cat(e) for e in experts]  # (V, L) per sparse layer, -1 at padding
        rc_sel = torch.from_numpy(rc_mask)
        return routing, {
            "val_mlm_loss": float(ce_lang.sum() / n_lang.sum()),
            "val_mlm_loss_by_lang": {l: float(c / n) for l, c, n in zip(langs, ce_lang, n_lang) if n > 0},
            "unigram_entropy": H,
            "expert_load": [expert_load(e, cfg.n_experts).tolist() for e in routing],
            "rc": [representation_collapse(torch.cat(h), e[rc_sel]) for h, e in zip(hidden, routing)],
            "rf": None if prev_routing is None else [routing_fluctuation(p, e) for p, e in zip(prev_routing, routing)],
            "tau": taus(raw_model)}

    # --- training loop --------------------------------------------------------------------------
    # Normalisation: the 1-process loss is the mean over the global batch's M masked tokens. A micro-
    # batch's summed token losses divided by M add up, over micro-batches and ranks, to that mean;
    # times K because DDP averages the K ranks' gradients. The balance loss (Eq. 8) is computed per
    # micro-batch on its own tokens and averaged over all K * A micro-batches (1/A here, 1/K by DDP).
    # Together: Eq. 9, L_MLM + balance_coef * sum_layers L_balance, for the whole global batch.
    step, last_saved, metrics = start, (start or None), None
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    bar = tqdm(total=args.steps, initial=start, disable=not master, dynamic_ncols=True)
    seen_tokens, train_time = 0, 0.0
    while step < stop:
        t0 = time.time()
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inp, labels = global_batch(step, args.seed, G, q, train, train_lang, tok)
        M = int((labels != -100).sum())  # masked tokens in the whole global batch
        mine = rank * (G // K)  # this rank's contiguous share starts here
        sums = torch.zeros(3, dtype=torch.float64)  # summed token losses, balance losses, real tokens
        for j in range(A):
            rows = slice(mine + j * B, mine + (j + 1) * B)
            ids = torch.from_numpy(inp[rows]).to(device)
            lab = torch.from_numpy(labels[rows]).to(device)
            pad = ids == tok.pad  # <pad> is never masked or replaced, so the input shows the padding
            torch.manual_seed(micro_seed(args.seed, step, rank, j))
            # DDP all-reduces the gradients only on the last micro-batch; no_sync must wrap the forward too
            with model.no_sync() if ddp and j < A - 1 else nullcontext():
                with autocast:
                    out = model(ids, pad_mask=pad)
                ce = F.cross_entropy(upcast(out.logits).flatten(0, 1), lab.flatten(), ignore_index=-100, reduction="sum")
                loss = ce * K / max(M, 1) + cfg.balance_coef * out.balance_loss / A  # see the comment above
                loss.backward()
            sums += torch.tensor([ce.item(), out.balance_loss.item(), (~pad).sum().item()], dtype=torch.float64)
        if ddp:
            dist.all_reduce(sums)  # the global batch's figures, for the log
        mlm, balance = sums[0].item() / max(M, 1), sums[1].item() / (K * A)
        loss = mlm + cfg.balance_coef * balance
        if not math.isfinite(loss):
            bar.close()
            raise Diverged(f"loss is {loss} at step {step + 1}; stopped before its update. "
                           + last_good(ckpt_path, last_saved) + " Try a lower --lr.")
        if ep:
            # Expert parallelism: an expert's gradient already sums over the tokens of all K ranks
            # (they travelled to it), and each rank's loss carries the factor K above, meant to undo
            # DDP's averaging, which the experts do not get. Divide by K to match one process.
            for n, p in named_params:
                if is_expert_param(n):
                    p.grad.div_(K)
        grad_norm = clip_grad_norm(named_params, args.clip, ep)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        seen_tokens, train_time = seen_tokens + sums[2].item(), train_time + dt
        log({"step": step, "loss": loss, "mlm_loss": mlm, "balance_loss": balance, "lr": lr, "tau": taus(raw_model),
             "grad_norm": grad_norm, "tokens_per_s": round(sums[2].item() / dt, 1)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{seen_tokens / train_time:,.0f}")

        if (step % args.eval_every == 0 or step == args.steps) and (master or ep):
            # under expert parallelism every rank takes part in the forward (and in gathering the experts)
            routing, metrics = evaluate(prev_routing)
            if not math.isfinite(metrics["val_mlm_loss"]):
                bar.close()
                raise Diverged(f"validation loss is {metrics['val_mlm_loss']} at step {step}; stopped. "
                               + last_good(ckpt_path, last_saved))
            log({"step": step, **metrics})
            say(f"step {step}: val MLM loss {metrics['val_mlm_loss']:.4f} (unigram entropy {H:.4f}), "
                f"RC {fmt(metrics['rc'])}, RF {fmt(metrics['rf'])}, tau {fmt(metrics['tau'])}")
            prev_routing = routing
            save(step, routing)
            last_saved = step
        elif step == stop and (master or ep):  # --stop-after: a checkpoint as if interrupted here
            save(step, prev_routing)
    bar.close()

    # --- summary --------------------------------------------------------------------------------
    if step < args.steps:
        say(f"stopped at step {step} of {args.steps} (--stop-after); {ckpt_path} continues with --resume")
    elif metrics is None:
        say(f"nothing to do: {ckpt_path} is already at step {start} of --steps {args.steps}")
    else:
        say(summary(metrics, cfg, ckpt_path, SYNTHETIC_DIR if args.data is None else None, out_dir,
                    seen_tokens, train_time, time.time() - t_start))

    # --- the end --------------------------------------------------------------------------------
    teardown_distributed()


def last_good(ckpt_path, step):
    return f"The last good checkpoint is {ckpt_path} (step {step})." if step else "No checkpoint was written yet."


def fmt(xs):
    return "-" if xs is None else "/".join(f"{x:.3f}" for x in xs)


def summary(m, cfg, ckpt_path, synthetic_dir, out_dir, tokens, train_time, wall):
    loads = [np.array(l) for l in m["expert_load"]]
    balance = " ".join(f"layer after block {b}: busiest expert {l.max() / l.sum():.1%} of tokens "
                       f"(uniform {1 / len(l):.1%}), {int((l == 0).sum())} idle"
                       for b, l in zip(cfg.sparse_after, loads))
    data = str(synthetic_dir) if synthetic_dir else "<XTREME folder>"
    return "\n".join([
        f"done in {wall / 60:.1f} min: {tokens / 1e6:.2f}M tokens trained on at {tokens / max(train_time, 1e-9):,.0f} tokens/s",
        f"validation MLM loss {m['val_mlm_loss']:.4f} nats/token; unigram entropy of the corpus {m['unigram_entropy']:.4f} "
        f"(the best a model that ignores context can do)",
        f"expert load: {balance or 'dense model, no experts'}",
        f"RC (Eq. 10, larger = less collapse) {fmt(m['rc'])}; tau {fmt(m['tau'])}",
        f"checkpoint {ckpt_path}, log {out_dir / 'log.jsonl'}",
        f"next: python finetune.py --task udpos --data {data} --init {ckpt_path} --out runs/{cfg.routing}/udpos"])


def write_atomic(path, text):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_synthetic_corpus(path, say):
    """Generate the synthetic world into a temporary folder, then rename it: a run killed half-way
    leaves nothing that looks finished."""
    say(f"generating the synthetic multilingual corpus into {path} (once)")
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    make_synthetic(tmp, seed=0)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: `python train_mlm.py --resume` (same --out) continues from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)
