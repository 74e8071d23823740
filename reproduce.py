"""
The paper's findings in miniature: Dense, SMoE and X-MoE (softmax and sigmoid gates) pre-trained on
the same batches from the same initial seed, for several seeds, fine-tuned with frozen routing on the
synthetic world's tasks, and each claim of the paper checked by a rule fixed before the runs.

    python reproduce.py                      # CPU: 5 models x 3 seeds, POS and PAWS-X; see README for the time
    python reproduce.py --quick              # CPU, minutes: the pre-training claims (MLM loss, RC, RF), softmax only
    python reproduce.py --device cuda --jobs 4          # one GPU, four runs at a time
    python reproduce.py --ablations          # also Table 3 (sigmoid X-MoE without dimension reduction, without
                                             # L2 normalisation, without frozen routing) and Table 4 (d_e sweep)
    python reproduce.py --collapse           # CPU, 45 to 100 min on 2 cores: representation collapse (mini at
                                             # d 96), SMoE, SMoE --detach-route, X-MoE at N/d 1/4 and 1/24, 5 seeds
    python reproduce.py --collapse --quick   # CPU, 8 to 18 min: SMoE and --detach-route at 1/24, 3 seeds

Every run is a subprocess of train_mlm.py or finetune.py, with their flags; independent runs go in
parallel (--jobs, the cores shared out). Interrupted, it continues where it stopped: a finished run is
not redone, a pre-training run continues from its last checkpoint. Writes into --out (results/):
  runs/<model>/seed<k>/        train_mlm.py's log.jsonl and ckpt.pt, and <task>/ from finetune.py
  runs/<model>-seed<k>.json    one record per pre-training run: curves and fine-tuning scores
  summary.json, summary.md     the tables in the paper's layout and a verdict per claim
  fig2a.png ... fig3b.png      with matplotlib (UMAP maps with umap-learn, else PCA); else curves.csv,
                               map_<model>.csv and a line saying how to get the figures
  collapse_<measure>.png       --collapse: each measure through training, a panel per N/d

Every pre-training run is evaluated at step 0, before its first update: for one seed the weights
below the sparse layer are the same for every model, so step 0 is the shared control.

The verdict rule, fixed before the runs: for each claim, d_k is the X-MoE value minus the SMoE value
(or SMoE minus Dense, or one model's value for a claim about one model; `value` says which number of
a run) for study seed k; the runs of a seed share batches and initial seed. The claim is "reproduced"
when every seed's d_k has the paper's sign, "not reproduced" when every seed's d_k has the opposite
sign, and "inconclusive" otherwise (also when a seed has no value); were the signs coin flips, each of
the first two would happen once in 2^n with n seeds (1 in 8 with 3, 1 in 32 with 5). Fewer than 3
seeds give no verdict ("too few seeds"); a claim whose runs are not part of this invocation is "not
measured". Nothing is tuned for one of the routers.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from analysis import observe
from corpus import (SYNTHETIC_DIR, ByteTokenizer, make_tokenizer, open_corpus, prepare_corpus, read_manifest,
                    synthetic_corpus, validation_rows)
from runtime import BadInput, build_model, cli, load_checkpoint, on_disk_full, pretraining_key, write_atomic
from xmoe import PRESETS

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------------
# The study: what is trained, and the claims of the paper it checks

MODELS = {  # name: train_mlm.py flags; the paper's Table 1 and 2 rows
    "dense": ["--routing", "dense"],
    "smoe-softmax": ["--routing", "smoe", "--gate", "softmax"],
    "xmoe-softmax": ["--routing", "xmoe", "--gate", "softmax"],
    "smoe-sigmoid": ["--routing", "smoe", "--gate", "sigmoid"],
    "xmoe-sigmoid": ["--routing", "xmoe", "--gate", "sigmoid"],
}
DE_SWEEP = {"N-4": 0.25, "N": 1, "2N": 2, "4N": 4}  # Table 4: d_e as a multiple of N (the default: N/2)


def ablations(n_experts):
    """Table 3 and Table 4: sigmoid X-MoE variants; w/o frozen routing fine-tunes xmoe-sigmoid itself."""
    return {"xmoe-sigmoid-no-dim-reduction": MODELS["xmoe-sigmoid"] + ["--no-dim-reduction"],
            "xmoe-sigmoid-no-l2-norm": MODELS["xmoe-sigmoid"] + ["--no-l2-norm"],  # tau 1, fixed (as for SMoE)
            **{f"xmoe-sigmoid-de-{k}": MODELS["xmoe-sigmoid"] + ["--d-route", str(max(1, int(m * n_experts)))]
               for k, m in DE_SWEEP.items()},
            "xmoe-sigmoid-unfrozen": []}


STUDY = dict(steps=150, batch_size=16, lr=2e-3)  # pre-training of each run (--quick too): warmup a tenth
EVALS = 6  # evaluations per pre-training run: the points of the RC and RF curves
FINETUNE = ["--epochs", "2", "--ic-every", "10"]  # the same for every model, with --max-train
FT_SEEDS = [1, 2, 3]

CLAIMS = [  # id, the paper's claim, the paper's numbers, (higher, lower) models, metric, sign expected
    ("table2-mlm-softmax", "X-MoE reaches a lower validation MLM loss than SMoE (softmax gate)",
     "2.929 vs 2.946", ("xmoe-softmax", "smoe-softmax"), "mlm", -1),
    ("table2-mlm-sigmoid", "X-MoE reaches a lower validation MLM loss than SMoE (sigmoid gate)",
     "2.951 vs 2.975", ("xmoe-sigmoid", "smoe-sigmoid"), "mlm", -1),
    ("table2-mlm-dense", "SMoE reaches a lower validation MLM loss than Dense (softmax gate)",
     "2.946 vs 3.158", ("smoe-softmax", "dense"), "mlm", -1),
    ("fig2c-rc", "X-MoE's hidden states collapse less than SMoE's: larger RC (Eq. 10) (second half of training)",
     "Figure 2c: X-MoE above SMoE", ("xmoe-softmax", "smoe-softmax"), "rc", +1),
    ("fig2c-rc-vs-step0", "X-MoE's RC grows more (or falls less) from the shared initial state than SMoE's: "
     "RC (second half) over RC at step 0", "Figure 2c: X-MoE above SMoE", ("xmoe-softmax", "smoe-softmax"),
     "rc_ratio", +1),
    ("fig3a-rf", "X-MoE's routing fluctuates less through pre-training: lower RF ratio (second half of training)",
     "Figure 3a: X-MoE below SMoE after 15k steps", ("xmoe-softmax", "smoe-softmax"), "rf", -1),
    ("fig3b-ic", "X-MoE's fine-tuning runs converge to more similar routing: higher IC "
     "(second half of fine-tuning, mean over tasks)",
     "Figure 3b: X-MoE above SMoE", ("xmoe-softmax", "smoe-softmax"), "ic", +1),
    ("table1-avg-softmax", "X-MoE transfers better than SMoE: higher average zero-shot score (softmax gate)",
     "65.3 vs 63.8", ("xmoe-softmax", "smoe-softmax"), "avg", +1),
    ("table1-avg-sigmoid", "X-MoE transfers better than SMoE: higher average zero-shot score (sigmoid gate)",
     "65.0 vs 64.1", ("xmoe-sigmoid", "smoe-sigmoid"), "avg", +1),
]
ABLATION_CLAIMS = [
    ("table3-no-dim-reduction", "sigmoid X-MoE is better with dimension reduction", "XNLI 72.2 vs 71.5",
     ("xmoe-sigmoid", "xmoe-sigmoid-no-dim-reduction"), "avg", +1),
    ("table3-no-l2-norm", "sigmoid X-MoE is better with L2 normalisation", "XNLI 72.2 vs 71.4",
     ("xmoe-sigmoid", "xmoe-sigmoid-no-l2-norm"), "avg", +1),
    ("table3-no-frozen-routing", "sigmoid X-MoE fine-tunes better with frozen routing", "XNLI 72.2 vs 71.7",
     ("xmoe-sigmoid", "xmoe-sigmoid-unfrozen"), "avg", +1),
    *[(f"table4-de-{name}", f"sigmoid X-MoE is better with d_e = N/2 than with d_e = {name.replace('-', '/')}",
       paper, ("xmoe-sigmoid", f"xmoe-sigmoid-de-{name}"), "avg", +1)
      for name, paper in (("N-4", "XNLI 72.2 vs 71.4"), ("N", "72.2 vs 71.7"), ("2N", "72.2 vs 71.7"),
                          ("4N", "72.2 vs 71.2"))],
]


# The collapse study (--collapse): does SMoE's router pull its input h into the span of what it reads
# (section 2.2), and X-MoE's less? `mini` at d 96 and max_len 128, at N/d = 1/4 and at the paper's 1/24
# (base: 32/768; here d_e = 2, d_e/d = 1/48 as base's 16/768), with SMoE --detach-route as the causal
# control: the same routing, without the router's gradient into h. Long enough for the curves to settle
# (the learning rate decays to 0); the claims read the last third of training.
COLLAPSE_CONFIG = dict(d_model=96, d_ffn=384, max_len=128)
COLLAPSE_TRAINING = dict(steps=600, batch_size=16, lr=2e-3)  # warmup a tenth, an evaluation every 50 steps
COLLAPSE_EVALS = 12
COLLAPSE_N, QUICK_COLLAPSE_N = (24, 4), (4,)
COLLAPSE_SEEDS, QUICK_COLLAPSE_SEEDS = [1, 2, 3, 4, 5], [1, 2, 3]
COLLAPSE_MODELS = {"smoe": MODELS["smoe-softmax"], "smoe-detach": MODELS["smoe-softmax"] + ["--detach-route"],
                   "xmoe": MODELS["xmoe-softmax"]}
QUICK_COLLAPSE_MODELS = ("smoe", "smoe-detach")  # --collapse --quick: the causal claims at N/d = 1/24
COLLAPSE_MEASURES = {"read_share": "share of h's variance in the router's current span (shaded: random spans)",
                     "read_share_fixed": "share of h's variance in the router's step-0 span",
                     "read_span_overlap": "overlap of the router's current and step-0 spans",
                     "pr_rest": "participation ratio of h beyond its two largest directions",
                     "rc_shared": "RC (Eq. 10), the step-0 k-means grouping"}


def collapse_name(model, n):
    return f"collapse-{model}-N{n}"


def collapse_study(quick):
    """{run name: train_mlm.py flags}; --quick's runs are the full study's first ones, which it reuses."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COLLAPSE_CONFIG.items()]
    return {collapse_name(m, n): flags + COLLAPSE_MODELS[m] + ["--n-experts", str(n)]
            for n in (QUICK_COLLAPSE_N if quick else COLLAPSE_N)
            for m in (QUICK_COLLAPSE_MODELS if quick else COLLAPSE_MODELS)}


