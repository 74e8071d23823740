"""
The paper's findings in miniature: Dense, SMoE and X-MoE (softmax and sigmoid gates) pre-trained on
the same batches from the same initial seed, for several seeds, fine-tuned with frozen routing on the
synthetic world's tasks, and each claim of the paper checked by a rule fixed before the runs.

    python reproduce.py                      # CPU: 5 models x 3 seeds, POS and PAWS-X; see README for the time
    python reproduce.py --quick              # CPU, minutes: the pre-training claims (MLM loss, RC, RF), softmax only
    python reproduce.py --device cuda --jobs 4          # one GPU, four runs at a time
    python reproduce.py --ablations          # also Table 3 (sigmoid X-MoE without dimension reduction, without
                                             # L2 normalisation, without frozen routing) and Table 4 (d_e sweep)
    python reproduce.py --collapse           # CPU: representation collapse at N/d = 1/4, 1/8, 1/16, 3 seeds,
                                             # with the --detach-route ablation and Dense (reuses --quick's runs)
    python reproduce.py --collapse --quick   # CPU, a classroom's 15 min: N/d = 1/4 and 1/16, one seed

Every run is a subprocess of train_mlm.py or finetune.py, with their flags; independent runs go in
parallel (--jobs, the cores shared out). Interrupted, it continues where it stopped: a finished run is
not redone, a pre-training run continues from its last checkpoint. Writes into --out (results/):
  runs/<model>/seed<k>/        train_mlm.py's log.jsonl and ckpt.pt, and <task>/ from finetune.py
  runs/<model>-seed<k>.json    one record per pre-training run: curves and fine-tuning scores
  summary.json, summary.md     the tables in the paper's layout and a verdict per claim
  fig2a.png ... fig3b.png      with matplotlib (UMAP maps with umap-learn, else PCA); else curves.csv,
                               map_<model>.csv and a line saying how to get the figures
  collapse_<measure>.png       --collapse: each measure through training and against N/d

Every pre-training run is evaluated at step 0, before its first update: for one seed the weights
below the sparse layer are the same for every model, so step 0 is the shared control.

The verdict rule, fixed before the runs: for each claim, d_k is the X-MoE value minus the SMoE value
(or SMoE minus Dense, or one model's value for a claim about one model; `value` says which number of
a run) for study seed k; the runs of a seed share batches and initial seed. The
claim is "reproduced" when d_k has the paper's sign for every seed, "not reproduced" when the mean of
d_k has the opposite sign, and "inconclusive" otherwise (also when a seed has no value); a claim whose
runs are not part of this invocation is "not measured". Nothing is tuned for one of the routers.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
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


# The collapse study (--collapse): does SMoE's router pull h into the span of what it reads (section
# 2.2, Eqs. 4-5), and does X-MoE's router not? N varies at d = 64: N/d = 1/4, 1/8, 1/16 (the paper's
# base: 32/768 = 1/24). SMoE with --detach-route is the causal ablation: the same routing without the
# gradient through the router into h. Dense does not depend on N: one run per seed.
COLLAPSE_N = (16, 8, 4)
QUICK_COLLAPSE_N = (16, 4)  # --collapse --quick, one seed: a classroom's 15 minutes
COLLAPSE_MODELS = {"smoe": MODELS["smoe-softmax"], "xmoe": MODELS["xmoe-softmax"],
                   "smoe-detach": MODELS["smoe-softmax"] + ["--detach-route"]}
COLLAPSE_MEASURES = {"pr": "participation ratio of h", "read_share": "share of h's variance read by the router",
                     "rc_shared": "RC (Eq. 10), shared grouping", "gate": "mean gate g(s_k)"}


def collapse_name(model, n, default_n):
    """The run of `model` with n experts; at the preset's own N, SMoE's and X-MoE's are the main study's runs."""
    return f"{model}-softmax" if n == default_n and model in ("smoe", "xmoe") else f"{model}-N{n}"


def collapse_study(ns, cfg):
    study = {"dense": MODELS["dense"]} if len(ns) == len(COLLAPSE_N) else {}
    for n in ns:
        for model, flags in COLLAPSE_MODELS.items():
            own = n == cfg.n_experts  # the main study's runs
            study[collapse_name(model, n, cfg.n_experts)] = flags + ([] if own else ["--n-experts", str(n)])
    return study


def collapse_claims(ns, cfg):
    """Pre-registered (committed before the runs they judge). Values: see `value`; the smallest N/d
    is the paper's regime."""
    at = lambda model, n=ns[-1]: collapse_name(model, n, cfg.n_experts)
    d = cfg.d_model
    small = f"N/d = {ns[-1]}/{d}"
    return [
        *[(f"collapse-read-share-N{n}", f"N/d = {n}/{d}: SMoE's h gathers in the directions its router reads (e_i) "
           "more than X-MoE's in the directions its router reads (W): share of h's variance there, over step 0's",
           "section 2.2, Eqs. 4-5", (at("smoe", n), at("xmoe", n)), "read_gain", +1) for n in ns],
        ("collapse-detach", f"{small}: without the gradient through the router into h (--detach-route), SMoE's h "
         "gathers less in the directions its router reads", "the mechanism of section 2.2",
         (at("smoe"), at("smoe-detach")), "read_gain", +1),
        ("collapse-n-over-d", f"SMoE's h gathers more in the directions its router reads at N/d = {ns[-1]}/{d} than "
         f"at {ns[0]}/{d}", "section 2.2: collapse from R^d to R^N", (at("smoe"), at("smoe", ns[0])), "read_gain", +1),
        ("collapse-pr-xmoe", f"{small}: SMoE's h has a lower effective dimension (participation ratio, over step "
         "0's) than X-MoE's", "section 2.2: collapse from R^d to R^N", (at("xmoe"), at("smoe")), "pr_ratio", +1),
        *([("collapse-pr-dense", f"{small}: SMoE's h has a lower effective dimension (participation ratio, over "
            "step 0's) than Dense's at the same position", "section 2.2", ("dense", at("smoe")), "pr_ratio", +1)]
          if len(ns) == len(COLLAPSE_N) else []),
        ("collapse-rc-shared", f"{small}: X-MoE's RC (Eq. 10) is larger than SMoE's, the tokens grouped alike "
         "(k-means of the shared step-0 states), over step 0's", "Figure 2c: X-MoE above SMoE",
         (at("xmoe"), at("smoe")), "rc_shared_ratio", +1),
        ("collapse-fig2c-smoe", f"{small}: SMoE's RC (Eq. 10, own routing) falls through the second half of "
         "pre-training (last minus first evaluation)", "Figure 2c: SMoE descends", (at("smoe"), None), "rc_trend", -1),
        ("collapse-fig2c-xmoe", f"{small}: X-MoE's RC (Eq. 10, own routing) rises through the second half of "
         "pre-training (last minus first evaluation)", "Figure 2c: X-MoE rises", (at("xmoe"), None), "rc_trend", +1),
    ]


