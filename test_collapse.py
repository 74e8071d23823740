"""
analysis.py's router-neutral measures of collapse against independent computations: the
participation ratio and the subspace share (hand-worked cases, numpy float64 eigenvalues and
projectors, isotropic data), the subspace a router reads, the shared k-means grouping and the step-0
identity it relies on, the gate and probe records, and the detach_route ablation (its gradient below
the sparse layer by a per-token loop and by the J_2 term of Eq. 5 written out).

    python -m pytest -q test_collapse.py
"""

import math

import numpy as np
import pytest
import torch

from analysis import (chance_share, observe, participation_ratio, random_shares, shared_grouping, span_overlap,
                      subspace_share)
from xmoe import MaskedLM, MoELayer, Router, XMoEConfig, balance_loss


def _tiny(**kw):
    return XMoEConfig.preset("tiny", **{"dropout": 0.0, **kw})


def _batch(seed=0, B=3, L=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (B, L), generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 6:], pad[2, 4:] = True, True  # two rows with padding at the end
    return ids, pad


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q  # (d, d) orthogonal


# ------------------------------------------------------------------------------------------------
# participation_ratio: (sum lambda)^2 / sum lambda^2


def test_participation_ratio_hand_example():
    # points (+-3, 0), (0, +-1), shifted: covariance diag(18, 2) / 4, PR = (4.5 + 0.5)^2 / (4.5^2 + 0.5^2) = 50/41
    h = torch.tensor([[3.0, 0], [-3, 0], [0, 1], [0, -1]]) + torch.tensor([5.0, -2])
    assert participation_ratio(h) == pytest.approx(50 / 41, abs=1e-12)


@pytest.mark.parametrize("r", [1, 3, 8])
def test_participation_ratio_is_r_for_data_spread_evenly_over_r_directions(r):
    d, q = 8, _rotation(8, r)
    a = np.array([1.0, -1.0])[:, None, None] * 2.5 * q[:r][None]  # (2, r, d): +-2.5 q_j, j < r
    h = torch.from_numpy(a.reshape(2 * r, d) + 7.0)  # covariance (2.5^2 / r) sum_j q_j q_j^T, r equal eigenvalues
    assert participation_ratio(h) == pytest.approx(r, abs=1e-9)


def test_participation_ratio_isotropic_and_against_numpy_eigenvalues():
    torch.manual_seed(0)
    assert participation_ratio(torch.randn(20000, 16)) == pytest.approx(16, abs=0.3)  # d, less sampling noise
    h = torch.randn(400, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)  # anisotropic
    lam = np.linalg.eigvalsh(np.cov(h.numpy().T))
    pr = participation_ratio(h)
    assert pr == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-10) and 1 < pr < 5


def test_participation_ratio_without_the_largest_directions_against_numpy_eigenvalues():
    h = torch.randn(600, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    h = h * torch.tensor([30.0, 12, 1, 1, 1, 1, 0.5], dtype=torch.float64)  # two directions dominate
    lam = np.sort(np.linalg.eigvalsh(np.cov(h.numpy().T)))[::-1]  # descending
    for drop in (0, 1, 2):
        rest = lam[drop:]
        assert participation_ratio(h, drop=drop) == pytest.approx(rest.sum() ** 2 / (rest ** 2).sum(), rel=1e-10)
    assert participation_ratio(h) < 1.5 and participation_ratio(h, drop=2) > 4  # what dropping two reveals


# ------------------------------------------------------------------------------------------------
# subspace_share: |P centred|^2 / |centred|^2


def test_subspace_share_hand_example():
    # variance 2, 8, 18 along the three axes (shifted): the first two axes hold (2 + 8) / 28 = 5/14
    h = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 3], [0, 0, -3]]) + 4.0
    axes = torch.eye(3)
    assert subspace_share(h, axes[:2]) == pytest.approx(5 / 14, abs=1e-12)
    skewed = torch.tensor([[2.0, 0, 0], [1, 1, 0], [-3, 0.5, 0]])  # same span, scaled, not orthogonal, rank 2
    assert subspace_share(h, skewed) == pytest.approx(5 / 14, abs=1e-12)
    assert subspace_share(h, torch.tensor([[1.0, 0, 0], [-2, 0, 0]])) == pytest.approx(1 / 14, abs=1e-12)
    assert subspace_share(h, axes[2:]) == pytest.approx(9 / 14, abs=1e-12)
    assert subspace_share(h, 3 * axes) == pytest.approx(1.0, abs=1e-12)


