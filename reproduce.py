"""
The paper's findings in miniature: Dense, SMoE and X-MoE (softmax and sigmoid gates) pre-trained on
the same batches from the same initial seed, for several seeds, fine-tuned with frozen routing on the
synthetic world's tasks, and each claim of the paper checked by a rule fixed before the runs.

    python reproduce.py                      # CPU: 5 models x 3 seeds, POS and PAWS-X; see README for the time
    python reproduce.py --quick              # CPU, minutes: the pre-training claims (MLM loss, RC, RF), softmax only
    python reproduce.py --device cuda --jobs 4          # one GPU, four runs at a time
    python reproduce.py --ablations          # also Table 3 (sigmoid X-MoE without dimension reduction, without
                                             # L2 normalisation, without frozen routing) and Table 4 (d_e sweep)

Every run is a subprocess of train_mlm.py or finetune.py, with their flags; independent runs go in
parallel (--jobs, the cores shared out). Interrupted, it continues where it stopped: a finished run is
not redone, a pre-training run continues from its last checkpoint. Writes into --out (results/):
  runs/<model>/seed<k>/        train_mlm.py's log.jsonl and ckpt.pt, and <task>/ from finetune.py
  runs/<model>-seed<k>.json    one record per pre-training run: curves and fine-tuning scores
  summary.json, summary.md     the tables in the paper's layout and a verdict per claim
  fig2a.png ... fig3b.png      with matplotlib (UMAP maps with umap-learn, else PCA); else curves.csv,
                               map_<model>.csv and a line saying how to get the figures

The verdict rule, fixed before the runs: for each claim, d_k is the X-MoE value minus the SMoE value
(or SMoE minus Dense) for study seed k; the two runs of a seed share batches and initial seed. The
claim is "reproduced" when d_k has the paper's sign for every seed, "not reproduced" when the mean of
d_k has the opposite sign, and "inconclusive" otherwise. Nothing is tuned for one of the routers.
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

from corpus import (SYNTHETIC_DIR, ByteTokenizer, make_tokenizer, open_corpus, prepare_corpus, read_manifest,
                    synthetic_corpus, validation_rows)
from train_mlm import BadInput, build_model, cli, load_checkpoint, write_atomic
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
            for task in args.tasks:
                ft = d / (task + ("-unfrozen" if model.endswith("-unfrozen") else ""))
                done = ft / "results.json"  # and newer than the checkpoint it fine-tuned
                if not (done.exists() and done.stat().st_mtime_ns > (d / "ckpt.pt").stat().st_mtime_ns):
                    fine.append(["finetune.py", "--task", task, "--data", SYNTHETIC_DIR, "--init", d / "ckpt.pt", "--out", ft,
                                 "--seeds", *FT_SEEDS, *FINETUNE, "--max-train", args.max_train, "--device", args.device,
                                 *(["--no-freeze-moe"] if model.endswith("-unfrozen") else [])])
    return pre, fine


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
    rec = {"model": model, "seed": seed, "steps": [r["step"] for r in evals],
           "mlm": [r["val_mlm_loss"] for r in evals], "rc": [r["rc"][0] if r["rc"] else None for r in evals],
           "rc_trace": [r["rc_trace"][0] if r["rc_trace"] else None for r in evals],
           "rf": [r["rf"][0] if r["rf"] else None for r in evals], "tau": [r["tau"][0] if r["tau"] else None for r in evals],
           "expert_load": evals[-1]["expert_load"], "tasks": {}}
    for task in tasks:
        res = json.loads((d / (task + ("-unfrozen" if unfrozen else "")) / "results.json").read_text())
        rec["tasks"][task] = {"avg_metric": [s["avg_metric"] for s in res["seeds"].values()],
                              "ic": res["ic"], "ic_curve": res["ic_curve"]}
    if not unfrozen:
        write_atomic(out / "runs" / f"{model}-seed{seed}.json", json.dumps(rec, indent=1))
    return rec


def second_half(values):
    v = [x for x in values[len(values) // 2:] if x is not None]
    return float(np.mean(v)) if v else None


def value(rec, metric):
    """One number per run for the claims: the final MLM loss; RC and RF averaged over the second half
    of the evaluations (RC moves a lot from one evaluation to the next); IC averaged over the second
    half of the fine-tuning windows, then over the tasks; the average zero-shot score."""
    if metric == "mlm":
        return rec["mlm"][-1]
    if metric in ("rc", "rc_trace", "rf"):
        return second_half(rec[metric])
    if not rec["tasks"]:
        return None
    if metric == "ic":
        ics = [second_half([v for _, v in t["ic_curve"]]) for t in rec["tasks"].values()]
        return float(np.mean(ics)) if ics and None not in ics else None
    return float(np.mean([np.mean(t["avg_metric"]) for t in rec["tasks"].values()]))  # avg


def claim(records, spec, seeds):
    cid, text, paper, (a, b), metric, sign = spec
    pairs = [(value(records[a, s], metric), value(records[b, s], metric)) for s in seeds
             if (a, s) in records and (b, s) in records]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    diffs = [x - y for x, y in pairs]
    if not pairs:
        return dict(id=cid, claim=text, paper=paper, measured="not measured in this run", seeds=0,
                    verdict="inconclusive", diffs=[])
    if len(pairs) < len(seeds):  # a seed without a value: the rule needs every seed
        return dict(id=cid, claim=text, paper=paper, measured=f"measured in {len(pairs)} of {len(seeds)} seeds",
                    seeds=len(pairs), verdict="inconclusive", diffs=diffs)
    xs, ys = np.array(pairs).T
    measured = (f"{a} {fmt_mean_std(xs)}, {b} {fmt_mean_std(ys)}; difference per seed " + " ".join(f"{d:+.3g}" for d in diffs))
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
    for i in range(0, len(rows), 32):
        pad = rows[i:i + 32] == tok.pad
        r = model(rows[i:i + 32], pad_mask=pad).routing[0]
        z.append(r.projected[~pad])
        e.append(r.experts[~pad])
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
        for metric in ("rc", "rc_trace", "rf", "mlm"):
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
    a("--device", default="cpu", help="cpu (default) or cuda")
    return p


def main(argv=None):
    t0 = time.time()
    args = get_parser().parse_args(argv)
    args.training = dict(STUDY)
    args.steps = args.training["steps"] = args.steps or args.training["steps"]
    args.training.update(warmup=max(1, args.steps // 10), eval_every=max(1, args.steps // EVALS))
    args.seeds = args.seeds or [1, 2, 3]
    args.tasks = args.tasks if args.tasks is not None else ([] if args.quick else ["udpos", "pawsx"])
    args.jobs = args.jobs or (1 if args.device.startswith("cuda") else os.cpu_count() or 1)
    if args.steps < 1 or args.jobs < 1 or not set(args.tasks) <= {"udpos", "panx", "pawsx", "xquad"}:
        raise BadInput("--steps and --jobs must be at least 1, --tasks among udpos panx pawsx xquad")
    if args.ablations and (args.quick or not args.tasks):
        raise BadInput("--ablations compares fine-tuning scores: it needs --tasks, and not --quick")
    names = ["smoe-softmax", "xmoe-softmax"] if args.quick else list(MODELS)
    study = {m: MODELS[m] for m in names}
    if args.ablations:
        study.update(ablations(PRESETS[args.preset].n_experts))
    # the corpus, prepared once here: the runs that share it would race to prepare it
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
    claims = [claim(records, c, args.seeds) for c in CLAIMS + (ABLATION_CLAIMS if args.ablations else [])]

    # --- figures, tables, summary ---------------------------------------------------------------
    maps = {}
    for model in ("smoe-softmax", "xmoe-softmax"):
        z, experts = routed_tokens(run_dir(args.out, model, args.seeds[0]) / "ckpt.pt")
        xy, method = map_2d(z)
        maps[model] = xy, experts, method
    series = curves(records, study, args.seeds)
    write_curves(args.out, series, maps)
    try:
        figures = "figures " + " ".join(plot(args.out, series, maps, args.tasks[0] if args.tasks else None))
    except ImportError:
        figures = "no figures: pip install matplotlib (and umap-learn), then run again (nothing is retrained)"
    minutes = (time.time() - t0) / 60
    md = summary_md(records, claims, args, study, minutes)
    write_atomic(args.out / "summary.md", md)
    write_atomic(args.out / "summary.json", json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "verdict_rule": __doc__.split("The verdict rule, fixed before the runs: ")[1].split("\n\n")[0].replace("\n", " "),
        "claims": claims, "minutes": minutes}, indent=1))
    print(md)
    print(f"{figures}; curves.csv, summary.md and summary.json in {args.out}")


if __name__ == "__main__":
    cli(main)
