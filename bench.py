"""
Speed and memory benchmark of the X-MoE sparse layer and of a training step (a benchmark, not a test).

    python bench.py                    # CPU, the full run (a few minutes on a 2-core CPU)
    python bench.py --quick            # smoke run: smaller sizes, fewer repeats (< 30 s on a CPU)
    python bench.py --device cuda      # one GPU (add --quick for the smoke run)
    python bench.py --markdown         # print the tables as Markdown, for README.md

What it measures, in one run, side by side (DESIGN.md section 8):
  1. MoELayer forward+backward (xmoe routing, softmax gate; 32 experts, d_model 256, d_ffn 1024,
     expert_depth 1) against
       (a) the floor: the same 32 experts run on 32 equal contiguous slices of the tokens (the same
           expert FLOPs, no router, no sort, no scatter), and
       (b) a GShard-style one-hot dispatch written below (tokens x experts x capacity masks, einsum
           dispatch and combine), checked once against MoELayer so that the comparison is honest;
  2. how the cost grows with the number of tokens (2,048 ... 16,384; ideal: linear);
  3. training tokens/s of the `small` MaskedLM against its dense counterpart with the same active
     FLOPs (n_experts=1) and the Dense baseline (routing="dense", no expert FLOPs at all);
  4. peak memory of each forward+backward (CUDA: max_memory_allocated; CPU: the running maximum of
     the allocations and frees that torch.profiler records);
  5. the pre-training data path (corpus.py) on a generated corpus of --data-mb MB (the synthetic
     world's text, repeated): preparation speed with 1 and --workers processes (bytes; SentencePiece
     where installed), and a training run's start-up and peak memory on it against the built-in
     corpus. Its files go to --data-dir (about 3x --data-mb of disk).

The floor, one expert and MoELayer are timed round-robin (one repeat of each in turn), so that load
from other processes hits them alike; the GShard reference is timed after them, because its
GiB-sized temporaries would slow down whichever variant ran next. Each figure is the median of the
repeats after warm-up.
"""

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from corpus import synthetic_corpus
from runtime import build_model, param_groups
from xmoe import MoELayer, XMoEConfig, parameter_counts

# --- flags -----------------------------------------------------------------------------------------

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
parser.add_argument("--quick", action="store_true", help="smoke run: smaller sizes, fewer repeats (< 30 s)")
parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for README.md)")
parser.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="token counts of the layer benchmark (default 2048 4096 8192 16384; quick: 1024 2048 4096)")
parser.add_argument("--seq-len", type=int, default=128, help="sequence length L of the layer input (B, L, d)")
parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations per variant (default 2; quick 1)")
parser.add_argument("--repeats", type=int, default=None,
                    help="timed repeats per variant, median reported (default 7; quick 3)")
parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
parser.add_argument("--capacity-factor", type=float, default=1.0,
                    help="capacity factor c of the GShard reference, capacity = ceil(c T / N) (default 1.0)")
parser.add_argument("--gshard-max-gib", type=float, default=8.0,
                    help="skip the GShard reference where its (T x E x C) tensors would exceed this many GiB")
parser.add_argument("--train-batch", type=int, nargs=2, default=None, metavar=("B", "L"),
                    help="batch of the training benchmark (default 16 128; quick 8 64)")
parser.add_argument("--train-steps", type=int, default=None, help="timed AdamW steps per model (default 6; quick 2)")
parser.add_argument("--seed", type=int, default=0, help="random seed")
parser.add_argument("--only", choices=["layer", "train", "data"], help="run one part: the layer (1, 2, 4), the "
                    "training step (3) or the data path (5); default: all")
parser.add_argument("--data-mb", type=int, default=None, help="size of the generated corpus (default 1024; quick 32)")
parser.add_argument("--data-dir", default="bench_data", help="where the generated corpus goes (default bench_data)")
parser.add_argument("--workers", type=int, default=os.cpu_count(), help="preparation processes (default: all cores)")
args = parser.parse_args()

Q = args.quick
TOKENS = args.tokens or ([1024, 2048, 4096] if Q else [2048, 4096, 8192, 16384])
WARMUP = args.warmup if args.warmup is not None else (1 if Q else 2)
REPEATS = args.repeats if args.repeats is not None else (3 if Q else 7)
TRAIN_B, TRAIN_L = args.train_batch or ((8, 64) if Q else (16, 128))
TRAIN_STEPS = args.train_steps if args.train_steps is not None else (2 if Q else 6)