def collapse_claims():
    """Pre-registered: committed before the runs that judge them. A run's value (`value`) is its mean
    over the evaluations of the last third of training; a share's gain is chance-corrected,
    (s - s0) / (1 - s0) with s0 its step-0 share, never a ratio over s0 (a random span's share stays at
    k/d in expectation, so its gain is 0 whatever k; full collapse into the span gives 1).

    What section 2.2 predicts. SMoE scores s_i = h . e_i (Eq. 1); the loss's gradient with respect to h
    (Eqs. 4-5) is J_1, through the expert's output, plus J_2 = sum_j c_j e_j, through the gate: a
    combination of the e_i, as is the balance loss's (Eq. 8). These terms move h within span{e_i}, the
    N directions the router reads, so:
      causal: SMoE's h gains more in its router's span than SMoE --detach-route's. Detached, no J_2 (nor
        Eq. 8's gradient) reaches h, while e_i learn from the same kinds of gradient in both, so both
        spans move alike and the difference of gains is what the gradient into h does;
      fixed: the same in the step-0 span, which cannot turn toward h: a gain there is h moving;
      xmoe: X-MoE scores cosines in d_e = N/2 dimensions through W (section 3.1), which the paper says
        alleviates the collapse: its h gains less in what its router reads (W's span) than SMoE's in
        span{e_i}, each against its own chance level;
      pr-rest: h collapsing onto N directions lowers the participation ratio of its variance beyond
        its two largest directions (which dominate in every model, Dense too): SMoE's below detached;
      rc-shared: Figure 2c with the tokens grouped alike for both (the step-0 k-means): X-MoE's RC
        (Eq. 10) above SMoE's.
    Each at N/d = 1/4 and 1/24: section 2.2 predicts the sign at every N < d, nothing about its size."""
    claims = []
    for n in COLLAPSE_N:
        smoe, detach, xmoe = (collapse_name(m, n) for m in ("smoe", "smoe-detach", "xmoe"))
        at = f"N/d = {n}/{COLLAPSE_CONFIG['d_model']}"
        claims += [
            (f"collapse-causal-N{n}", f"{at}: SMoE's h gains more of its variance in the directions its router reads "
             "(e_i) than SMoE --detach-route's (chance-corrected gain, current span)", "section 2.2, Eqs. 4-5",
             (smoe, detach), "read_gain", +1),
            (f"collapse-fixed-N{n}", f"{at}: the same in the span the router read at step 0, which cannot turn",
             "section 2.2, Eqs. 4-5", (smoe, detach), "fixed_gain", +1),
            (f"collapse-xmoe-N{n}", f"{at}: X-MoE's h gains less in the directions its router reads (W) than SMoE's "
             "in its e_i (chance-corrected gains)", "sections 2.2, 3.1", (xmoe, smoe), "read_gain", -1),
            (f"collapse-pr-rest-N{n}", f"{at}: SMoE's h has a lower effective dimension beyond its two largest "
             "directions than SMoE --detach-route's (participation ratio)", "section 2.2: collapse from R^d to R^N",
             (detach, smoe), "pr_rest", +1),
            (f"collapse-rc-shared-N{n}", f"{at}: X-MoE's RC (Eq. 10) is larger than SMoE's, the tokens grouped alike "
             "(k-means of the shared step-0 states)", "Figure 2c: X-MoE above SMoE", (xmoe, smoe), "rc_shared", +1)]
    return claims