def test_subspace_share_isotropic_and_against_numpy_projector():
    torch.manual_seed(0)
    assert subspace_share(torch.randn(20000, 16), torch.randn(4, 16)) == pytest.approx(4 / 16, abs=0.01)
    h = (torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)).numpy() + 3.0
    b = np.random.default_rng(1).standard_normal((3, 6))
    for basis in (b, np.stack([b[0], b[1], b[0] - 2 * b[1]])):  # rank 3, and rank 2
        P = basis.T @ np.linalg.pinv(basis @ basis.T) @ basis  # (6, 6) orthogonal projector on the row span
        c = h - h.mean(axis=0)
        ref = ((c @ P) ** 2).sum() / (c ** 2).sum()
        assert subspace_share(torch.from_numpy(h), torch.from_numpy(basis)) == pytest.approx(ref, rel=1e-10)


# ------------------------------------------------------------------------------------------------
# The share of random spans (chance), and the overlap of two spans


@pytest.mark.parametrize("k", [1, 4, 12])
def test_random_spans_hold_k_over_d_of_any_h_on_average(k):
    d = 16
    g = torch.Generator().manual_seed(k)
    h = torch.randn(300, d, dtype=torch.float64, generator=g) * torch.logspace(0, 2, d, dtype=torch.float64)  # anisotropic
    shares = random_shares(h, k, draws=2000, seed=0)
    assert shares.shape == (2000,) and shares.min() >= 0 and shares.max() <= 1
    # E[Q Q^T] = (k/d) I: the mean is k/d whatever the spectrum; 2000 draws, 5 standard errors
    assert abs(shares.mean().item() - k / d) < 5 * shares.std().item() / 2000 ** 0.5
    mean, low, high = chance_share(h, k, draws=2000, seed=0)
    assert (mean, low, high) == chance_share(h, k, draws=2000, seed=0)  # seeded: the same band twice
    assert low < k / d < high and (mean, low, high) != chance_share(h, k, draws=2000, seed=1)


@pytest.mark.parametrize("k", [2, 8])
def test_random_share_of_data_on_one_direction_is_beta(k):
    """For h on one direction u, the share of a random k-dimensional span is |Q^T u|^2, which follows
    Beta(k/2, (d - k)/2): its quantiles against numpy's Beta sampler, an independent computation."""
    d = 24
    u = torch.from_numpy(_rotation(d, 5)[0])
    h = torch.linspace(-3, 3, 101, dtype=torch.float64)[:, None] * u  # rank 1
    shares = random_shares(h, k, draws=4000, seed=0).numpy()
    beta = np.random.default_rng(0).beta(k / 2, (d - k) / 2, size=200000)
    for p in (0.025, 0.25, 0.5, 0.75, 0.975):  # standard errors of these quantiles: 0.001 to 0.005
        assert abs(np.quantile(shares, p) - np.quantile(beta, p)) < 0.015, p
    mean, low, high = chance_share(h, k, draws=4000, seed=0)
    assert abs(mean - k / d) < 0.01 and abs(low - np.quantile(beta, 0.025)) < 0.015


def test_span_overlap_by_hand():
    e = torch.eye(4, dtype=torch.float64)
    assert span_overlap(e[:2], torch.tensor([[2.0, 1, 0, 0], [1, -3, 0, 0]], dtype=torch.float64)) == pytest.approx(1)
    assert span_overlap(e[:2], e[2:]) == pytest.approx(0, abs=1e-15)
    # spans {e0, e1} and {cos t e0 + sin t e2, e1}: principal angles t and 0, mean squared cosine (cos^2 t + 1) / 2
    t = 0.4
    b = torch.tensor([[math.cos(t), 0, math.sin(t), 0], [0, 1, 0, 0]], dtype=torch.float64)
    assert span_overlap(e[:2], b) == pytest.approx((math.cos(t) ** 2 + 1) / 2, abs=1e-12)
    a = torch.from_numpy(_rotation(30, 1)[:3]).float()  # two random 3-spans in R^30: about k/d = 0.1
    overlaps = [span_overlap(a, torch.from_numpy(_rotation(30, s)[:3])) for s in range(2, 202)]
    assert abs(np.mean(overlaps) - 3 / 30) < 0.02


# ------------------------------------------------------------------------------------------------
# Router.read_subspace: the span of h the scores read