# --- setup -----------------------------------------------------------------------------------------

device = torch.device(args.device)
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit("bench.py: --device cuda was asked for but torch sees no CUDA GPU; run without --device for the CPU")
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
t_start = time.perf_counter()

# the layer of the benchmark: 32 experts of one FFN sublayer each, xmoe routing, softmax gate
CFG = XMoEConfig.preset("small", d_model=256, d_ffn=1024, n_experts=32, expert_depth=1, n_heads=4, dropout=0.0)
N, D = CFG.n_experts, CFG.d_model


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_average():
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


# --- timing ----------------------------------------------------------------------------------------


def time_round_robin(fns, warmup=WARMUP, repeats=REPEATS):
    """{name: fn} -> {name: (median ms, min ms)}; one call of each fn in turn per repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


# --- peak memory -----------------------------------------------------------------------------------
# CUDA: the growth of torch.cuda.max_memory_allocated over one call. CPU: torch keeps no such counter,
# and the peak RSS is useless (the C allocator keeps freed pages), so we replay the allocation and
# free events that torch.profiler records with profile_memory=True and take the running maximum.


def _cpu_peak_bytes(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # the profiler's internals moved: say so rather than guess
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, current)
    return peak


def peak_memory(fn):
    """Bytes that one call of fn allocates at its peak beyond what was allocated before it (with the
    gradients already allocated, so that backward accumulates into them and they do not count)."""
    gc.collect()
    if device.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(fn)


def fmt_bytes(n):
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# --- the layer and its inputs ----------------------------------------------------------------------

layer = MoELayer(CFG).to(device)


def make_input(T):
    """x (B, L, d) with B * L = T, no padding, a leaf that needs its gradient (as in a real model);
    gy is the upstream gradient. It must be a real tensor: y.sum().backward() would hand the experts
    a stride-0 expanded gradient, which sends the backward GEMMs down a slow path and skews timings."""
    L = min(args.seq_len, T)
    x = torch.randn(T // L, L, D, device=device, requires_grad=True)
    gy = torch.randn(T // L, L, D, device=device)
    return x, gy


def fresh_grads(x):
    """Drop the gradients of the previous step, as a training step does (zero_grad(set_to_none=True))."""
    layer.zero_grad(set_to_none=True)
    x.grad = None


def moe_step(x, gy):
    """The MoELayer under test: route, sort by expert, run each expert on its slice, index_add back."""
    y, balance = layer(x)
    torch.autograd.backward([y, balance], [gy, torch.ones((), device=device)])


# --- (a) the floor: the same experts on equal contiguous slices ------------------------------------


def floor_step(x, gy):
    """The experts' FLOPs and nothing else: expert i on the i-th of N equal contiguous slices."""
    h, g = x.view(-1, D), gy.view(-1, D)
    outs = [expert(s) for expert, s in zip(layer.experts, h.chunk(N))]
    torch.autograd.backward(outs, list(g.chunk(N)))


def one_expert_step(x, gy):
    """For reference: one expert over all the tokens (one big GEMM per weight instead of N small ones)."""
    layer.experts[0](x.view(-1, D)).backward(gy.view(-1, D))


# --- (b) the GShard-style one-hot dispatch reference -----------------------------------------------
# Top-1 gating as in GShard / fairseq's top1gating (moe/top1gate.py) and its MOELayer: the same router
# (scores, top-1 expert, softmax gate) as MoELayer, then dense one-hot (T, E, C) tensors. Capacity
# factor 1.0 by default: it is fairseq's top-1 default and the cheapest GShard setting (C = T/E), so
# the reference gets its best case; the experts then run on E * C = T slots, the same FLOPs as the
# floor. A token beyond its expert's capacity is dropped (its output is h, as in MoELayer).


def gshard_capacity(T, capacity_factor):
    return math.ceil(capacity_factor * T / N)  # as MoELayer; fairseq: int(c * ceil(T / N)), equal when N | T


def gshard_bytes(T, C):
    """Bytes of one (T, E, C) float32 tensor; the reference keeps about four of them alive."""
    return T * N * C * 4