def fmt_mean_std(values):
    """mean ± sample std (ddof 1) over the seeds, as finetune.py reports its seeds."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}" if len(v) else "-"


MIN_SEEDS = 3


def verdict(diffs, sign):
    """The rule fixed before the runs, symmetric: with d_k one per seed, "reproduced" when every d_k has
    the paper's sign, "not reproduced" when every d_k has the opposite sign (were each sign a coin
    flip, each would happen once in 2^n with n seeds), "inconclusive" otherwise, "not measured" without
    runs, and no verdict ("too few seeds") under MIN_SEEDS seeds."""
    d = np.sign(np.asarray(diffs, dtype=np.float64))
    if len(d) == 0:
        return "not measured"
    if len(d) < MIN_SEEDS:
        return "too few seeds"
    if (d == sign).all():
        return "reproduced"
    return "not reproduced" if (d == -sign).all() else "inconclusive"


# ------------------------------------------------------------------------------------------------
# The runs: subprocesses of train_mlm.py and finetune.py, skipped when finished


def run_dir(out, model, seed):
    return out / "runs" / model / f"seed{seed}"


def pretrained(out, model, seed, steps):
    """Whether the run's log ends with the evaluation of its last step."""
    log = run_dir(out, model, seed) / "log.jsonl"
    rows = [json.loads(s) for s in log.read_text().splitlines() if s] if log.exists() else []
    return any(r.get("step") == steps and "val_mlm_loss" in r for r in rows)