@pytest.mark.parametrize("routing,dim_reduction", [("smoe", True), ("xmoe", True), ("xmoe", False)])
def test_read_subspace_is_what_the_scores_read(routing, dim_reduction):
    torch.manual_seed(0)
    cfg = _tiny(routing=routing, dim_reduction=dim_reduction, n_experts=6)
    router = Router(cfg)
    with torch.no_grad():
        router.expert_emb.normal_()  # scores of size 1, so that a change is visible
    basis = router.read_subspace()
    reduced = routing == "xmoe" and dim_reduction
    param = router.proj.weight if reduced else router.expert_emb
    assert basis.shape == (3 if reduced else 6, cfg.d_model)  # d_e = N / 2, or N
    assert basis.dtype == torch.float32 and not basis.requires_grad and torch.equal(basis, param.detach())
    # moving h orthogonally to the span leaves the scores, moving it inside the span changes them; the
    # cosine in R^d (xmoe without W) also divides by |h|, so there s_i |h| is what stays
    router.double()
    b = basis.double().numpy()
    h, v = torch.randn(5, cfg.d_model, dtype=torch.float64), np.random.default_rng(0).standard_normal((5, cfg.d_model))
    v_perp = torch.from_numpy(3 * (v - v @ b.T @ np.linalg.pinv(b @ b.T) @ b))  # (5, d), orthogonal to the rows
    read = lambda h: router(h).scores * (h.norm(dim=1, keepdim=True) if routing == "xmoe" and not reduced else 1)
    assert torch.allclose(read(h + v_perp), read(h), atol=1e-5)
    assert not torch.allclose(read(h + 3 * torch.from_numpy(v) - v_perp), read(h), atol=1e-2)
    with torch.no_grad():
        param.add_(1.0)  # the router learns on: what read_subspace returned stays what it read then
    assert torch.equal(basis.double(), torch.from_numpy(b)) and not torch.equal(basis.double(), param.detach().double())


# ------------------------------------------------------------------------------------------------
# shared_grouping: a seeded k-means of the step-0 states, and the identity of those states


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_shared_grouping_hand_example_and_separated_clusters():
    h = torch.tensor([[0.0], [11], [1], [12], [10]])
    for seed in range(5):
        assert _same_partition(shared_grouping(h, 2, seed), torch.tensor([0, 1, 0, 1, 1]))
    g = torch.Generator().manual_seed(0)
    truth = torch.randperm(200, generator=g) % 5  # (200,) 5 clusters, shuffled
    h = 20 * torch.randn(5, 8, generator=g)[truth] + 0.5 * torch.randn(200, 8, generator=g)
    for seed in range(3):
        labels = shared_grouping(h, 5, seed)
        assert labels.dtype == torch.long and labels.shape == (200,) and _same_partition(labels, truth)


def test_shared_grouping_seeds_with_probability_proportional_to_the_squared_distance():
    """k-means++ by hand: points 0, 1 and 10 on a line, k = 2, no Lloyd iteration, so the labels show
    the two initial centres. The partition {0} | {1, 10} needs the centres 0 and 1: the first centre
    uniform (1/3 each), the second with probability D^2 / sum D^2 (first 0: 1/101; first 1: 1/82), so
    p = (1/101 + 1/82) / 3 = 0.0074. Seeding proportional to D would give 0.064, uniformly 1/3."""
    h = torch.tensor([[0.0], [1.0], [10.0]])
    p = (1 / 101 + 1 / 82) / 3
    n = 3000
    count = sum(shared_grouping(h, 2, seed=s, iters=0).tolist() in ([0, 1, 1], [1, 0, 0]) for s in range(n))
    assert abs(count - n * p) < 4.5 * math.sqrt(n * p * (1 - p)), (count, n * p)


def test_shared_grouping_deterministic_seeded_and_a_lloyd_fixed_point():
    h = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))  # no cluster structure
    a = shared_grouping(h, 4, seed=3)
    assert torch.equal(a, shared_grouping(h, 4, seed=3))
    assert not torch.equal(a, shared_grouping(h, 4, seed=4))  # the seed picks the start
    x, y = h.double().numpy(), a.numpy()
    centres = np.stack([x[y == j].mean(axis=0) for j in range(4)])  # every label used
    nearest = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == y).all()  # converged: each point sits with the nearest mean