def gshard_forward(x, C):
    """h + combine(experts(dispatch(h))) with one-hot (T, E, C) dispatch and combine tensors."""
    B, L, d = x.shape
    h = x.reshape(B * L, d)
    r = layer.router(h)  # the same router as MoELayer
    mask = F.one_hot(r.expert, N).to(h.dtype)  # (T, E)
    locations = torch.cumsum(mask, dim=0) - 1  # slot of each token in its expert's buffer, batch order
    mask = mask * (locations < C)  # drop the tokens beyond capacity
    gate = r.gate * mask.sum(dim=1)  # (T,), 0 for a dropped token
    slot = (locations * mask).sum(dim=1).long()  # (T,)
    sec = mask[:, :, None] * F.one_hot(slot, C).to(h.dtype)[:, None, :]  # (T, E, C)
    combine = gate[:, None, None] * sec  # (T, E, C) combine weights
    dispatch = combine.bool().to(h.dtype)  # (T, E, C) dispatch mask
    expert_in = torch.einsum("tec,td->ecd", dispatch, h)  # (E, C, d)
    expert_out = torch.stack([expert(expert_in[e]) for e, expert in enumerate(layer.experts)])  # (E, C, d)
    y = h + torch.einsum("tec,ecd->td", combine, expert_out)  # h + g(s_k) f_k(h) (Eq. 2)
    return y.view(B, L, d), r.balance_loss, int(B * L - mask.sum().item())


def gshard_step(x, gy, C):
    y, balance, _ = gshard_forward(x, C)
    torch.autograd.backward([y, balance], [gy, torch.ones((), device=device)])


# --- the honesty check: GShard reference == MoELayer -----------------------------------------------


def check_gshard(T):
    """Max abs differences of outputs and input gradients: (i) a capacity that drops nothing against
    the dropless MoELayer, (ii) the benchmark's capacity factor against MoELayer with the same factor."""
    x, gy = make_input(T)
    counts = torch.bincount(layer.router(x.detach().view(-1, D)).expert, minlength=N)
    capped = MoELayer(replace(CFG, capacity_factor=args.capacity_factor)).to(device)
    capped.load_state_dict(layer.state_dict())
    lines = []
    for name, ref, C in [("dropless", layer, int(counts.max())),
                         (f"capacity factor {args.capacity_factor:g}", capped, gshard_capacity(T, args.capacity_factor))]:
        x.grad = None
        y_ref, b_ref = ref(x)
        y_ref.backward(gy)
        g_ref, x.grad = x.grad, None
        y_gs, b_gs, dropped = gshard_forward(x, C)
        y_gs.backward(gy)
        lines.append(f"  {name:<22} C={C:<5} dropped {dropped:>4}/{T}: max |y diff| {(y_gs - y_ref).abs().max().item():.2e}, "
                     f"max |dx diff| {(x.grad - g_ref).abs().max().item():.2e}, |balance diff| {(b_gs - b_ref).abs().item():.1e}")
    x.grad = None
    return lines


# --- 1 + 2. the layer at each token count: floor, one expert, MoELayer, GShard ----------------------


def bench_layer(T):
    x, gy = make_input(T)
    C = gshard_capacity(T, args.capacity_factor)
    steps = {"floor": lambda: floor_step(x, gy),
             "one": lambda: one_expert_step(x, gy),
             "moe": lambda: moe_step(x, gy)}
    with_fresh_grads = lambda steps: {k: (lambda step=step: (fresh_grads(x), step())) for k, step in steps.items()}
    times = time_round_robin(with_fresh_grads(steps))
    # GShard is timed after the others, not among them: its GiB-sized temporaries evict the caches
    # and go back to the OS when freed, which would slow down whichever variant ran next
    gshard_fits = 4 * gshard_bytes(T, C) <= args.gshard_max_gib * 2**30
    if gshard_fits:
        steps["gshard"] = lambda: gshard_step(x, gy, C)
        times.update(time_round_robin(with_fresh_grads({"gshard": steps["gshard"]})))
    mems = {}
    for k, step in steps.items():  # the weight gradients exist already: measure activations + temporaries
        fresh_grads(x)
        step()
        mems[k] = peak_memory(step)
    counts = torch.bincount(layer.router(x.detach().view(-1, D)).expert, minlength=N)
    _, _, dropped = gshard_forward(x.detach(), C) if gshard_fits else (None, None, None)
    return dict(T=T, C=C, times=times, mems=mems, counts=counts, dropped=dropped, gshard_fits=gshard_fits)