def jobs_to_run(args, study):
    """(pre-training commands, fine-tuning commands) of the runs that are not finished."""
    pre, fine = [], []
    training = [f"--{k.replace('_', '-')}={v}" for k, v in args.training.items()] + ["--device", args.device]
    for model, flags in study.items():
        for seed in args.seeds:
            d = run_dir(args.out, model, seed)
            base = (model.removesuffix("-unfrozen"), seed)
            if model.endswith("-unfrozen"):  # Table 3, w/o frozen routing: xmoe-sigmoid, fine-tuned unfrozen
                d = run_dir(args.out, *base)
            elif not pretrained(args.out, model, seed, args.steps):
                resume = ["--resume"] if (d / "ckpt.pt").exists() else []
                pre.append(["train_mlm.py", "--preset", args.preset, "--seed", seed, "--out", d, *flags, *resume,
                            *training])
            queued = any(cmd[cmd.index("--out") + 1] == d for cmd in pre)  # a checkpoint still to be made
            key = None if queued or not (d / "ckpt.pt").exists() else checkpoint_key(d / "ckpt.pt")
            for task in args.tasks:
                ft = d / (task + ("-unfrozen" if model.endswith("-unfrozen") else ""))
                done = ft / "results.json"  # and made from this very checkpoint
                if key is None or not done.exists() or json.loads(done.read_text()).get("pretraining") != key:
                    fine.append(["finetune.py", "--task", task, "--data", SYNTHETIC_DIR, "--init", d / "ckpt.pt",
                                 "--out", ft, "--seeds", *FT_SEEDS, *FINETUNE, "--max-train", args.max_train,
                                 "--device", args.device,
                                 *(["--no-freeze-moe"] if model.endswith("-unfrozen") else [])])
    return pre, fine


def checkpoint_key(path):
    """The checkpoint's step and training arguments, as finetune.py writes them into results.json."""
    ckpt, _ = load_checkpoint(path, "the study's checkpoint")
    return pretraining_key(ckpt)