@pytest.mark.parametrize("seed", [0, 1])
def test_step0_weights_states_and_grouping_identical_for_smoe_xmoe_dense(seed):
    """MaskedLM.initialize: one seed gives the three routings the same weights outside the sparse
    layers (SMoE and X-MoE also the same experts), so the states at moe_after are byte-identical, in
    eval mode and also in train mode (dropout draws from the same generator state)."""
    ids, pad = _batch(seed)
    models, probes = {}, {}
    for routing in ("smoe", "xmoe", "dense"):
        torch.manual_seed(seed)
        models[routing] = m = MaskedLM(XMoEConfig.preset("tiny", routing=routing))  # dropout 0.1
        with observe(m) as seen:
            m(ids, pad_mask=pad)  # train mode, straight after construction
            m.eval()(ids, pad_mask=pad)
        probes[routing] = tuple(seen.hidden)
    sd = {k: m.state_dict() for k, m in models.items()}
    for k, v in sd["dense"].items():
        assert torch.equal(v, sd["smoe"][k]) and torch.equal(v, sd["xmoe"][k]), k
    experts = [k for k in sd["smoe"] if ".experts." in k]
    assert experts and all(torch.equal(sd["smoe"][k], sd["xmoe"][k]) for k in experts)
    assert not torch.equal(sd["smoe"]["encoder.moe.1.router.expert_emb"], sd["xmoe"]["encoder.moe.1.router.expert_emb"])
    labels = {}
    for routing, (train_probe, probe) in probes.items():
        assert torch.equal(train_probe, probes["smoe"][0]) and torch.equal(probe, probes["smoe"][1])
        labels[routing] = shared_grouping(probe[~pad], 4, seed=0)
    assert not torch.equal(probes["smoe"][0], probes["smoe"][1])  # dropout did act in train mode
    assert torch.equal(labels["smoe"], labels["xmoe"]) and torch.equal(labels["smoe"], labels["dense"])
    torch.manual_seed(seed + 10)
    other = MaskedLM(XMoEConfig.preset("tiny", routing="smoe")).eval()
    with observe(other) as seen:
        other(ids, pad_mask=pad)
    assert not torch.equal(seen.hidden[0], probes["smoe"][1])  # another seed, other states


# ------------------------------------------------------------------------------------------------
# What analysis.observe records: the routers' outputs and the sparse layers' inputs


@pytest.mark.parametrize("routing", ["smoe", "xmoe"])
def test_observed_gate_and_experts_are_the_router_s_on_the_real_tokens(routing):
    torch.manual_seed(0)
    model = MaskedLM(_tiny(routing=routing, capacity_factor=0.5)).eval()  # dropped tokens keep a gate
    ids, pad = _batch()
    with observe(model) as seen:
        model(ids, pad_mask=pad)
    (h,), (r,) = seen.hidden, seen.routed
    ref = model.encoder.moe["1"].router(h[~pad])  # the router rerun on the real tokens, batch order
    assert r.gate.shape == ((~pad).sum(),) and r.gate.dtype == torch.float32
    assert torch.equal(r.gate, ref.gate) and ref.gate.gt(0).all() and torch.equal(r.expert, ref.expert)
    assert all(not m._forward_hooks for m in model.modules())  # the hooks are gone after the block


@pytest.mark.parametrize("routing", ["smoe", "xmoe", "dense"])
def test_observed_hidden_is_the_router_input_and_the_same_position_for_dense(routing):
    torch.manual_seed(0)
    model = MaskedLM(_tiny(routing=routing, moe_after=(2, 1))).eval()
    ids, pad = _batch()
    with observe(model) as seen:
        model(ids, pad_mask=pad)
    enc = model.encoder
    x1 = enc.blocks[0](enc.tok_emb(ids) + enc.pos_emb(torch.arange(ids.shape[1])), pad)  # by hand
    assert len(seen.hidden) == 2 and torch.equal(seen.hidden[0], x1)
    if routing == "dense":
        assert seen.routed == [] and torch.equal(seen.hidden[1], enc.blocks[1](x1, pad))
    else:  # each router scored its layer's input at the real tokens
        for h, layer, r in zip(seen.hidden, enc.moe.values(), seen.routed):
            assert torch.equal(r.scores, layer.router(h[~pad]).scores)
        x2 = enc.blocks[1](enc.moe["1"](x1, pad)[0], pad)
        assert torch.equal(seen.hidden[1], x2) and not torch.equal(x2, enc.blocks[1](x1, pad))


# ------------------------------------------------------------------------------------------------
# detach_route: the router scores h.detach()


def _below(name):  # parameters below the (only) sparse layer of tiny, which sits after block 1
    return name.startswith(("encoder.tok_emb", "encoder.pos_emb", "encoder.blocks.0."))