# --- 3. training tokens/s: small MaskedLM, xmoe against the same active FLOPs and Dense -------------


def train_models():
    small = XMoEConfig.preset("small")
    return {
        f"MaskedLM small, xmoe, {small.n_experts} experts": small,
        "same active FLOPs: n_experts=1": replace(small, n_experts=1),
        "Dense baseline: routing=dense": replace(small, routing="dense"),
    }


def bench_training():
    """Each model's forward, backward and AdamW step on one batch, with the masked-LM loss it returns."""
    ids = torch.randint(4, 260, (TRAIN_B, TRAIN_L), device=device)
    labels = torch.where(torch.rand(TRAIN_B, TRAIN_L, device=device) < 0.15, ids, torch.full_like(ids, -100))
    rows, fns = {}, {}
    for name, cfg in train_models().items():
        model = build_model(cfg).to(device).train()
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(ids, labels).loss.backward()
            opt.step()

        fns[name] = step
        rows[name] = parameter_counts(model)
    times = time_round_robin(fns, warmup=1, repeats=TRAIN_STEPS)
    return {name: (rows[name], times[name]) for name in fns}


# --- 5. the data path: preparing a generated corpus; start-up and memory of a training run on it ----


def write_corpus(folder, mb):
    """About `mb` MB of text: the synthetic world's mlm/<lang>.txt, each repeated in proportion."""
    source = synthetic_corpus(Path(args.data_dir) / "synthetic")
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob("*.txt"))
    total = sum(p.stat().st_size for p in files)
    for p in files:
        text = p.read_bytes()
        with open(folder / p.name, "wb") as f:
            for _ in range(max(1, round(mb * 2**20 / total))):
                f.write(text)
    return source, sum(p.stat().st_size for p in folder.glob("*.txt"))


def prepare_rate(data, workers, spm=None):
    """MB of text per second for a fresh preparation of `data` by train_mlm.py --prepare-only (its
    worker processes start with spawn, which re-runs a script's top level: not this one's)."""
    prepared = data.parent / f"{data.name}-prepared-{workers}"
    shutil.rmtree(prepared, ignore_errors=True)
    size = sum(p.stat().st_size for p in data.glob("*.txt"))
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "train_mlm.py"), "--prepare-only", "--data", str(data),
           "--prepared", str(prepared), "--workers", str(workers), *(["--spm", str(spm)] if spm else [])]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return size / 2**20 / (time.perf_counter() - t0), prepared


# Runs argv[1:] and prints its wall time, its peak resident memory (VmRSS: with the pages of the memory
# maps it has read, which the kernel can drop) and its peak anonymous memory (RssAnon: what the process
# allocated), polled from /proc (Linux), and its exit code
MEASURE = """
import subprocess, sys, time
t, p, peak = time.time(), subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), {}
while p.poll() is None:
    try:
        for line in open(f"/proc/{p.pid}/status"):
            key, _, kb = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                peak[key] = max(peak.get(key, 0), int(kb.split()[0]) * 1024)
    except OSError:
        pass
    time.sleep(0.02)
print(time.time() - t, peak.get("VmRSS", 0), peak.get("RssAnon", 0), p.returncode)
"""


def training_run(data, prepared, steps=20):
    """A `small` run of `steps` steps in its own process: (import s, main to first step s, peak RSS,
    peak anonymous memory)."""
    out = Path(args.data_dir) / "run"
    shutil.rmtree(out, ignore_errors=True)
    script = str(Path(__file__).resolve().parent / "train_mlm.py")
    cmd = [sys.executable, "-c", MEASURE, sys.executable, script, "--data", str(data), "--prepared", str(prepared),
           "--steps", str(steps), "--eval-every", str(steps), "--out", str(out), "--device", args.device]
    wall, rss, anon, rc = subprocess.run(cmd, capture_output=True, text=True).stdout.split()
    if rc != "0":
        sys.exit(f"bench.py: the training run on {data} failed; run it alone: {' '.join(cmd[3:])}")
    imports = subprocess.run([sys.executable, "-c", f"import sys, time; t = time.time(); sys.path.insert(0, "
                              f"{str(Path(script).parent)!r}); import train_mlm; print(time.time() - t)"],
                             capture_output=True, text=True)
    startup = json.loads((out / "log.jsonl").read_text().splitlines()[0])["startup_s"]
    return float(imports.stdout), startup, int(rss), int(anon)


