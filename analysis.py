"""
The paper's analyses (section 4.5) and the measures of representation collapse with their controls,
and the evaluation that computes them on a validation set during pre-training.

    from analysis import representation_collapse, routing_fluctuation, inter_run_consistency
    rc = representation_collapse(hidden, experts)        # Eq. 10: hidden (T, d), experts (T,)
    with observe(model) as seen:                         # the router's inputs and outputs, by forward hooks
        model(input_ids, pad_mask=pad)                   # seen.hidden[l] (B, L, d), seen.routed[l] RouterOutput

The model (xmoe.py) computes and records nothing for the analyses: they watch its forward passes
through hooks, so that training pays nothing for them.

Why controls: Eq. 10 groups the tokens by each router's own choice, so it depends on the router's
geometry as well as on h (X-MoE decides from d_e = N/2 directions). Every run is therefore evaluated
at step 0, where Dense, SMoE and X-MoE of one seed share every weight below the sparse layer
(MaskedLM.initialize), and the router's input h is measured without reference to any router: its
effective dimension, Eq. 10 under one grouping shared by the models compared, and the share of its
variance in the directions the router reads, against the share of random directions (chance), in the
router's current span and in its span at step 0.
"""

import math
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from corpus import bert_mask, validation_rows
from xmoe import upcast

# ------------------------------------------------------------------------------------------------
# Section 4.5: representation collapse (Eq. 10), routing fluctuation, inter-run consistency


def representation_collapse(hidden, experts, trace=False):
    """RC = Tr(Sigma_W Sigma_B^+) (Eq. 10, Zhu et al. 2021) of hidden states grouped by the expert
    they were routed to. Sigma_W: within-class covariance averaged over all tokens; Sigma_B:
    covariance of the class means around the global mean over the classes present. Larger = less
    collapse. hidden: (T, d), experts: (T,). Float64 throughout.

    Sigma_B has rank C - 1 at most and Eq. 10 divides by each of its eigenvalues, so the least
    separated direction of the class means can carry most of RC. trace=True gives a labelled variant,
    not the paper's: Tr(Sigma_W) / Tr(Sigma_B), the same within/between comparison without that."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    y = experts.detach().reshape(-1)
    classes, y = torch.unique(y, return_inverse=True)
    C, T = len(classes), h.shape[0]
    counts = torch.bincount(y, minlength=C).double()  # (C,)
    means = torch.zeros(C, h.shape[1], dtype=torch.float64).index_add_(0, y, h) / counts[:, None]  # (C, d)
    centred = h - means[y]
    sigma_w = centred.t() @ centred / T
    between = means - h.mean(dim=0)
    sigma_b = between.t() @ between / C
    if trace:
        return (torch.trace(sigma_w) / torch.trace(sigma_b)).item()
    return torch.trace(sigma_w @ torch.linalg.pinv(sigma_b)).item()  # Eq. 10


def routing_fluctuation(prev_experts, experts):
    """RF ratio: the fraction of the same tokens whose top-1 expert changed between two checkpoints.
    Positions marked -1 (padding) are not tokens and are not counted."""
    prev_experts, experts = torch.as_tensor(prev_experts), torch.as_tensor(experts)
    if prev_experts.shape != experts.shape:
        raise ValueError(f"RF needs the same tokens: shapes {tuple(prev_experts.shape)} and {tuple(experts.shape)}")
    real = experts >= 0
    return (prev_experts[real] != experts[real]).double().mean().item()


def expert_load(experts, n_experts):
    """Tokens per expert, l = [n_1, ..., n_N] (padding, marked -1, is not counted)."""
    experts = torch.as_tensor(experts).reshape(-1)
    return torch.bincount(experts[experts >= 0], minlength=n_experts)


def inter_run_consistency(loads):
    """IC = sum_{i,j} rho(l_i, l_j) / m^2: the mean of the m x m matrix of Pearson correlations between
    the expert-load vectors of m runs. loads: (m, N). A constant load vector has no correlation (NaN)."""
    loads = torch.as_tensor(loads, dtype=torch.float64)
    centred = loads - loads.mean(dim=1, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True)
    return (unit @ unit.t()).mean().item()


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


# ------------------------------------------------------------------------------------------------
# Router-neutral measures of collapse (section 2.2: SMoE's gate gradient pulls h toward span{e_i})


def participation_ratio(hidden, drop=0):
    """PR = (sum_j lambda_j)^2 / sum_j lambda_j^2, lambda the eigenvalues of the covariance of hidden
    (T, d): the effective dimension, d for isotropic data, r for data spread evenly over r directions;
    collapse lowers it. Float64. drop > 0 leaves out the `drop` largest eigenvalues: where one or two
    directions hold nearly all of h's variance (in every model here, Dense too), PR is 1 to 2 whatever
    the other directions do, while the PR of the rest still falls towards N if they collapse onto N."""
    cov = torch.cov(hidden.detach().double().reshape(-1, hidden.shape[-1]).t())  # (d, d); its scale cancels
    lam = torch.linalg.eigvalsh(cov).clamp(min=0)[:cov.shape[0] - drop]  # ascending: the largest left out
    return (lam.sum() ** 2 / lam.square().sum()).item()


def subspace_share(hidden, basis):
    """sum_t |P c_t|^2 / sum_t |c_t|^2, c = hidden (T, d) minus its mean, P the orthogonal projector on
    the span of basis's rows (k, d): the share of the centred variance in that span, k/d in expectation
    for isotropic data. Only the span counts (scale, non-orthogonality and rank deficiency do not)."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    c = h - h.mean(dim=0)
    u, s, _ = torch.linalg.svd(basis.detach().to(h).t(), full_matrices=False)  # (d, k) left vectors
    q = u[:, s > s.max() * max(basis.shape) * torch.finfo(torch.float64).eps]  # (d, rank) orthonormal
    return ((c @ q).square().sum() / c.square().sum()).item()