@pytest.mark.parametrize("routing", ["smoe", "xmoe"])
def test_detach_route_same_forward_and_gradients_except_below(routing):
    ids, pad = _batch()
    labels = ids.masked_fill(pad | (ids % 3 == 0), -100)
    outs, grads = [], []
    routed = []
    for detach in (False, True):
        torch.manual_seed(0)
        model = MaskedLM(_tiny(routing=routing, detach_route=detach))
        with observe(model) as seen:
            out = model(ids, labels, pad)
        out.loss.backward()
        outs.append(out)
        routed.append(seen.routed[0])
        grads.append({k: p.grad for k, p in model.named_parameters()})
    a, b = outs
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert torch.equal(a.balance_loss, b.balance_loss)
    assert torch.equal(routed[0].expert, routed[1].expert) and torch.equal(routed[0].gate, routed[1].gate)
    router = [k for k in grads[0] if ".router." in k]
    assert "encoder.moe.1.router.expert_emb" in router and (routing == "smoe") == (len(router) == 1)
    for k in grads[0]:  # e_i, W, tau, the experts, block 2, the head: unchanged; below: changed
        if _below(k):
            assert not torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=0), k
        else:
            assert torch.equal(grads[0][k], grads[1][k]), k


def test_detach_route_gradient_below_is_j2_free_by_hand():
    """SMoE layer in float64, loss = sum(w * y) + beta * balance. Detached: dL/dx = w + d/dx(w . g f(x))
    with g a constant (a per-token loop). Not detached, the difference is the J_2 term of Eq. 5, a
    combination of the e_j: c_t g (e_k - sum_j p_j e_j) + beta (N / (T tau0)) sum_j q_j (f_j - f . q) e_j,
    c_t = w_t . f_k(x_t), p = softmax(s), q = softmax(s / tau0), f_j the fraction routed to j."""
    torch.manual_seed(0)
    layer = MoELayer(_tiny(routing="smoe", balance_tau=0.7)).double()
    with torch.no_grad():
        layer.router.expert_emb.normal_()  # scores of size 1: a gate far from 1/N
    B, L, d = 2, 5, layer.router.expert_emb.shape[1]
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 3:] = True
    x0, w, beta = torch.randn(B, L, d, dtype=torch.float64), torch.randn(B, L, d, dtype=torch.float64), 0.3

    def grad_x(detach):
        layer.router.detach = detach
        x = x0.clone().requires_grad_()
        y, bal = layer(x, pad)
        return torch.autograd.grad((w * y).sum() + beta * bal, x)[0]

    full, detached = grad_x(False), grad_x(True)
    tok = (~pad).nonzero().tolist()  # (T, 2) positions of the real tokens, batch order
    r = layer.router(x0[~pad])
    x = x0.clone().requires_grad_()
    ref = (w * x)[pad].sum()  # padding passes through
    c = []  # c_t = w_t . f_k(x_t)
    for t, (b, l) in enumerate(tok):
        k, g = r.expert[t].item(), r.gate[t].item()  # g a float: held constant
        f = layer.experts[k](x[b, l][None])[0]
        ref = ref + (w[b, l] * (x[b, l] + g * f)).sum()
        c.append((w[b, l] * f).sum().item())
    assert torch.allclose(detached, torch.autograd.grad(ref, x)[0], rtol=0, atol=1e-12)
    e, s = layer.router.expert_emb.detach(), r.scores.detach()
    T, N, tau0 = len(tok), e.shape[0], layer.router.balance_tau
    p, q = s.softmax(-1), (s / tau0).softmax(-1)  # (T, N)
    frac = torch.bincount(r.expert, minlength=N).double() / T
    gate_part = torch.tensor(c, dtype=torch.float64)[:, None] * r.gate.detach()[:, None] * (e[r.expert] - p @ e)  # Eq. 5
    bal_part = beta * N / (T * tau0) * (q * (frac - q @ frac[:, None])) @ e
    assert torch.allclose((full - detached)[~pad], gate_part + bal_part, rtol=0, atol=1e-12)
    assert (full - detached)[~pad].abs().max() > 1e-2 and (full - detached)[pad].eq(0).all()


def test_balance_loss_is_n_sum_of_fractions_times_mean_probabilities():
    """Eq. 8 with t_i the fraction f_i equals N sum f_i P_i; with t_i a count it would be |B| times that."""
    s = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    expert = s.argmax(1)  # [0, 1, 0, 2]: f = [1/2, 1/4, 1/4]
    S = (s / 0.5).softmax(-1).numpy()
    t = np.array([2, 1, 1]) / 4
    eq8 = 3 / 4 * sum(t[i] * S[tok, i] for i in range(3) for tok in range(4))  # (N / |B|) sum_i sum_tok t_i S_i
    assert balance_loss(s, expert, 0.5).item() == pytest.approx(eq8, rel=1e-12)
    assert eq8 == pytest.approx(3 * (t * S.mean(0)).sum(), rel=1e-12)