def bench_data():
    mb = args.data_mb or (32 if Q else 1024)
    big = Path(args.data_dir) / f"corpus-{mb}mb"
    source, size = write_corpus(big, mb)
    rates = {"bytes, 1 worker": prepare_rate(big, 1)[0]}
    rate, prepared = prepare_rate(big, args.workers)
    rates[f"bytes, {args.workers} workers"] = rate
    try:
        import sentencepiece
        model = Path(args.data_dir) / "spm"
        sentencepiece.SentencePieceTrainer.train(input=",".join(map(str, sorted(source.glob("*.txt")))),
                                                 model_prefix=str(model), vocab_size=8000, hard_vocab_limit=False,
                                                 minloglevel=2)
        sample = Path(args.data_dir) / "corpus-spm"
        write_corpus(sample, max(1, mb // 16))
        rates["SentencePiece (up to 8,000 pieces), 1 worker"] = prepare_rate(sample, 1, f"{model}.model")[0]
    except ImportError:
        print("  (SentencePiece skipped: pip install sentencepiece)")
    builtin = prepare_rate(source, 1)[1]  # both runs start from prepared files
    runs = {"built-in corpus": training_run(source, builtin),
            f"{size / 2**20:,.0f} MB corpus": training_run(big, prepared)}
    return size, rates, runs


# --- run -------------------------------------------------------------------------------------------

print(f"bench.py on {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
      + f", torch {torch.__version__}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
      + f", {'quick' if Q else 'full'} run: warm-up {WARMUP}, median of {REPEATS}; {load_average()}")
busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
if device.type == "cpu" and busy > 0.5:
    print(f"WARNING: the CPU is busy before we start (1-minute load {busy:.2f}): other processes take cores from "
          f"the {torch.get_num_threads()} threads and the timings will be noisy; compare medians and minima, or "
          f"rerun on an idle machine")
results, train, data = [], None, None
if args.only in (None, "layer"):
    print(f"layer: {N} experts x {CFG.expert_depth} FFN sublayer, d_model {D}, d_ffn {CFG.d_ffn}, "
          f"routing {CFG.routing}, gate {CFG.gate}, float32; GShard capacity factor {args.capacity_factor:g}")
    print(f"GShard reference against MoELayer at {TOKENS[0]:,} tokens:")
    print("\n".join(check_gshard(TOKENS[0])), flush=True)
    for T in TOKENS:
        results.append(bench_layer(T))
        r = results[-1]
        print(f"  {T:>6,} tokens done: " + ", ".join(f"{k} {v[0]:.1f} ms" for k, v in r["times"].items())
              + f"  (expert load min/max {int(r['counts'].min())}/{int(r['counts'].max())})", flush=True)
if args.only in (None, "train"):
    train = bench_training()
    print(f"  training done; {load_average()}", flush=True)
if args.only in (None, "data"):
    data = bench_data()
    print(f"  data path done; {load_average()}", flush=True)

# --- report ----------------------------------------------------------------------------------------

NAMES = {"floor": "floor: experts on equal slices",
         "one": "one expert on all tokens",
         "moe": "MoELayer (index dispatch)",
         "gshard": f"GShard one-hot (c={args.capacity_factor:g})"}


def table(header, rows):
    if args.markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out = [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]
    return "\n".join(out)


if results:
    rows = []
    for r in results:
        floor = r["times"]["floor"][0]
        for k in ["floor", "one", "moe", "gshard"]:
            if k not in r["times"]:
                rows.append([NAMES[k], f"{r['T']:,}", "skipped", "", "", f"needs ~{fmt_bytes(4 * gshard_bytes(r['T'], r['C']))}"])
                continue
            med, mn = r["times"][k]
            rows.append([NAMES[k], f"{r['T']:,}", f"{med:.1f}", f"{mn:.1f}", f"{med / floor:.2f}",
                         fmt_bytes(r["mems"][k])])
    mem_note = "peak mem = " + ("growth of max_memory_allocated" if device.type == "cuda" else
                                "peak of torch's CPU allocations, from torch.profiler")
    mem_note += "; activations and temporaries, weight gradients excluded"
    print(f"\nMoE layer forward+backward ({mem_note}):\n")
    print(table(["what", "tokens", "ms fwd+bwd (median)", "min ms", "x floor", "peak mem"], rows))

if train:
    base = train["same active FLOPs: n_experts=1"][1][0]
    train_rows = [[name, f"{tot / 1e6:.2f} M / {act / 1e6:.2f} M", f"{TRAIN_B}x{TRAIN_L}", f"{med:.0f}",
                   f"{TRAIN_B * TRAIN_L / med * 1e3:,.0f}", f"{med / base:.2f}"]
                  for name, ((tot, act), (med, _)) in train.items()]
    print(f"\nTraining step (AdamW, random tokens, median of {TRAIN_STEPS} steps after 1 warm-up):\n")
    print(table(["model", "params total / active", "batch", "ms/step", "tokens/s", "x same-FLOPs time"], train_rows))

if results:
    big, small_ = results[-1], results[0]
    ideal = big["T"] / small_["T"]
    moe_floor = big["times"]["moe"][0] / big["times"]["floor"][0]
    moe_scale = big["times"]["moe"][0] / small_["times"]["moe"][0]
    key = [["MoELayer / floor", f"{big['T']:,}", f"{moe_floor:.2f}", "<= 1.10", "ok" if moe_floor <= 1.10 else "MISSED"],
           ["MoELayer time ratio", f"{big['T']:,} / {small_['T']:,}", f"{moe_scale:.2f}", f"<= {1.1 * ideal:.1f} (linear {ideal:.1f})",
            "ok" if moe_scale <= 1.1 * ideal else "MISSED"]]
    fitted = [r for r in results if r["gshard_fits"]]
    if len(fitted) >= 2:
        gs_scale = fitted[-1]["times"]["gshard"][0] / fitted[0]["times"]["gshard"][0]
        key.append(["GShard time ratio", f"{fitted[-1]['T']:,} / {fitted[0]['T']:,}", f"{gs_scale:.2f}",
                    f"(linear {fitted[-1]['T'] / fitted[0]['T']:.1f})", "for comparison"])
    if big["gshard_fits"]:
        gs_moe = big["times"]["gshard"][0] / big["times"]["moe"][0]
        key.append(["GShard / MoELayer", f"{big['T']:,}", f"{gs_moe:.1f}", ">= 10", "ok" if gs_moe >= 10 else "MISSED"])
    print("\nKey ratios:\n")
    print(table(["ratio", "tokens", "value", "target", ""], key))
    notes = [f"GShard tokens dropped at c={args.capacity_factor:g}: "
             + ", ".join(f"{r['dropped']}/{r['T']:,}" for r in fitted),
             "largest tensors per dispatch: GShard (T, E, C) float32 = "
             + ", ".join(f"{fmt_bytes(gshard_bytes(r['T'], r['C']))} at {r['T']:,}" for r in results)
             + f" (about 4 alive); MoELayer and floor (T, d_ffn) float32 = {fmt_bytes(big['T'] * CFG.d_ffn * 4)} at {big['T']:,}",
             ]
    print("\n" + "\n".join(("- " if args.markdown else "") + n for n in notes))

if data:
    size, rates, runs = data
    print(f"\nThe data path, a corpus of {size / 2**20:,.0f} MB (the synthetic world repeated):\n")
    print(table(["preparation", "MB of text per second", "per worker"],
                [[k, f"{v:.1f}", f"{v / (args.workers if 'workers' in k else 1):.1f}"] for k, v in rates.items()]))
    print("\n" + table(["training run, small, 20 steps", "import s", "main to first step s", "peak RSS",
                        "peak anonymous"],
                       [[k, f"{i:.1f}", f"{s:.1f}", fmt_bytes(m), fmt_bytes(a)] for k, (i, s, m, a) in runs.items()]))
print(f"\n{load_average()}; wall time {time.perf_counter() - t_start:.0f} s")