def random_shares(hidden, k, draws=1000, seed=0):
    """subspace_share of hidden (T, d) in `draws` uniformly random k-dimensional subspaces of R^d, each
    the span of a (d, k) standard normal matrix from a torch.Generator seeded `seed`. With Q (d, k)
    orthonormal and C the centred states' scatter matrix, the share is tr(Q^T C Q) / tr(C). -> (draws,)"""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    c = h - h.mean(dim=0)
    scatter, g = c.t() @ c, torch.Generator().manual_seed(seed)  # (d, d)
    shares = []
    for n in [100] * (draws // 100) + [draws % 100]:  # (100, d, k) at a time: memory stays small
        q = torch.linalg.qr(torch.randn(n, len(scatter), k, generator=g, dtype=torch.float64))[0]  # (n, d, k)
        shares.append(((scatter @ q) * q).sum(dim=(1, 2)) / torch.trace(scatter))
    return torch.cat(shares)


def chance_share(hidden, k, draws=1000, seed=0):
    """(mean, low, high): the mean and the 2.5% and 97.5% points of random_shares, where the share of
    h's variance in a router's k read directions would fall by chance, for this h. The mean is k/d for
    any h (E[Q Q^T] = (k/d) I); for h on one direction u the share is |Q^T u|^2 ~ Beta(k/2, (d - k)/2).
    When few directions hold h's variance the band is wide, so a share is read against it, not k/d."""
    return band(random_shares(hidden, k, draws, seed))


def band(shares):
    return shares.mean().item(), shares.quantile(0.025).item(), shares.quantile(0.975).item()


def span_overlap(a, b):
    """|Q_a^T Q_b|_F^2 / k for the spans of the rows of a and b (k, d) each: the mean squared cosine of
    their principal angles; 1 for one span, 0 for orthogonal ones, k/d expected for two random ones.
    Between a router's read directions at step 0 and now: how far the router has turned."""
    qa, qb = (torch.linalg.qr(x.detach().double().t())[0] for x in (a, b))  # (d, k) orthonormal each
    return ((qa.t() @ qb).square().sum() / qa.shape[1]).item()


def shared_grouping(hidden, k, seed=0, iters=100):
    """(T,) long labels in [0, k) of hidden (T, d), on the CPU: k-means, float64 Lloyd's iterations (at
    most `iters`, until no label changes) from a k-means++ start drawn from a torch.Generator seeded
    `seed`. A grouping for RC (Eq. 10) that no router chose: of the step-0 states at the sparse layer,
    identical for Dense, SMoE and X-MoE of one seed (MaskedLM.initialize), it is one partition for all
    models compared, and each token keeps its step-0 label through training."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1]).cpu()
    g = torch.Generator().manual_seed(seed)
    dist2 = lambda c: torch.cdist(h, c, compute_mode="donot_use_mm_for_euclid_dist").square()  # (T, k) exact
    centres = h[torch.randint(len(h), (1,), generator=g)]  # k-means++: the first centre uniformly,
    for _ in range(k - 1):  # each next one with probability proportional to its squared distance
        centres = torch.cat([centres, h[torch.multinomial(dist2(centres).min(1).values, 1, generator=g)]])
    labels = dist2(centres).argmin(1)
    for _ in range(iters):
        n = torch.bincount(labels, minlength=k)[:, None]  # (k, 1); an empty cluster keeps its centre
        centres = torch.where(n > 0, torch.zeros_like(centres).index_add_(0, labels, h) / n.clamp(min=1), centres)
        new = dist2(centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


# ------------------------------------------------------------------------------------------------
# Watching a model: forward hooks on the blocks before each sparse layer and on each router


class Seen(NamedTuple):
    hidden: list  # per forward pass, (B, L, d) per sparse-layer position: its input h (Dense: the same place)
    routed: list  # per forward pass, a RouterOutput per sparse layer, on the real tokens in batch order


@contextmanager
def observe(model):
    """Records what the analyses read from every forward pass of `model` (a MaskedLM or anything with
    its .encoder) inside the block, in block order: the output of each block in moe_after, which is the
    sparse layer's input h, and each router's output. Clear the lists between batches."""
    enc, seen = model.encoder, Seen([], [])
    hooks = [enc.blocks[i - 1].register_forward_hook(lambda m, args, out: seen.hidden.append(out))
             for i in enc.cfg.moe_after]
    hooks += [layer.router.register_forward_hook(lambda m, args, out: seen.routed.append(out))
              for layer in enc.moe.values()]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def counting_experts(model):
    """Yields a (sparse layers, N) long tensor to which every forward pass inside the block adds the
    tokens each router sent to each expert (the expert loads of IC)."""
    layers = list(model.encoder.moe.values())
    counts = torch.zeros(len(layers), model.encoder.cfg.n_experts, dtype=torch.long)

    def count(l):
        def hook(module, args, out):  # a hook that returned a value would replace the router's output
            counts[l] += torch.bincount(out.expert, minlength=counts.shape[1]).cpu()
        return hook
    hooks = [layer.router.register_forward_hook(count(l)) for l, layer in enumerate(layers)]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------------------------------------
# The evaluation of a pre-training run: validation MLM loss per language, expert loads, RC, the
# measures of h; RF is taken by the caller against the previous evaluation's routing


class Validation(NamedTuple):
    ids: np.ndarray  # (V, L) the held-out sequences
    inp: np.ndarray  # (V, L) with BERT masking, fixed for the run
    labels: np.ndarray  # (V, L) -100 where not masked
    lang: np.ndarray  # (V,) language index
    rc_mask: np.ndarray  # (V, L) bool, the tokens RC and the measures of h are taken on


RC_TOKENS = 65536  # validation tokens for RC (Eq. 10), at most: all of them for the synthetic world


def validation_set(corpus, L, seed, tok):
    """The held-out sequences with masks fixed for the run, and an evenly spread subset of their tokens
    for RC."""
    val, lang = validation_rows(corpus, L, tok)
    inp, labels = bert_mask(val, np.random.default_rng([seed, 2**32 - 1]), tok)
    real = np.flatnonzero(val != tok.pad)
    rc_mask = np.zeros(val.shape, dtype=bool)
    rc_mask.flat[real[np.linspace(0, len(real) - 1, min(RC_TOKENS, len(real))).astype(int)]] = True
    return Validation(val, inp, labels, lang, rc_mask)


@torch.no_grad()
def evaluate(model, val, langs, pad, autocast, reference=None, batch=16):
    """-> (routing: the (V, L) top-1 experts per sparse layer, -1 at padding; the figures to log;
    reference: what later evaluations measure against, made at step 0 (reference None) and kept).

    At each sparse-layer position (for Dense, where it would be), the router's input h of the RC
    tokens is measured without reference to a router: its participation ratio (whole, and without its
    two largest directions), and RC (Eq. 10) under the shared grouping, the k-means of the step-0
    states (reference["groups"]). Per sparse layer: RC under its own routing (the paper's); the share
    of h's variance in the k directions the router reads now, with the band and percentile of random
    k-dimensional spans for this h (routers read spans of different k); the share in the directions
    it read at step 0 (reference["read_span"]) and the overlap of the two spans; the mean gate g(s_k).

    What the shares can and cannot show: the current span's share rises when h moves into the span or
    when the router turns toward where h already varies, and cannot tell the two apart. The step-0
    span does not turn: its share rises only when h moves into the directions first read; it misses a
    pull toward where the router has turned since, which the overlap (1: not turned) bounds. SMoE with
    detach_route, whose router turns alike but sends no gradient into h, is the control for both."""
    model.eval()
    device, cfg = next(model.parameters()).device, model.cfg
    ce_lang, n_lang = np.zeros(len(langs)), np.zeros(len(langs))
    experts, gates, hidden = [[] for _ in cfg.sparse_after], [[] for _ in cfg.sparse_after], [[] for _ in cfg.moe_after]
    with observe(model) as seen:
        for i in range(0, len(val.ids), batch):
            rows = slice(i, i + batch)
            labels, pad_mask = (torch.from_numpy(a).to(device) for a in (val.labels[rows], val.ids[rows] == pad))
            with autocast:
                logits = model(torch.from_numpy(val.inp[rows]).to(device), pad_mask=pad_mask).logits
            ce = F.cross_entropy(upcast(logits).transpose(1, 2), labels, ignore_index=-100, reduction="none")
            np.add.at(ce_lang, val.lang[rows], ce.sum(1).cpu().numpy())
            np.add.at(n_lang, val.lang[rows], (labels != -100).sum(1).cpu().numpy())
            keep = torch.from_numpy(val.rc_mask[rows]).to(device)
            for l, h in enumerate(seen.hidden):
                hidden[l].append(upcast(h[keep]).cpu())
            for l, r in enumerate(seen.routed):
                grid = torch.full(pad_mask.shape, -1, dtype=torch.long, device=device)
                grid[~pad_mask] = r.expert  # the router saw the real tokens in this order
                experts[l].append(grid.cpu())
                gates[l].append(r.gate.double().cpu())
            seen.hidden.clear(), seen.routed.clear()
    model.train()
    routing, hidden = [torch.cat(e) for e in experts], [torch.cat(h) for h in hidden]
    rc_mask, routers = torch.from_numpy(val.rc_mask), [layer.router for layer in model.encoder.moe.values()]
    reads = [r.read_subspace().cpu() for r in routers]  # (k, d) each
    if reference is None:  # step 0: the shared grouping, and the directions each router reads at first
        reference = {"groups": [shared_grouping(h, cfg.n_experts, seed=0) for h in hidden], "read_span": reads}
    read = [subspace_share(h, r) for h, r in zip(hidden, reads)]
    chance = [random_shares(h, len(r)) for h, r in zip(hidden, reads)]  # random spans of the same dimension
    return routing, {
        "val_mlm_loss": float(ce_lang.sum() / n_lang.sum()),
        "val_mlm_loss_by_lang": {l: float(c / n) for l, c, n in zip(langs, ce_lang, n_lang) if n > 0},
        "expert_load": [expert_load(e, cfg.n_experts).tolist() for e in routing],
        "rc": [representation_collapse(h, e[rc_mask]) for h, e in zip(hidden, routing)],
        "rc_trace": [representation_collapse(h, e[rc_mask], trace=True) for h, e in zip(hidden, routing)],
        "rc_shared": [representation_collapse(h, g) for h, g in zip(hidden, reference["groups"])],
        "participation_ratio": [participation_ratio(h) for h in hidden],
        "participation_ratio_rest": [participation_ratio(h, drop=2) for h in hidden],
        "read_share": read,  # in the router's current span
        "read_share_chance": [band(s) for s in chance],  # [mean, 2.5%, 97.5%] of random spans
        "read_share_percentile": [(s < x).double().mean().item() for s, x in zip(chance, read)],
        "read_share_fixed": [subspace_share(h, r) for h, r in zip(hidden, reference["read_span"])],  # step 0's span
        "read_span_overlap": [span_overlap(a, b) for a, b in zip(reference["read_span"], reads)],
        "read_share_isotropic": [len(r) / cfg.d_model for r in reads],  # k/d
        "gate": [float(torch.cat(g).mean()) for g in gates],
        "tau": [float(r.tau.detach()) for r in routers]}, reference