def run_all(commands, args, desc):
    """Run the commands, --jobs at a time, each with its share of the cores. The first failure (or
    Ctrl-C) cancels the runs not yet started; the others finish or are stopped by the signal."""
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))

    def run(cmd):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "stdout.txt", "w") as log:
            rc = subprocess.run([sys.executable, str(HERE / cmd[0]), *map(str, cmd[1:])], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": threads}).returncode
        if rc != 0:
            raise BadInput(f"{cmd[0]} failed (exit {rc}); its output is in {out / 'stdout.txt'}; "
                           "run reproduce.py again to continue after fixing it")

    pool = ThreadPoolExecutor(args.jobs)
    try:
        with tqdm(total=len(commands), desc=desc, unit="run") as bar:
            for future in as_completed([pool.submit(run, cmd) for cmd in commands]):
                future.result()
                bar.update(1)
    finally:
        pool.shutdown(cancel_futures=True)


def estimate_minutes(args, n_pre, n_fine):
    """A 3-step probe of the study model's training speed -> a rough time for the runs to do."""
    if not n_pre + n_fine:
        return 0
    cfg = replace(PRESETS[args.preset], **(COLLAPSE_CONFIG if args.collapse else {}))
    model = build_model(cfg)
    ids = torch.randint(4, cfg.vocab_size, (args.training["batch_size"], cfg.max_len))
    opt = torch.optim.AdamW(model.parameters())
    times = []
    for _ in range(3):
        t0 = time.time()
        model(ids, ids).loss.backward()
        opt.step()
        times.append(time.time() - t0)
    step = min(times)
    evals = args.steps / args.training["eval_every"]
    pre = n_pre * (args.steps + 8 * evals) * step  # an evaluation costs about 8 steps
    fine = n_fine * len(FT_SEEDS) * 60 * step  # about 60 steps' worth per fine-tuning seed, evaluation included
    return (pre + fine) / 60 / max(1, min(args.jobs, os.cpu_count() or 1) ** 0.5)


# ------------------------------------------------------------------------------------------------
# Reading the runs back: curves, scores, IC


def record(out, model, seed, tasks):
    """Everything the summary needs from one pre-training run and its fine-tuning runs."""
    base, unfrozen = model.removesuffix("-unfrozen"), model.endswith("-unfrozen")
    d = run_dir(out, base, seed)
    evals = [r for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "val_mlm_loss" in r]
    first = lambda key: [r[key][0] if r.get(key) else None for r in evals]  # the first sparse layer's
    rec = {"model": model, "seed": seed, "steps": [r["step"] for r in evals], "mlm": [r["val_mlm_loss"] for r in evals],
           "unigram_entropy": evals[-1]["unigram_entropy"], "expert_load": evals[-1]["expert_load"], "tasks": {},
           **{key: first(log_key) for key, log_key in SERIES.items()}}
    for task in tasks:
        res = json.loads((d / (task + ("-unfrozen" if unfrozen else "")) / "results.json").read_text())
        rec["tasks"][task] = {"avg_metric": [s["avg_metric"] for s in res["seeds"].values()],
                              "ic": res["ic"], "ic_curve": res["ic_curve"]}
    if not unfrozen:
        write_result(out / "runs" / f"{model}-seed{seed}.json", json.dumps(rec, indent=1))
    return rec


def write_result(path, text):
    """write_atomic; a full disk says what is safe: every finished run is kept."""
    with on_disk_full("The runs are intact (each file is written aside, then renamed): free some space and run "
                      "the same command again, nothing is retrained"):
        write_atomic(path, text)


SERIES = {"rc": "rc", "rc_trace": "rc_trace", "rf": "rf", "tau": "tau", "rc_shared": "rc_shared", "gate": "gate",
          "pr": "participation_ratio", "pr_rest": "participation_ratio_rest", "read_share": "read_share",
          "read_share_fixed": "read_share_fixed", "read_share_chance": "read_share_chance",
          "read_share_percentile": "read_share_percentile", "read_span_overlap": "read_span_overlap",
          "read_share_isotropic": "read_share_isotropic"}  # a record's curves: the first sparse layer's figure


def second_half(values):
    v = [x for x in values[len(values) // 2:] if x is not None]
    return float(np.mean(v)) if v else None


def trained(rec, series):
    """The series' values after the step-0 evaluation (the shared initial state, a control)."""
    return rec[series][1:] if rec["steps"][0] == 0 else rec[series]


def at_step0(rec, series):
    return rec[series][0] if rec["steps"][0] == 0 else None


def late(rec, series):
    """The mean over the evaluations of the last third of training."""
    v = [x for step, x in zip(rec["steps"], rec[series]) if step > 2 * rec["steps"][-1] / 3 and x is not None]
    return float(np.mean(v)) if v else None


def gain(rec, series):
    """(s - s0) / (1 - s0): the share's late value s over its step-0 value s0, chance-corrected."""
    s, s0 = late(rec, series), at_step0(rec, series)
    return None if s is None or s0 is None else (s - s0) / (1 - s0)


def value(rec, metric):
    """One number per run for the claims, fixed before the runs: the final MLM loss; RC and RF averaged
    over the second half of the evaluations after step 0 (RC moves a lot from one evaluation to the
    next), and RC as that mean over the run's own step-0 value; IC averaged over the second half of the
    fine-tuning windows, then over the tasks; the average zero-shot score. The collapse study's: the
    late mean (last third) of the participation ratio beyond two directions and of RC under the shared
    grouping, and the chance-corrected gain of the share in the router's current or step-0 span."""
    if metric == "mlm":
        return rec["mlm"][-1]
    if metric in ("rc", "rc_trace", "rf"):
        return second_half(trained(rec, metric))
    if metric == "rc_ratio":
        rc, start = second_half(trained(rec, "rc")), at_step0(rec, "rc")
        return rc / start if rc is not None and start else None
    if metric in ("read_gain", "fixed_gain"):
        return gain(rec, "read_share" if metric == "read_gain" else "read_share_fixed")
    if metric in ("pr_rest", "rc_shared"):
        return late(rec, metric)
    if metric not in ("ic", "avg"):
        raise ValueError(f"no value {metric!r} for a claim")
    if not rec["tasks"]:
        return None
    if metric == "ic":
        ics = [second_half([v for _, v in t["ic_curve"]]) for t in rec["tasks"].values()]
        return float(np.mean(ics)) if ics and None not in ics else None
    return float(np.mean([np.mean(t["avg_metric"]) for t in rec["tasks"].values()]))  # avg


def measured_by(cid):
    """The invocation whose runs measure a claim."""
    if cid.startswith(("table3-", "table4-")):
        return "python reproduce.py --ablations"
    return "python reproduce.py --collapse" if cid.startswith("collapse-") else "python reproduce.py"


def claim(records, spec, seeds):
    """d_k = value(a) - value(b) per seed (value(a) alone for a claim about one model, b None)."""
    cid, text, paper, (a, b), metric, sign = spec
    pairs = [(value(records[a, s], metric), 0.0 if b is None else value(records[b, s], metric)) for s in seeds
             if (a, s) in records and (b is None or (b, s) in records)]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    diffs = [x - y for x, y in pairs]
    if not pairs:
        return dict(id=cid, claim=text, paper=paper, measured=f"not measured in this run; `{measured_by(cid)}` "
                    "measures it", seeds=0, verdict="not measured", diffs=[], values=[])
    xs, ys = np.array(pairs).T
    measured = (f"{a} {fmt_mean_std(xs)}" + ("" if b is None else f", {b} {fmt_mean_std(ys)}; difference")
                + " per seed " + " ".join(f"{d:+.3g}" for d in diffs))
    rule = verdict(diffs, sign)
    if len(pairs) < len(seeds) and rule != "too few seeds":  # a seed without a value: the rule needs every seed
        measured, rule = f"{measured} (measured in {len(pairs)} of {len(seeds)} seeds)", "inconclusive"
    return dict(id=cid, claim=text, paper=paper, measured=measured, seeds=len(pairs), verdict=rule, diffs=diffs,
                values=[list(p) for p in pairs])


# ------------------------------------------------------------------------------------------------
# Figure 2a/b: a 2-D map of routed validation tokens, coloured by expert: SMoE's hidden states,
# X-MoE's projected representations W^T h / |W^T h| (what each router scores)


@torch.no_grad()
def routed_tokens(ckpt_path, n=3000):
    """(representations (n, d), experts (n,)) of up to n validation tokens, evenly spread."""
    ckpt, cfg = load_checkpoint(ckpt_path, "the study's checkpoint")
    model = build_model(cfg, ckpt["model"], "the study's checkpoint", ckpt_path).eval()
    prepared = SYNTHETIC_DIR / "mlm" / "prepared"
    corpus = open_corpus(read_manifest(prepared), prepared, SYNTHETIC_DIR / "mlm")
    tok = make_tokenizer(ckpt["tokenizer"])
    rows = torch.from_numpy(validation_rows(corpus, cfg.max_len, tok)[0])
    z, e = [], []
    with observe(model) as seen:
        for i in range(0, len(rows), 32):
            model(rows[i:i + 32], pad_mask=rows[i:i + 32] == tok.pad)
            z.append(seen.routed[0].z)  # what the router scored, of the real tokens
            e.append(seen.routed[0].expert)
            seen.hidden.clear(), seen.routed.clear()
    z, e = torch.cat(z).double().numpy(), torch.cat(e).numpy()
    pick = np.linspace(0, len(z) - 1, min(n, len(z))).astype(int)
    return z[pick], e[pick]


def map_2d(z):
    """UMAP with the paper's settings (n_neighbors 100, min_dist 1) when umap-learn is installed,
    else PCA. -> ((n, 2), the method's name)."""
    try:
        import umap
        return umap.UMAP(n_neighbors=100, min_dist=1.0, random_state=0, n_jobs=1).fit_transform(z), "UMAP"
    except ImportError:
        c = z - z.mean(0)
        return c @ np.linalg.svd(c, full_matrices=False)[2][:2].T, "PCA (pip install umap-learn for UMAP)"


# ------------------------------------------------------------------------------------------------
# Curves and figures: CSV always, PNG when matplotlib is installed


def curves(records, models, seeds):
    """{(metric, model): (x, per-seed values (seeds, points))} for RC, RF (pre-training steps) and IC
    (fine-tuning steps of the first task)."""
    out = {}
    for model in models:
        recs = [records[model, s] for s in seeds if (model, s) in records]
        if not recs:
            continue
        for metric in ("rc", "rc_trace", "rf", "mlm", *COLLAPSE_MEASURES):
            if any(v is not None for r in recs for v in r[metric]) and not model.endswith("-unfrozen"):
                out[metric, model] = (recs[0]["steps"], [[np.nan if v is None else v for v in r[metric]] for r in recs])
        task = next(iter(recs[0]["tasks"]), None)
        if task and all(r["tasks"][task]["ic_curve"] for r in recs):
            ic = [[np.nan if v is None else v for _, v in r["tasks"][task]["ic_curve"]] for r in recs]
            out["ic", model] = ([s for s, _ in recs[0]["tasks"][task]["ic_curve"]], ic)
    return out


def write_curves(out, series, maps):
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "model", "step", "mean", "std", "per seed"])
        for (metric, model), (x, ys) in series.items():
            ys = np.array(ys, dtype=np.float64)
            for i, step in enumerate(x):
                col = ys[:, i][np.isfinite(ys[:, i])]
                w.writerow([metric, model, step, *((col.mean(), col.std()) if len(col) else ("", "")),
                            " ".join(f"{v:.6g}" for v in ys[:, i])])
    for model, (xy, experts, method) in maps.items():
        with open(out / f"map_{model}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["x", "y", "expert", method], *[[a, b, e] for (a, b), e in zip(xy, experts)]])


def plot(out, series, maps, task):
    """Figure 2a/b (maps), 2c (RC), 3a (RF), 3b (IC, when fine-tuned) of the five main models: mean and
    min-max band over the seeds. Returns the names of the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for i, (model, (xy, experts, method)) in enumerate(maps.items()):
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(xy[:, 0], xy[:, 1], c=experts, cmap="tab20", s=2)
        ax.set_title(f"{model}: {'hidden states' if model.startswith('smoe') else 'W^T h'} ({method.split()[0]})",
                     fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        fig.savefig(out / f"fig2{'ab'[i]}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    written = [f"fig2{'ab'[i]}.png" for i in range(len(maps))]
    names = {"rc": ("fig2c", "RC (Eq. 10), larger = less collapse", "pre-training step"),
             "rf": ("fig3a", "RF ratio", "pre-training step"),
             "ic": ("fig3b", "inter-run consistency", f"fine-tuning step ({task})")}
    for metric, (name, ylabel, xlabel) in names.items():
        if not any(m == metric for m, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3))
        for (m, model), (x, ys) in series.items():
            if m == metric and model in MODELS:  # the ablations are in curves.csv
                ys = np.array(ys, dtype=np.float64)
                seen = ~np.isnan(ys).all(0)  # RF has no value at the first evaluation
                x, ys = np.asarray(x)[seen], ys[:, seen]
                line, = ax.plot(x, np.nanmean(ys, 0), label=model)
                ax.fill_between(x, np.nanmin(ys, 0), np.nanmax(ys, 0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
        ax.set_yscale("log" if metric == "rc" else "linear")
        ax.legend(fontsize=7)
        fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(f"{name}.png")
    return written


def plot_collapse(out, series, records, seeds):
    """Per measure, its seed mean through pre-training: a panel per N/d, a line per model; for the share
    in the current span also the 95% band of random spans of as many directions (shaded)."""
    import matplotlib.pyplot as plt
    for metric, label in COLLAPSE_MEASURES.items():
        fig, axes = plt.subplots(1, len(COLLAPSE_N), figsize=(4.5 * len(COLLAPSE_N), 3.2), squeeze=False)
        for ax, n in zip(axes[0], COLLAPSE_N):
            for model in COLLAPSE_MODELS:
                run = collapse_name(model, n)
                if (metric, run) not in series:
                    continue
                x, ys = series[metric, run]
                line, = ax.plot(x, np.nanmean(np.array(ys, dtype=np.float64), 0), label=model)
                if metric == "read_share":  # (seeds, evaluations, [mean, 2.5%, 97.5%])
                    band = np.array([records[run, s]["read_share_chance"] for s in seeds if (run, s) in records])
                    ax.fill_between(x, band[:, :, 1].mean(0), band[:, :, 2].mean(0), color=line.get_color(), alpha=0.15)
            ax.set_title(f"N/d = {n}/{COLLAPSE_CONFIG['d_model']}", fontsize=8)
            ax.set_xlabel("pre-training step")
        axes[0][0].set_ylabel(label, fontsize=7)
        axes[0][0].legend(fontsize=7)
        fig.savefig(out / f"collapse_{metric}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    return [f"collapse_{metric}.png" for metric in COLLAPSE_MEASURES]


def collapse_md(records, seeds):
    """The collapse study's tables: each measure at step 0 and late (the last third), mean ± std over seeds."""
    thirds = lambda r, i: float(np.mean(np.array_split(np.array(trained(r, "read_share"), dtype=float), 3)[i]))
    shares = {"read share, step 0": lambda r: at_step0(r, "read_share"), "late": lambda r: late(r, "read_share"),
              "random spans of the last h: 2.5%": lambda r: r["read_share_chance"][-1][1],
              "97.5%": lambda r: r["read_share_chance"][-1][2],
              "late percentile among them": lambda r: late(r, "read_share_percentile"),
              "gain": lambda r: gain(r, "read_share"), "step-0 span, late": lambda r: late(r, "read_share_fixed"),
              "its gain": lambda r: gain(r, "read_share_fixed"),
              "overlap of the spans, late": lambda r: late(r, "read_span_overlap")}
    settling = {"MLM loss": lambda r: r["mlm"][-1],
                **{f"read share, {third} third": lambda r, i=i: thirds(r, i)
                   for i, third in enumerate(("first", "middle", "last"))},
                **{f"{label}, {when}": lambda r, k=k, f=f: f(r, k) for label, k in
                   (("participation ratio", "pr"), ("beyond two directions", "pr_rest"),
                    ("RC, shared grouping", "rc_shared"))
                   for when, f in (("step 0", at_step0), ("late", late))}}
    runs = [(f"{m}, N/d {n}/{COLLAPSE_CONFIG['d_model']}", collapse_name(m, n))
            for n in COLLAPSE_N for m in COLLAPSE_MODELS]
    lines = []
    for title, columns in (("The collapse study: shares of the router's input h (mean ± std over seeds; late = "
                            "the last third of training)", shares),
                           ("Does it settle? The read share over thirds of training after step 0, and the rest",
                            settling)):
        lines += ["", f"## {title}", "", "| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for label, run in runs:
            if any((run, s) in records for s in seeds):
                lines.append(f"| {label} | " + " | ".join(
                    fmt_mean_std([f(records[run, s]) for s in seeds if (run, s) in records]) for f in columns.values())
                    + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The summary: the paper's tables, the claims and their verdicts


def code_version():
    """The commit the code came from, and whether tracked files were changed since (for the summary)."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, check=True).stdout
        changed = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no").strip() else ""
        return f"commit {git('rev-parse', '--short', 'HEAD').strip()}{changed}"
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def summary_md(records, claims, args, models, minutes):
    seeds, n = args.seeds, len(args.seeds)
    per_seed = lambda model, f: [f(records[model, s]) for s in seeds if (model, s) in records]
    lines = [f"# The paper's findings in miniature: `{' '.join(['python reproduce.py'] + sys.argv[1:])}`", "",
             f"{n} seeds ({' '.join(map(str, seeds))}); code: {code_version()}; this invocation took {minutes:.0f} min "
             "(runs finished before it are reused).", "",
             "## Claims", "", "The rule, fixed before the runs: reproduced when every seed's difference has the "
             "paper's sign, not reproduced when every seed's has the opposite sign, else inconclusive; were the "
             f"signs coin flips, each of the first two would happen once in 2^{n} = {2 ** n} "
             f"(under {MIN_SEEDS} seeds: no verdict).", "",
             "| claim | paper | measured (mean ± std over seeds) | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['id']}: {c['claim']} | {c['paper']} | {c['measured']} | **{c['verdict']}** |" for c in claims]
    if args.collapse:
        return "\n".join(lines) + "\n" + collapse_md(records, seeds)
    lines += ["", "## Table 2: validation MLM loss at the end of pre-training, and the routing analyses (RC, RF: "
              "mean over the second half of the evaluations)", "",
              "| model | MLM loss | RC (Eq. 10) | RC, trace variant | RF | experts used | tau |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    used = lambda r: sum(x > 0 for x in r["expert_load"][0]) if r["expert_load"] else None  # experts with tokens
    for m in [m for m in models if not m.endswith("-unfrozen")]:  # that one shares xmoe-sigmoid's pre-training
        if any((m, s) in records for s in seeds):
            lines.append(f"| {m} | " + " | ".join(fmt_mean_std(per_seed(m, lambda r, k=k: value(r, k)))
                                                  for k in ("mlm", "rc", "rc_trace", "rf"))
                         + f" | {fmt_mean_std(per_seed(m, used))} | {fmt_mean_std(per_seed(m, lambda r: r['tau'][-1]))}"
                         " |")
    if args.tasks:
        lines += ["", "## Table 1: zero-shot scores (x100; mean ± std over seeds of each run's mean over "
                  f"{len(FT_SEEDS)} fine-tuning seeds), and IC (second half of fine-tuning, mean over tasks)", "",
                  "| model | " + " | ".join(args.tasks) + " | Avg | IC |", "|---|" + "---:|" * (len(args.tasks) + 2)]
        for m in models:
            if any((m, s) in records and records[m, s]["tasks"] for s in seeds):
                cells = [fmt_mean_std(per_seed(m, lambda r, t=t: np.mean(r["tasks"][t]["avg_metric"])))
                         for t in args.tasks]
                cells += [fmt_mean_std(per_seed(m, lambda r, k=k: value(r, k))) for k in ("avg", "ic")]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# main


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    a = p.add_argument
    a("--preset", default="mini", choices=list(PRESETS), help="the model of every run (default mini: small at half "
      "the width, so that the study fits an hour on 2 CPU cores)")
    a("--steps", type=int, help=f"pre-training steps per run, batches of 16 x max_len (default {STUDY['steps']}; "
      f"--collapse {COLLAPSE_TRAINING['steps']})")
    a("--seeds", type=int, nargs="+", help="study seeds: initialisation and batches of each pre-training run "
      "(default 1 2 3; --collapse: see there)")
    a("--tasks", nargs="*", help="synthetic XTREME tasks to fine-tune on (default udpos pawsx; --quick: none); "
      "any of udpos panx pawsx xquad")
    a("--max-train", type=int, default=600, help="English training examples per fine-tuning run (default 600)")
    a("--out", default="results", type=Path, help="where the runs, summary.json, summary.md and figures go")
    a("--jobs", type=int, help="runs at a time (default: the cores on a CPU, 1 on a GPU); threads are shared out")
    a("--quick", action="store_true", help="the pre-training claims only: softmax SMoE and X-MoE, no fine-tuning "
      "(the same runs as the full study, which reuses them)")
    a("--ablations", action="store_true", help="also Table 3, sigmoid X-MoE without dimension reduction, without "
      "L2 normalisation (then tau is 1 and fixed, as for SMoE: train_mlm.py --no-l2-norm) and without frozen "
      "routing, and Table 4, d_e = N/4, N, 2N, 4N")
    a("--collapse", action="store_true", help="the collapse study instead, no fine-tuning: mini at d 96, SMoE, SMoE "
      f"--detach-route and X-MoE at N = {', '.join(map(str, COLLAPSE_N))}, {COLLAPSE_TRAINING['steps']} steps, seeds "
      f"{' '.join(map(str, COLLAPSE_SEEDS))}; with --quick SMoE and --detach-route at N = "
      f"{', '.join(map(str, QUICK_COLLAPSE_N))}, seeds {' '.join(map(str, QUICK_COLLAPSE_SEEDS))} (8 to 18 "
      "min)")
    a("--device", default="cpu", help="cpu (default) or cuda")
    return p


def main(argv=None):
    t0 = time.time()
    args = get_parser().parse_args(argv)
    args.training = dict(COLLAPSE_TRAINING if args.collapse else STUDY)
    args.steps = args.training["steps"] = args.steps or args.training["steps"]
    evals = COLLAPSE_EVALS if args.collapse else EVALS
    args.training.update(warmup=max(1, args.steps // 10), eval_every=max(1, args.steps // evals))
    collapse_seeds = QUICK_COLLAPSE_SEEDS if args.quick else COLLAPSE_SEEDS
    args.seeds = args.seeds or (collapse_seeds if args.collapse else [1, 2, 3])
    args.tasks = args.tasks if args.tasks is not None else ([] if args.quick or args.collapse else ["udpos", "pawsx"])
    args.jobs = args.jobs or (1 if args.device.startswith("cuda") else os.cpu_count() or 1)
    if args.steps < 1 or args.jobs < 1 or not set(args.tasks) <= {"udpos", "panx", "pawsx", "xquad"}:
        raise BadInput("--steps and --jobs must be at least 1, --tasks among udpos panx pawsx xquad")
    if args.ablations and (args.quick or args.collapse or not args.tasks):
        raise BadInput("--ablations compares fine-tuning scores: it needs --tasks, and neither --quick nor --collapse")
    if args.collapse and args.tasks:
        raise BadInput("--collapse measures pre-training only: drop --tasks")
    if args.collapse:
        study, specs = collapse_study(args.quick), collapse_claims()
    else:
        study = {m: MODELS[m] for m in (["smoe-softmax", "xmoe-softmax"] if args.quick else MODELS)}
        study.update(ablations(PRESETS[args.preset].n_experts) if args.ablations else {})
        specs = CLAIMS + (ABLATION_CLAIMS if args.ablations else [])
    # the corpus, prepared here before the runs start (they would take turns at it)
    prepare_corpus(synthetic_corpus(SYNTHETIC_DIR), SYNTHETIC_DIR / "mlm" / "prepared", ByteTokenizer())
    pre, fine = jobs_to_run(args, study)
    print(f"{len(study)} models x {len(args.seeds)} seeds: {len(pre)} pre-training and {len(fine)} fine-tuning runs "
          f"to do, {args.jobs} at a time; about {estimate_minutes(args, len(pre), len(fine)):.0f} min "
          f"(a rough estimate); results in {args.out}")
    if pre:
        run_all(pre, args, "pre-training")
    if fine:
        run_all(fine, args, "fine-tuning")
    records = {(m, s): record(args.out, m, s, args.tasks) for m in study for s in args.seeds}
    claims = [claim(records, c, args.seeds) for c in specs]

    # --- figures, tables, summary ---------------------------------------------------------------
    maps = {}
    for model in [] if args.collapse else ["smoe-softmax", "xmoe-softmax"]:
        z, experts = routed_tokens(run_dir(args.out, model, args.seeds[0]) / "ckpt.pt")
        xy, method = map_2d(z)
        maps[model] = xy, experts, method
    series = curves(records, study, args.seeds)
    write_curves(args.out, series, maps)
    try:
        figures = "figures " + " ".join(plot_collapse(args.out, series, records, args.seeds) if args.collapse
                                        else plot(args.out, series, maps, args.tasks[0] if args.tasks else None))
    except ImportError:
        figures = "no figures: pip install matplotlib (and umap-learn), then run again (nothing is retrained)"
    minutes = (time.time() - t0) / 60
    md = summary_md(records, claims, args, study, minutes)
    write_result(args.out / "summary.md", md)
    write_result(args.out / "summary.json", json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "code": code_version(),
        "verdict_rule": " ".join(__doc__.split("The verdict rule, fixed before the runs: ")[1].split("\n\n")[0]
                                 .split()),
        "claims": claims, "minutes": minutes}, indent=1))
    print(md)
    print(f"{figures}; curves.csv, summary.md and summary.json in {args.out}")


if __name__ == "__main__":
    cli(main)