def fmt_mean_std(values):
    """mean ± sample std (ddof 1) over the seeds, as finetune.py reports its seeds."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}" if len(v) else "-"


def verdict(diffs, sign):
    """The rule fixed before the runs: d_k (one per seed) against the paper's sign."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) and (np.sign(d) == sign).all():
        return "reproduced"
    if len(d) and np.sign(d.mean()) == -sign:
        return "not reproduced"
    return "inconclusive"


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
    for model, flags in study.items():
        for seed in args.seeds:
            d = run_dir(args.out, model, seed)
            base = (model.removesuffix("-unfrozen"), seed)
            if model.endswith("-unfrozen"):  # Table 3, w/o frozen routing: xmoe-sigmoid, fine-tuned unfrozen
                d = run_dir(args.out, *base)
            elif not pretrained(args.out, model, seed, args.steps):
                resume = ["--resume"] if (d / "ckpt.pt").exists() else []
                pre.append(["train_mlm.py", "--preset", args.preset, "--seed", seed, "--out", d, *flags, *resume,
                            *(f"--{k.replace('_', '-')}={v}" for k, v in args.training.items()), "--device", args.device])
            queued = any(cmd[cmd.index("--out") + 1] == d for cmd in pre)  # a checkpoint still to be made
            key = None if queued or not (d / "ckpt.pt").exists() else checkpoint_key(d / "ckpt.pt")
            for task in args.tasks:
                ft = d / (task + ("-unfrozen" if model.endswith("-unfrozen") else ""))
                done = ft / "results.json"  # and made from this very checkpoint
                if key is None or not done.exists() or json.loads(done.read_text()).get("pretraining") != key:
                    fine.append(["finetune.py", "--task", task, "--data", SYNTHETIC_DIR, "--init", d / "ckpt.pt", "--out", ft,
                                 "--seeds", *FT_SEEDS, *FINETUNE, "--max-train", args.max_train, "--device", args.device,
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
    cfg = PRESETS[args.preset]
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


SERIES = {"rc": "rc", "rc_trace": "rc_trace", "rf": "rf", "tau": "tau", "rc_shared": "rc_shared",
          "pr": "participation_ratio", "read_share": "read_share", "read_share_isotropic": "read_share_isotropic",
          "gate": "gate"}  # a record's curves: the log's figure of the first sparse layer (position)
RATIOS = {"rc_ratio": "rc", "rc_shared_ratio": "rc_shared", "pr_ratio": "pr", "read_gain": "read_share",
          "gate_ratio": "gate"}  # a claim's value: the series' second half over its step-0 value


def second_half(values):
    v = [x for x in values[len(values) // 2:] if x is not None]
    return float(np.mean(v)) if v else None


def trained(rec, series):
    """The series' values after the step-0 evaluation (the shared initial state, a control)."""
    return rec[series][1:] if rec["steps"][0] == 0 else rec[series]


def at_step0(rec, series):
    return rec[series][0] if rec["steps"][0] == 0 else None


def value(rec, metric):
    """One number per run for the claims, fixed before the runs: the final MLM loss; RC and RF averaged
    over the second half of the evaluations after step 0 (RC moves a lot from one evaluation to the
    next); the collapse measures (participation ratio, read share, RC under the shared grouping) and
    RC as that second-half mean over the run's own step-0 value; RC's trend, its last minus its first
    value of that second half; IC averaged over the second half of the fine-tuning windows, then over
    the tasks; the average zero-shot score."""
    if metric == "mlm":
        return rec["mlm"][-1]
    if metric in ("rc", "rc_trace", "rf"):
        return second_half(trained(rec, metric))
    if metric in RATIOS:
        late, start = second_half(trained(rec, RATIOS[metric])), at_step0(rec, RATIOS[metric])
        return late / start if late is not None and start else None
    if metric == "rc_trend":
        late = [x for x in trained(rec, "rc")[len(trained(rec, "rc")) // 2:] if x is not None]
        return late[-1] - late[0] if len(late) > 1 else None
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
                    "measures it", seeds=0, verdict="not measured", diffs=[])
    if len(pairs) < len(seeds):  # a seed without a value: the rule needs every seed
        return dict(id=cid, claim=text, paper=paper, measured=f"measured in {len(pairs)} of {len(seeds)} seeds",
                    seeds=len(pairs), verdict="inconclusive", diffs=diffs)
    xs, ys = np.array(pairs).T
    measured = (f"{a} {fmt_mean_std(xs)}" + ("" if b is None else f", {b} {fmt_mean_std(ys)}; difference")
                + " per seed " + " ".join(f"{d:+.3g}" for d in diffs))
    return dict(id=cid, claim=text, paper=paper, measured=measured, seeds=len(pairs),
                verdict=verdict(diffs, sign), diffs=diffs)


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


def plot_collapse(out, series, records, ns, cfg, seeds):
    """Per measure: through pre-training at the smallest N/d, each model's step-0 value dashed (and k/d
    dotted for the read share); and its second half over step 0 against N/d."""
    import matplotlib.pyplot as plt
    runs = {m: [collapse_name(m, n, cfg.n_experts) for n in ns] for m in COLLAPSE_MODELS}
    if any(("dense", s) in records for s in seeds):
        runs["dense"] = ["dense"] * len(ns)  # Dense has no N
    ratio = {series: metric for metric, series in RATIOS.items()}
    for metric, label in COLLAPSE_MEASURES.items():
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
        for name, models in runs.items():
            if (metric, models[-1]) not in series:
                continue
            x, ys = series[metric, models[-1]]
            mean = np.nanmean(np.array(ys, dtype=np.float64), 0)
            line, = left.plot(x, mean, label=name)
            left.axhline(mean[0], color=line.get_color(), ls="--", lw=0.8)
            if metric == "read_share":
                left.axhline(records[models[-1], seeds[0]]["read_share_isotropic"][0], color=line.get_color(), ls=":")
            per_n = [np.mean([value(records[m, s], ratio[metric]) or np.nan for s in seeds]) for m in models]
            right.plot(np.array(ns) / cfg.d_model, per_n, "o-", color=line.get_color(), label=name)
        left.set_title(f"N/d = {ns[-1]}/{cfg.d_model}; dashed: step 0" + ("; dotted: k/d" if metric == "read_share" else ""),
                       fontsize=8)
        left.set_xlabel("pre-training step"), left.set_ylabel(label, fontsize=8), left.legend(fontsize=7)
        right.set_xscale("log", base=2), right.set_xlabel("N/d"), right.set_ylabel("second half / step 0", fontsize=8)
        fig.savefig(out / f"collapse_{metric}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    return [f"collapse_{metric}.png" for metric in COLLAPSE_MEASURES]


def collapse_md(records, ns, cfg, seeds):
    """The collapse study's table: each measure at step 0 and over the second half, mean over the seeds."""
    cell = lambda model, key: " → ".join(fmt_mean_std([f(records[model, s], key) for s in seeds if (model, s) in records])
                                         for f in (at_step0, lambda r, k: second_half(trained(r, k))))
    lines = ["", "## The collapse study: the router's input h at step 0 → over the second half (mean ± std over "
             "seeds)", "", "| run | MLM loss | participation ratio | read share (k/d) | RC, shared grouping | "
             "RC, own routing | mean gate |", "|---|---:|---:|---:|---:|---:|---:|"]
    runs = [("dense", "dense")] + [(f"{m}, N/d {n}/{cfg.d_model}", collapse_name(m, n, cfg.n_experts))
                                     for n in ns for m in COLLAPSE_MODELS]
    for label, model in runs:
        if not any((model, s) in records for s in seeds):
            continue
        iso = records[model, seeds[0]]["read_share_isotropic"][0]
        lines.append(f"| {label} | {fmt_mean_std([records[model, s]['mlm'][-1] for s in seeds if (model, s) in records])} | "
                     f"{cell(model, 'pr')} | {cell(model, 'read_share')}" + (f" ({iso:.3f})" if iso else "")
                     + f" | {cell(model, 'rc_shared')} | {cell(model, 'rc')} | {cell(model, 'gate')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The summary: the paper's tables, the claims and their verdicts


def summary_md(records, claims, args, models, minutes):
    seeds = args.seeds
    per_seed = lambda model, f: [f(records[model, s]) for s in seeds if (model, s) in records]
    lines = [f"# The paper's findings in miniature: `{' '.join(['python reproduce.py'] + sys.argv[1:])}`", "",
             f"{len(seeds)} seeds; this invocation took {minutes:.0f} min (runs finished before it are reused).", "",
             "## Claims (verdict rule in reproduce.py's docstring)", "",
             "| claim | paper | measured (mean ± std over seeds) | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['id']}: {c['claim']} | {c['paper']} | {c['measured']} | **{c['verdict']}** |" for c in claims]
    lines += ["", "## Table 2: validation MLM loss at the end of pre-training, and the routing analyses (RC, RF: "
              "mean over the second half of the evaluations)", "",
              "| model | MLM loss | RC (Eq. 10) | RC, trace variant | RF | experts used | tau |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for m in [m for m in models if not m.endswith("-unfrozen")]:  # that one shares xmoe-sigmoid's pre-training
        if any((m, s) in records for s in seeds):
            lines.append(f"| {m} | " + " | ".join(fmt_mean_std(per_seed(m, lambda r, k=k: value(r, k)))
                                                  for k in ("mlm", "rc", "rc_trace", "rf"))
                         + f" | {fmt_mean_std(per_seed(m, lambda r: sum(x > 0 for x in r['expert_load'][0]) if r['expert_load'] else None))}"
                         + f" | {fmt_mean_std(per_seed(m, lambda r: r['tau'][-1]))} |")
    if args.tasks:
        lines += ["", "## Table 1: zero-shot scores (x100; mean ± std over seeds of each run's mean over "
                  f"{len(FT_SEEDS)} fine-tuning seeds), and IC (second half of fine-tuning, mean over tasks)", "",
                  "| model | " + " | ".join(args.tasks) + " | Avg | IC |", "|---|" + "---:|" * (len(args.tasks) + 2)]
        for m in models:
            if any((m, s) in records and records[m, s]["tasks"] for s in seeds):
                cells = [fmt_mean_std(per_seed(m, lambda r, t=t: np.mean(r["tasks"][t]["avg_metric"]))) for t in args.tasks]
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt_mean_std(per_seed(m, lambda r: value(r, 'avg')))} | "
                             f"{fmt_mean_std(per_seed(m, lambda r: value(r, 'ic')))} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# main


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    a = p.add_argument
    a("--preset", default="mini", choices=list(PRESETS), help="the model of every run (default mini: small at half "
      "the width, so that the study fits an hour on 2 CPU cores)")
    a("--steps", type=int, help=f"pre-training steps per run, batches of 16 x max_len (default {STUDY['steps']})")
    a("--seeds", type=int, nargs="+", help="study seeds: initialisation and batches of each pre-training run "
      "(default 1 2 3)")
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
    a("--collapse", action="store_true", help="the collapse study instead: SMoE, X-MoE and SMoE with "
      f"--detach-route at N = {', '.join(map(str, COLLAPSE_N))} (mini: d 64), and Dense, no fine-tuning; with --quick "
      f"N = {', '.join(map(str, QUICK_COLLAPSE_N))} and one seed, without Dense (a classroom's 15 minutes)")
    a("--device", default="cpu", help="cpu (default) or cuda")
    return p


def main(argv=None):
    t0 = time.time()
    args = get_parser().parse_args(argv)
    args.training = dict(STUDY)
    args.steps = args.training["steps"] = args.steps or args.training["steps"]
    args.training.update(warmup=max(1, args.steps // 10), eval_every=max(1, args.steps // EVALS))
    args.seeds = args.seeds or ([1] if args.collapse and args.quick else [1, 2, 3])
    args.tasks = args.tasks if args.tasks is not None else ([] if args.quick or args.collapse else ["udpos", "pawsx"])
    args.jobs = args.jobs or (1 if args.device.startswith("cuda") else os.cpu_count() or 1)
    if args.steps < 1 or args.jobs < 1 or not set(args.tasks) <= {"udpos", "panx", "pawsx", "xquad"}:
        raise BadInput("--steps and --jobs must be at least 1, --tasks among udpos panx pawsx xquad")
    if args.ablations and (args.quick or args.collapse or not args.tasks):
        raise BadInput("--ablations compares fine-tuning scores: it needs --tasks, and neither --quick nor --collapse")
    if args.collapse and args.tasks:
        raise BadInput("--collapse measures pre-training only: drop --tasks")
    names = ["smoe-softmax", "xmoe-softmax"] if args.quick else list(MODELS)
    study = {m: MODELS[m] for m in names}
    cfg = PRESETS[args.preset]
    ns = QUICK_COLLAPSE_N if args.quick else COLLAPSE_N
    if args.collapse:
        if cfg.n_experts not in ns:
            raise BadInput(f"--collapse varies N around the preset's own {cfg.n_experts} experts: use --preset mini")
        study = collapse_study(ns, cfg)
    if args.ablations:
        study.update(ablations(cfg.n_experts))
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
    specs = CLAIMS + (ABLATION_CLAIMS if args.ablations else []) + (collapse_claims(ns, cfg) if args.collapse else [])
    claims = [claim(records, c, args.seeds) for c in specs]

    # --- figures, tables, summary ---------------------------------------------------------------
    maps = {}
    for model in ("smoe-softmax", "xmoe-softmax"):
        z, experts = routed_tokens(run_dir(args.out, model, args.seeds[0]) / "ckpt.pt")
        xy, method = map_2d(z)
        maps[model] = xy, experts, method
    series = curves(records, study, args.seeds)
    write_curves(args.out, series, maps)
    try:
        figures = "figures " + " ".join(plot(args.out, series, maps, args.tasks[0] if args.tasks else None)
                                        + (plot_collapse(args.out, series, records, ns, cfg, args.seeds)
                                           if args.collapse else []))
    except ImportError:
        figures = "no figures: pip install matplotlib (and umap-learn), then run again (nothing is retrained)"
    minutes = (time.time() - t0) / 60
    md = summary_md(records, claims, args, study, minutes)
    if args.collapse:
        md += collapse_md(records, ns, cfg, args.seeds)
    write_result(args.out / "summary.md", md)
    write_result(args.out / "summary.json", json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "verdict_rule": __doc__.split("The verdict rule, fixed before the runs: ")[1].split("\n\n")[0].replace("\n", " "),
        "claims": claims, "minutes": minutes}, indent=1))
    print(md)
    print(f"{figures}; curves.csv, summary.md and summary.json in {args.out}")


if __name__ == "__main__":
    cli(main)
