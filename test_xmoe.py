"""
The test suite: python -m pytest -q test_xmoe.py

Every test compares with an independent computation (a float64 formula, a per-token loop, a
hand-worked example, a brute-force search, a file parsed by a reader written here), never with the
code's own output. Tiny configs and fixed seeds throughout. In order: xmoe.py (router, layer, model,
analyses, expert parallelism), eval_xtreme.py (metrics, loaders, CLI), the synthetic world,
train_mlm.py and finetune.py (their CLIs end to end, under torchrun with 2 Gloo processes too).
"""

import argparse
import csv
import importlib.util
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import finetune
import train_mlm
from eval_xtreme import (DataError, SYN_LANGS, SYN_SIZES, TASKS, accuracy, build_table, get_entities,
                         languages, load_split, make_synthetic, mlqa_normalize, mlqa_scores, read_label,
                         read_squad, read_tag, seqeval_scores, squad_normalize, squad_scores, summarize,
                         write_labels, write_predictions)
from xmoe import (Encoder, MaskedLM, MoELayer, Router, XMoEConfig, balance_loss, expert_load, freeze_moe,
                  inter_run_consistency, representation_collapse, routing_fluctuation)

torch.use_deterministic_algorithms(True)


def _tiny(**kw):
    return XMoEConfig.preset("tiny", **{"dropout": 0.0, **kw})


# ------------------------------------------------------------------------------------------------
# Router: Eq. 1, 3, 6, 7, 8 against float64 formulas


def _ref_scores(router, h, cfg):
    """Independent float64 routing scores from the router's raw parameters."""
    h = h.double()
    e = router.expert_emb.detach().double()
    if cfg.routing == "smoe":
        return h @ e.t()  # Eq. 1
    z = h @ router.proj.weight.detach().double().t() if cfg.dim_reduction else h  # W^T h
    if not cfg.l2_norm:
        return z @ e.t()
    out = torch.empty(h.shape[0], e.shape[0], dtype=torch.float64)
    for t in range(h.shape[0]):
        for i in range(e.shape[0]):
            out[t, i] = (z[t] @ e[i]) / (z[t].norm() * e[i].norm())  # Eq. 6
    return out


@pytest.mark.parametrize("routing,gate,dim_reduction,l2_norm", [
    ("smoe", "softmax", True, True), ("smoe", "sigmoid", True, True),
    ("xmoe", "softmax", True, True), ("xmoe", "sigmoid", True, True),
    ("xmoe", "softmax", False, True), ("xmoe", "sigmoid", True, False), ("xmoe", "softmax", False, False),
])
def test_router_matches_float64_equations(routing, gate, dim_reduction, l2_norm):
    torch.manual_seed(0)
    cfg = _tiny(routing=routing, gate=gate, dim_reduction=dim_reduction, l2_norm=l2_norm, n_experts=6)
    router = Router(cfg).double()  # float64: the top-1 choice is then the formula's, on any CPU
    if routing == "xmoe":
        with torch.no_grad():
            router.log_tau.fill_(math.log(0.21))  # a tau different from the initial one
    h = torch.randn(11, cfg.d_model, dtype=torch.float64)
    r = router(h)
    s = _ref_scores(router, h, cfg)
    tau = 0.21 if routing == "xmoe" else 1.0
    assert r.scores.dtype == torch.float64
    torch.testing.assert_close(r.scores, s, rtol=1e-12, atol=1e-12)
    assert torch.equal(r.expert, s.argmax(1))
    for t in range(h.shape[0]):
        k = s[t].argmax()
        if gate == "softmax":
            g = math.exp(s[t, k] / tau) / sum(math.exp(s[t, j] / tau) for j in range(6))  # Eq. 3 / 7
        else:
            g = 1 / (1 + math.exp(-s[t, k] / tau))
        assert abs(r.gate[t].item() - g) < 1e-12
    # Eq. 8 with tau_0 = initial tau (xmoe) or 1 (smoe), written as the paper's double sum
    tau0 = cfg.init_tau
    N, T = 6, h.shape[0]
    t_i = [sum(1 for t in range(T) if s[t].argmax() == i) / T for i in range(N)]
    total = 0.0
    for i in range(N):
        for t in range(T):
            total += t_i[i] * math.exp(s[t, i] / tau0) / sum(math.exp(s[t, j] / tau0) for j in range(N))
    assert abs(r.balance_loss.item() - N / T * total) < 1e-12


def test_router_defaults_follow_the_paper():
    soft, sig = Router(_tiny(gate="softmax")), Router(_tiny(gate="sigmoid"))
    assert abs(soft.tau.item() - 0.3) < 1e-6 and abs(sig.tau.item() - 0.07) < 1e-6  # Table 6
    assert isinstance(soft.log_tau, torch.nn.Parameter)
    smoe = Router(_tiny(routing="smoe"))
    assert smoe.tau.item() == 1.0 and not isinstance(smoe.log_tau, torch.nn.Parameter)
    assert smoe.proj is None and smoe.expert_emb.shape == (4, 32)
    assert soft.proj.weight.shape == (2, 32) and soft.expert_emb.shape == (4, 2)  # d_e = N / 2
    base = XMoEConfig.preset("base")
    assert base.route_dim == 16 and base.fixed_balance_tau == 0.3


def test_balance_loss_is_one_for_a_uniform_router_and_n_for_a_collapsed_one():
    scores = torch.zeros(10, 4)
    assert abs(balance_loss(scores, torch.arange(10) % 4, 1.0).item() - 1.0) < 1e-6
    # every token to expert 0 with all its probability: N * 1 * 1
    scores = torch.tensor([[50.0, 0, 0, 0]]).repeat(8, 1)
    assert abs(balance_loss(scores, torch.zeros(8, dtype=torch.long), 1.0).item() - 4.0) < 1e-4


@pytest.mark.parametrize("routing", ["xmoe", "smoe"])
def test_balance_loss_gradient_holds_the_fractions_constant(routing):
    # Eq. 8: f_i (the share of tokens whose top-1 is i) is a count, so the gradient flows through P_i
    # alone; and tau_0 is a constant, so the learned tau gets none. Reference: autograd on a separate
    # float64 formula over copies of W and e_i, with f_i as plain numbers.
    torch.manual_seed(6)
    cfg = _tiny(routing=routing, n_experts=5)
    router = Router(cfg).double()
    h = torch.randn(13, cfg.d_model, dtype=torch.float64)
    router(h).balance_loss.backward()
    e = router.expert_emb.detach().clone().requires_grad_(True)
    W = router.proj.weight.detach().clone().requires_grad_(True) if router.proj is not None else None
    z = h if W is None else h @ W.t()
    s = F.normalize(z, dim=-1) @ F.normalize(e, dim=-1).t() if routing == "xmoe" else z @ e.t()  # Eq. 6 / 1
    f = [float((s.argmax(1) == i).sum()) / 13 for i in range(5)]  # constants
    P = (s / cfg.init_tau).softmax(-1).mean(0)
    (5 * sum(f[i] * P[i] for i in range(5))).backward()
    torch.testing.assert_close(router.expert_emb.grad, e.grad, rtol=1e-10, atol=1e-12)
    if W is not None:
        torch.testing.assert_close(router.proj.weight.grad, W.grad, rtol=1e-10, atol=1e-12)
    assert router.log_tau.grad is None or router.log_tau.grad == 0


def test_tau_stays_positive_under_a_large_update():
    router = Router(_tiny())
    opt = torch.optim.SGD(router.parameters(), lr=5.0)
    h = torch.randn(16, 32)
    for _ in range(3):
        opt.zero_grad()
        router(h).gate.sum().backward()
        opt.step()
    assert 0 < router.tau.item() < math.inf


def test_router_stays_float32_under_autocast():
    layer = MoELayer(_tiny())
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(x.view(-1, 32))
        y, _ = layer(x)
    assert r.scores.dtype == torch.float32 and r.gate.dtype == torch.float32
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------------
# The sparse layer against a per-token loop


def _ref_expert(expert, h):
    """f_k(h) from the expert's raw weights, float64: the update of a stack of residual sublayers."""
    x = h.double()
    for sub in expert.sublayers:
        ln, fc1, fc2 = sub.ln, sub.ffn.fc1, sub.ffn.fc2
        u = F.layer_norm(x, x.shape[-1:], ln.weight.double(), ln.bias.double(), ln.eps)
        u = F.gelu(u @ fc1.weight.double().t() + fc1.bias.double())
        x = x + u @ fc2.weight.double().t() + fc2.bias.double()
    return x - h.double()


@pytest.mark.parametrize("routing,gate", [("xmoe", "softmax"), ("smoe", "sigmoid"), ("xmoe", "sigmoid")])
def test_moe_layer_matches_a_per_token_loop_with_padding(routing, gate):
    torch.manual_seed(1)
    cfg = _tiny(routing=routing, gate=gate, n_experts=5, expert_depth=2)
    layer = MoELayer(cfg).double()  # float64: dispatch and loop agree to rounding on any CPU
    for p in layer.experts.parameters():  # non-trivial LayerNorm weights and biases too
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 1:] = True
    y, bal = layer(x, pad)
    for b in range(3):
        for t in range(7):
            if pad[b, t]:
                assert torch.equal(y[b, t], x[b, t])  # padding comes out unchanged
                continue
            h = x[b, t]
            s = _ref_scores(layer.router, h[None], cfg)[0]
            k = s.argmax().item()
            tau = layer.router.tau.item()
            g = (s / tau).softmax(0)[k] if gate == "softmax" else torch.sigmoid(s[k] / tau)
            want = h + g * _ref_expert(layer.experts[k], h[None])[0]  # Eq. 2
            torch.testing.assert_close(y[b, t], want, rtol=1e-10, atol=1e-10)
    # padding is not counted in the balance loss: same as routing the real tokens alone
    real = x[~pad]
    assert abs(bal.item() - layer.router(real).balance_loss.item()) < 1e-12


def test_capacity_drops_tokens_beyond_ceil_cT_over_N_in_batch_order():
    # hand-worked: smoe with 2 experts, e_0 = (10, 0, ...), e_1 = (0, 10, ...); a token goes to
    # expert 0 when its first coordinate is larger. Assignments of the 6 tokens: 0 0 0 1 0 1.
    # c = 0.5: capacity = ceil(0.5 * 6 / 2) = 2, so tokens 2 and 4 (the 3rd and 4th for expert 0)
    # are dropped and come out unchanged; 0, 1 (expert 0) and 3, 5 (expert 1) are computed.
    cfg = _tiny(routing="smoe", n_experts=2, capacity_factor=0.5)
    layer = MoELayer(cfg).double()  # float64: an expert on 2 or 3 tokens gives the same rows to rounding
    with torch.no_grad():
        layer.router.expert_emb.zero_()
        layer.router.expert_emb[0, 0] = 10.0
        layer.router.expert_emb[1, 1] = 10.0
    x = torch.randn(1, 6, 32, dtype=torch.float64) * 0.1
    for t, k in enumerate([0, 0, 0, 1, 0, 1]):
        x[0, t, k] = 1.0
    y, _ = layer(x)
    assert layer.dispatch_order(torch.tensor([0, 0, 0, 1, 0, 1]))[1].tolist() == [2, 2]
    for t in (2, 4):
        assert torch.equal(y[0, t], x[0, t])
    for t in (0, 1, 3, 5):
        assert not torch.allclose(y[0, t], x[0, t])
    # the same layer without a capacity computes token 4 like token 0 would: its own expert's output
    layer.capacity_factor = None
    y_all, _ = layer(x)
    assert not torch.allclose(y_all[0, 4], x[0, 4])
    torch.testing.assert_close(y_all[0, [0, 1, 3, 5]], y[0, [0, 1, 3, 5]], rtol=1e-12, atol=1e-12)


def test_a_token_s_output_does_not_depend_on_the_others_when_dropless():
    torch.manual_seed(2)
    layer = MoELayer(_tiny(n_experts=3)).double()  # float64: other batch shapes, same rows to rounding
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    y, _ = layer(x)
    y0, _ = layer(x[:1, :3])
    torch.testing.assert_close(y[:1, :3], y0, rtol=1e-12, atol=1e-12)


def test_gradients_reach_tau_w_e_and_every_expert_even_without_tokens():
    torch.manual_seed(3)
    layer = MoELayer(_tiny(n_experts=8))
    x = torch.randn(1, 2, 32, requires_grad=True)  # 2 tokens, 8 experts: at least 6 get none
    y, bal = layer(x)
    (y.pow(2).sum() + bal).backward()
    used = set(layer.router(x.detach().view(-1, 32)).expert.tolist())
    assert len(used) <= 2
    r = layer.router
    for p in (r.log_tau, r.proj.weight, r.expert_emb):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for i, expert in enumerate(layer.experts):
        for p in expert.parameters():
            assert p.grad is not None  # in the graph, so DDP needs no find_unused_parameters
            if i in used and p.dim() == 2:
                assert p.grad.abs().sum() > 0
            if i not in used:
                assert p.grad.abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# Model, loss, freezing


def test_masked_lm_loss_is_mlm_plus_alpha_times_balance():
    torch.manual_seed(4)
    cfg = _tiny(balance_coef=0.05)
    model = MaskedLM(cfg)
    ids = torch.randint(4, cfg.vocab_size, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[1, 7] = 11, 40, 7
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 7:] = True
    out = model(ids, labels, pad)
    logp = out.logits.double().log_softmax(-1)
    mlm = -(logp[0, 2, 11] + logp[1, 5, 40] + logp[1, 7, 7]) / 3
    assert abs(out.mlm_loss.item() - mlm.item()) < 1e-5
    assert abs(out.loss.item() - (mlm.item() + 0.05 * out.balance_loss.item())) < 1e-5  # Eq. 9
    assert len(out.routing) == 1 and out.routing[0].experts[0, 7:].eq(-1).all()
    assert out.routing[0].experts[~pad].ge(0).all()


def test_decoder_is_tied_to_the_token_embedding():
    model = MaskedLM(_tiny())
    ids = torch.randint(4, 260, (1, 5))
    out = model(ids)
    enc = model.encoder(ids)
    z = model.head_ln(F.gelu(model.head_dense(enc.hidden)))
    torch.testing.assert_close(out.logits, z @ model.encoder.tok_emb.weight.t() + model.head_bias)


def test_dense_baseline_has_no_sparse_layer():
    model = MaskedLM(_tiny(routing="dense"))
    assert len(model.encoder.moe) == 0
    out = model(torch.randint(4, 260, (2, 6)))
    assert out.balance_loss.item() == 0.0 and out.routing == []


def test_frozen_sparse_layers_stay_bit_identical_while_the_rest_trains():
    torch.manual_seed(5)
    model = MaskedLM(_tiny())
    n_frozen = freeze_moe(model)
    moe = model.encoder.moe["1"]
    assert n_frozen == sum(p.numel() for p in moe.parameters()) and n_frozen > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(4, 260, (4, 12))
    for _ in range(3):
        opt.zero_grad()
        model(ids, ids).loss.backward()
        opt.step()
    after = model.state_dict()
    for k in before:
        if k.startswith("encoder.moe."):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["encoder.blocks.0.ffn.fc1.weight"], after["encoder.blocks.0.ffn.fc1.weight"])
    # the balance loss is still computed, and its gradient reaches the block below the sparse layer
    model.zero_grad()
    model(ids).balance_loss.backward()
    assert model.encoder.blocks[0].ffn.fc1.weight.grad.abs().sum() > 0


def test_base_preset_parameter_count_by_hand():
    with torch.device("meta"):
        model = MaskedLM(XMoEConfig.preset("base"))
    V, P, d, f, N, D, de, layers = 250002, 512, 768, 3072, 32, 3, 16, 12
    ln = 2 * d
    ffn = d * f + f + f * d + d
    block = ln + (d * 3 * d + 3 * d) + (d * d + d) + ln + ffn
    router = d * de + N * de + 1  # W, e_i, log tau
    experts = N * D * (ln + ffn)
    head = (d * d + d) + ln + V  # dense, LayerNorm, decoder bias (decoder weight tied)
    want = V * d + P * d + layers * block + router + experts + ln + head
    assert sum(p.numel() for p in model.parameters()) == want == 731_806_611


@pytest.mark.parametrize("field,value", [
    ("n_heads", 3), ("routing", "top2"), ("gate", "relu"), ("capacity_factor", 0.0),
    ("capacity_factor", -1.0), ("n_experts", 0), ("moe_after", (3,)), ("moe_after", (0,)),
    ("moe_after", ()), ("d_route", 0), ("expert_depth", 0), ("dropout", 1.0), ("tau_init", 0.0),
    ("balance_coef", -0.1), ("vocab_size", 0),
])
def test_invalid_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _tiny(**{field: value})


def test_unknown_preset_and_field_raise():
    with pytest.raises(ValueError, match="huge"):
        XMoEConfig.preset("huge")
    with pytest.raises(ValueError, match="n_expert"):
        XMoEConfig.preset("tiny", n_expert=4)
    cfg = _tiny(routing="smoe")
    assert XMoEConfig.from_dict(cfg.to_dict()) == cfg


def test_encoder_rejects_too_long_input():
    with pytest.raises(ValueError, match="max_len"):
        Encoder(_tiny())(torch.zeros(1, 65, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# Analyses: RC (Eq. 10), RF, IC on hand-computed examples


def test_rc_one_dimensional_by_hand():
    # classes {0, 2} (mean 1) and {4, 6} (mean 5), global mean 3:
    # Sigma_W = (1 + 1 + 1 + 1) / 4 = 1, Sigma_B = ((1-3)^2 + (5-3)^2) / 2 = 4, RC = 1 / 4
    h = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    assert abs(representation_collapse(h, torch.tensor([0, 0, 1, 1])) - 0.25) < 1e-12


def test_rc_uses_the_pseudo_inverse_of_a_singular_between_class_covariance():
    # two classes spread as a plus sign, means (0,0) and (4,0), global (2,0):
    # Sigma_W = diag(4, 4) / 8 = diag(.5, .5); Sigma_B = diag(4, 0); pinv = diag(.25, 0); RC = .125
    plus = torch.tensor([[-1.0, 0], [1, 0], [0, -1], [0, 1]])
    h = torch.cat([plus, plus + torch.tensor([4.0, 0])])
    assert abs(representation_collapse(h, torch.tensor([3] * 4 + [7] * 4)) - 0.125) < 1e-12


def test_rf_and_load_and_ic_by_hand():
    assert routing_fluctuation([0, 1, 2, 3], [0, 1, 3, 3]) == 0.25
    assert expert_load(torch.tensor([[0, 2, 2, -1]]), 4).tolist() == [1, 0, 2, 0]
    # rho(l1, l2) = 1, rho(l1, l3) = rho(l2, l3) = -1: (3 + 2 * (1 - 1 - 1)) / 9 = 1 / 9
    loads = [[1, 2, 3], [2, 4, 6], [3, 2, 1]]
    assert abs(inter_run_consistency(loads) - 1 / 9) < 1e-12
    assert abs(inter_run_consistency([[5, 1, 0], [5, 1, 0]]) - 1.0) < 1e-12
    with pytest.raises(ValueError, match="same tokens"):
        routing_fluctuation([0, 1], [0, 1, 2])


# ------------------------------------------------------------------------------------------------
# Expert parallelism: the sharded layer against the unsharded one, 2 Gloo processes

_EP_WORKER = r'''
import copy, sys, torch, torch.distributed as dist
from train_mlm import teardown_distributed
from xmoe import MoELayer, XMoEConfig, full_state_dict, local_state_dict
dist.init_process_group("gloo")
torch.set_default_dtype(torch.float64)  # sharded and unsharded sum in other orders: equal to rounding


def main():
    rank, K = dist.get_rank(), dist.get_world_size()
    capacity = None if sys.argv[1] == "none" else float(sys.argv[1])
    torch.manual_seed(0)
    cfg = XMoEConfig.preset("tiny", n_experts=4, expert_depth=2, dropout=0.0, capacity_factor=capacity)
    full = MoELayer(cfg)
    for p in full.experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sharded = copy.deepcopy(full).shard_experts()
    assert len(sharded.experts) == 2

    def inputs(r):  # each rank its own tokens, with padding
        g = torch.Generator().manual_seed(100 + r)
        x = torch.randn(2, 9, 32, generator=g)
        pad = torch.zeros(2, 9, dtype=torch.bool)
        pad[1, 6 - r:] = True
        return x, pad, torch.randn(2, 9, 32, generator=g)

    # reference: the unsharded layer on each rank's tokens; expert grads add up over both ranks
    ref_grads, ref_y = {}, None
    for r in range(K):
        full.zero_grad()
        x, pad, w = inputs(r)
        x.requires_grad_(True)
        y, bal = full(x, pad)
        ((y * w).sum() + bal).backward()
        if r == rank:
            ref_y, ref_xgrad = y.detach(), x.grad
            ref_router = {n: p.grad.clone() for n, p in full.router.named_parameters()}
        for i in range(rank * 2, rank * 2 + 2):
            for n, p in full.experts[i].named_parameters():
                ref_grads[(i - rank * 2, n)] = ref_grads.get((i - rank * 2, n), 0) + p.grad

    x, pad, w = inputs(rank)
    x.requires_grad_(True)
    y, bal = sharded(x, pad)
    ((y * w).sum() + bal).backward()
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, ref_y, **close)
    torch.testing.assert_close(x.grad, ref_xgrad, **close)
    for n, p in sharded.router.named_parameters():
        torch.testing.assert_close(p.grad, ref_router[n], **close)
    for i, expert in enumerate(sharded.experts):
        for n, p in expert.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[(i, n)], **close)
    # checkpoints are whole: gathering the shards gives the unsharded state dict back, and cutting it
    # down again loads into the sharded layer exactly
    whole, original = full_state_dict(sharded), full.state_dict()
    assert sorted(whole) == sorted(original)
    assert all(torch.equal(whole[k], original[k]) for k in original)
    sharded.load_state_dict(local_state_dict(original, sharded), strict=True)
    print("EP-OK", rank)


# main's locals (the layers, the autograd graph) hold the process group: let them go before the
# teardown, not at interpreter exit, where Gloo's destructor can abort ("terminate called without
# an active exception", seen once in CI)
main()
teardown_distributed()
'''


def _torchrun(script, args, tmp_path, nproc=2):
    path = tmp_path / "worker.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(path), *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.parametrize("capacity", ["none", "0.6"])
def test_expert_parallel_layer_matches_the_unsharded_layer(capacity, tmp_path):
    res = _torchrun(_EP_WORKER, [capacity], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("EP-OK") == 2


# ================================================================================================
# eval_xtreme.py: metrics by hand, loaders on files in XTREME's exact formats, the CLI
# ================================================================================================

_EV_SCRIPT = Path(__file__).resolve().parent / "eval_xtreme.py"


def _ev_write(path, text, encoding="utf-8"):
    """Write text byte for byte (no newline translation), creating the folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _ev_json(path, obj):
    return _ev_write(path, json.dumps(obj, ensure_ascii=False))


def _ev_squad(qas, version="1.1", context="The bridge was opened in 1932 by the mayor."):
    """SQuAD v1.1 JSON with one paragraph holding (id, [answer texts]) questions."""
    return {"version": version, "data": [{"title": "T", "paragraphs": [{"context": context, "qas": [
        {"id": qid, "question": "Q?", "answers": [{"answer_start": 0, "text": t} for t in texts]}
        for qid, texts in qas]}]}]}


def _ev_run(*args):
    return subprocess.run([sys.executable, str(_EV_SCRIPT), *map(str, args)], capture_output=True, text=True)


def _ev_fails(result, *needles):
    """Bad input: exit 2, one clear 'error:' line naming what is wrong, no traceback."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert str(needle) in result.stderr, (needle, result.stderr)


# ------------------------------------------------------------------------------------------------
# Tasks


def test_eval_task_labels_in_xtreme_order():
    assert TASKS["udpos"]["labels"] == ["O", "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM",
                                        "PART", "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X"]
    assert TASKS["panx"]["labels"] == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    assert TASKS["xnli"]["labels"] == ["contradiction", "entailment", "neutral"]
    assert TASKS["pawsx"]["labels"] == ["0", "1"]
    counts = {t: len(s["langs"]) for t, s in TASKS.items()}
    assert counts == {"udpos": 33, "panx": 40, "xquad": 11, "mlqa": 7, "tydiqa": 9, "xnli": 15, "pawsx": 7}


# ------------------------------------------------------------------------------------------------
# Metrics against hand-worked examples


def test_eval_accuracy_by_hand():
    # 3 of 4 equal -> 75
    gold = ["entailment", "neutral", "contradiction", "neutral"]
    pred = ["entailment", "contradiction", "contradiction", "neutral"]
    assert accuracy(gold, pred) == {"accuracy": pytest.approx(75.0)}


def test_eval_seqeval_ner_lenient_iob2():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"], ["O", "I-ORG", "B-PER"]]
    # flat with an O after each sentence: gold entities (PER,0,1) (LOC,3,3) (ORG,5,6)
    # pred: I-LOC after O starts (LOC,3,3); I-ORG after O starts (ORG,6,6), ended by B-PER -> (PER,7,7)
    assert get_entities(pred) == [("PER", 0, 1), ("LOC", 3, 3), ("ORG", 6, 6), ("PER", 7, 7)]
    # correct 2 (PER 0-1, LOC 3-3): P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7
    scores = seqeval_scores(gold, pred)
    assert scores["precision"] == pytest.approx(50.0)
    assert scores["recall"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(400 / 7)


def test_eval_seqeval_sentence_boundary_is_o():
    # B-LOC | I-LOC across a sentence boundary: two entities, not one (LOC,0,1)
    assert get_entities([["B-LOC"], ["I-LOC"]]) == [("LOC", 0, 0), ("LOC", 2, 2)]
    # seqeval's start rule (S, I): an I after a single-token S chunk starts a chunk even of the same type
    assert get_entities([["S-PER", "I-PER"]]) == [("PER", 0, 0), ("PER", 1, 1)]


def test_eval_seqeval_pos_chunks():
    gold = [["DET", "NOUN", "NOUN", "VERB", "SCONJ", "SCONJ", "PRON", "NOUN"], ["NOUN", "SYM", "NUM"]]
    pred = [["DET", "NOUN", "NOUN", "VERB", "SCONJ", "ADP", "PRON", "NOUN"], ["NOUN", "NOUN", "NUM"]]
    # the first character is the tag: NOUN NOUN is one chunk, each SCONJ / SYM ("S") is its own chunk,
    # and NOUN at 7 and NOUN at 9 are split by the boundary O at 8
    assert get_entities(gold) == [("DET", 0, 0), ("NOUN", 1, 2), ("VERB", 3, 3), ("SCONJ", 4, 4), ("SCONJ", 5, 5),
                                  ("PRON", 6, 6), ("NOUN", 7, 7), ("NOUN", 9, 9), ("SYM", 10, 10), ("NUM", 11, 11)]
    # pred: DET, NOUN 1-2, VERB, SCONJ 4, ADP 5, PRON, NOUN 7, NOUN 9-10, NUM -> 9 chunks, 7 of them in gold
    # P = 7/9, R = 7/10, F1 = 2*7/(9+10) = 14/19 (token accuracy would be 9/11)
    scores = seqeval_scores(gold, pred)
    assert scores["precision"] == pytest.approx(700 / 9)
    assert scores["recall"] == pytest.approx(70.0)
    assert scores["f1"] == pytest.approx(1400 / 19)


def test_eval_seqeval_no_chunks_is_zero():
    assert seqeval_scores([["O", "O"]], [["O", "O"]]) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


def test_eval_squad_normalize():
    # lower, drop ASCII punctuation ("-" and "!"), drop "the", collapse spaces
    assert squad_normalize("The  Eiffel-Tower!") == "eiffeltower"
    # ASCII-only punctuation: the fullwidth comma stays; a standalone Spanish "a" goes (English articles)
    assert squad_normalize("北京，中国") == "北京，中国"
    assert squad_normalize("a Madrid") == "madrid"


def _ev_squad_case():
    questions = [
        {"id": "q1", "answers": [{"text": "the Eiffel Tower"}, {"text": "Eiffel Tower in Paris"}]},
        {"id": "q2", "answers": [{"text": "Paris, France"}]},
        {"id": "q3", "answers": [{"text": "1932"}, {"text": "in June 1932"}]},
        {"id": "q4", "answers": [{"text": "The"}]},
        {"id": "q5", "answers": [{"text": "anything"}]},
    ]
    predictions = {"q1": "Eiffel tower.", "q2": "in Paris", "q3": "June 1932", "q4": ""}
    return questions, predictions


def test_eval_squad_scores_by_hand(capsys):
    questions, predictions = _ev_squad_case()
    # q1: "eiffel tower" = first gold normalized                        EM 1  F1 1
    # q2: [in paris] vs [paris france]: 1 common, P = R = 1/2            EM 0  F1 0.5
    # q3: vs "1932": P 1/2 R 1 -> 2/3; vs "in june 1932": P 1 R 2/3 -> 0.8; max  EM 0  F1 0.8
    # q4: "" vs "The" -> "" = "": EM 1, but no common token              EM 1  F1 0
    # q5: no prediction                                                  EM 0  F1 0
    # EM = 2/5 = 40; F1 = (1 + 0.5 + 0.8)/5 = 46
    scores = squad_scores(questions, predictions)
    assert scores["exact_match"] == pytest.approx(40.0)
    assert scores["f1"] == pytest.approx(46.0)
    assert "q5" in capsys.readouterr().err


def test_eval_squad_max_over_golds_separately():
    # EM from gold "a" (normalizes to ""), F1 from neither: EM 1, F1 0
    q = [{"id": "x", "answers": [{"text": "a"}, {"text": "b c"}]}]
    assert squad_scores(q, {"x": ""}) == {"exact_match": pytest.approx(100.0), "f1": pytest.approx(0.0)}


def test_eval_mlqa_normalize_by_language():
    # zh: Unicode punctuation dropped, each CJK character a token, the runs between split on spaces
    assert mlqa_normalize("北京大学。", "zh") == "北 京 大 学"
    assert mlqa_normalize("GPT-4模型 v2", "zh") == "gpt4 模 型 v2"
    # ar: every "ال" goes, even inside a word
    assert mlqa_normalize("فالكتاب", "ar") == "ف كتاب"
    assert mlqa_normalize("الكتاب", "ar") == "كتاب"
    # es articles; the preposition "a" stays (unlike SQuAD's English rule); « » are Unicode punctuation
    assert mlqa_normalize("La casa de los Reyes", "es") == "casa de reyes"
    assert mlqa_normalize("«a Madrid»", "es") == "a madrid"
    assert mlqa_normalize("Der Hund", "de") == "hund"
    assert mlqa_normalize("The  Dog", "hi") == "the dog"
    with pytest.raises(ValueError, match="Unknown Language"):
        mlqa_normalize("le chat", "fr")


def test_eval_mlqa_scores_by_hand():
    questions = [{"id": "a", "answers": [{"text": "北京大学。"}]}, {"id": "b", "answers": [{"text": "清华大学"}]}]
    predictions = {"a": "北京大学", "b": "北京大学"}
    # a: equal after dropping "。": EM 1 F1 1; b: chars [北京大学] vs [清华大学]: 2 common, P = R = 1/2: F1 0.5
    scores = mlqa_scores(questions, predictions, "zh")
    assert scores == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(75.0)}
    # SQuAD's normalization keeps the fullwidth "。" (not ASCII) and sees one token per answer: all 0
    assert squad_scores(questions, predictions) == {"exact_match": 0.0, "f1": 0.0}


def test_eval_summarize_avg_metric():
    qa = summarize("mlqa", {"en": {"exact_match": 40.0, "f1": 60.0}, "de": {"exact_match": 20.0, "f1": 50.0}})
    # avg EM 30, avg F1 55, avg_metric (30 + 55)/2
    assert (qa["avg_exact_match"], qa["avg_f1"], qa["avg_metric"]) == (30.0, 55.0, 42.5)
    assert qa["de"] == {"exact_match": 20.0, "f1": 50.0}
    tag = summarize("panx", {"en": {"f1": 80.0, "precision": 70.0, "recall": 90.0},
                             "de": {"f1": 60.0, "precision": 50.0, "recall": 70.0}})
    assert (tag["avg_f1"], tag["avg_precision"], tag["avg_recall"], tag["avg_metric"]) == (70.0, 60.0, 80.0, 70.0)
    assert summarize("xnli", {"en": {"accuracy": 80.0}, "fr": {"accuracy": 70.0}})["avg_metric"] == 75.0


# ------------------------------------------------------------------------------------------------
# Loaders on files in the exact formats of XTREME's download script


def test_eval_load_tagging_bom_crlf_docstart(tmp_path):
    # BOM, CRLF, a -DOCSTART- line, a middle column (the tag is the last field), no final newline
    _ev_write(tmp_path / "udpos/train-en.tsv",
              "\ufeff-DOCSTART-\r\n\r\nBirds\tNOUN\r\nsing\tx\tVERB\r\n.\tPUNCT\r\n\r\nLoud\tADJ\r\nmusic\tNOUN")
    assert load_split(tmp_path, "udpos", "train", "en") == [
        {"words": ["Birds", "sing", "."], "labels": ["NOUN", "VERB", "PUNCT"]},
        {"words": ["Loud", "music"], "labels": ["ADJ", "NOUN"]}]


def test_eval_load_tagging_test_without_labels(tmp_path):
    _ev_write(tmp_path / "panx/test-de.tsv", "Maria\nbesuchte\nBerlin\n\nUNESCO\n")
    _ev_write(tmp_path / "panx/dev-de.tsv", "Maria\tB-PER\nBerlin\tB-LOC\n")
    assert load_split(tmp_path, "panx", "test", "de") == [
        {"words": ["Maria", "besuchte", "Berlin"], "labels": None}, {"words": ["UNESCO"], "labels": None}]
    assert load_split(tmp_path, "panx", "dev", "de")[0]["labels"] == ["B-PER", "B-LOC"]


def test_eval_load_tagging_bad_lines(tmp_path):
    path = _ev_write(tmp_path / "panx/train-en.tsv", "Maria\tB-PER\nvisited\nParis\tB-LOC\n")
    with pytest.raises(DataError, match=f"{path}:2:"):  # labelled file, line 2 without a tag
        load_split(tmp_path, "panx", "train", "en")
    path = _ev_write(tmp_path / "panx/dev-en.tsv", "Maria\tB-PER\n\nParis\tB-MISC\n")
    with pytest.raises(DataError, match=f"{path}:3: 'B-MISC'"):
        load_split(tmp_path, "panx", "dev", "en")


def test_eval_load_pairs_quotes_kept_crlf(tmp_path):
    # csv.writer output: CRLF and a quoted field with doubled quotes, read back with quoting off
    _ev_write(tmp_path / "xnli/dev-en.tsv", 'The cat sat.\tA cat is sitting.\tentailment\r\n'
                                            '"She said ""no"" twice."\tShe agreed.\tcontradiction\r\n')
    _ev_write(tmp_path / "xnli/test-de.tsv", "\ufeffDer Zug kam an.\tDer Zug hatte Verspätung.\r\n")
    assert load_split(tmp_path, "xnli", "dev", "en") == [
        {"text_a": "The cat sat.", "text_b": "A cat is sitting.", "label": "entailment"},
        {"text_a": '"She said ""no"" twice."', "text_b": "She agreed.", "label": "contradiction"}]
    assert load_split(tmp_path, "xnli", "test", "de") == [
        {"text_a": "Der Zug kam an.", "text_b": "Der Zug hatte Verspätung.", "label": None}]


def test_eval_load_pairs_bad_lines(tmp_path):
    path = _ev_write(tmp_path / "pawsx/train-en.tsv", "a b\ta c\t1\r\nx\ty\tz\t0\r\n")
    with pytest.raises(DataError, match=f"{path}:2: 4 TAB-separated fields"):
        load_split(tmp_path, "pawsx", "train", "en")
    path = _ev_write(tmp_path / "pawsx/dev-en.tsv", "a\tb\t1\r\nc\td\t2\r\n")
    with pytest.raises(DataError, match=f"{path}:2: '2'"):
        load_split(tmp_path, "pawsx", "dev", "en")
    path = _ev_write(tmp_path / "xnli/dev-fr.tsv", "a\tb\tneutral\r\nc\td\r\n")
    with pytest.raises(DataError, match=f"{path}:2: no label column"):
        load_split(tmp_path, "xnli", "dev", "fr")


def test_eval_load_squad_and_stripped_xquad(tmp_path):
    _ev_json(tmp_path / "squad/train-v1.1.json", _ev_squad([("s1", ["1932"])]))
    stripped = {"data": [{"paragraphs": [{"context": "Die Brücke.", "qas": [
        {"answers": [{"answer_start": 0, "text": ""}], "question": "Wann?", "id": "q-0001"}]}]}], "version": "1.1"}
    _ev_json(tmp_path / "xquad/xquad.de.json", stripped)
    assert load_split(tmp_path, "xquad", "train", "en") == [
        {"id": "s1", "question": "Q?", "context": "The bridge was opened in 1932 by the mayor.",
         "answers": [{"text": "1932", "answer_start": 0}]}]
    assert load_split(tmp_path, "mlqa", "train", "en")[0]["id"] == "s1"  # MLQA trains on SQuAD too
    assert load_split(tmp_path, "xquad", "test", "de") == [
        {"id": "q-0001", "question": "Wann?", "context": "Die Brücke.", "answers": None}]
    with pytest.raises(DataError, match="only in English"):
        load_split(tmp_path, "xquad", "train", "de")


def test_eval_load_mlqa_numeric_version(tmp_path):
    root = tmp_path / "mlqa/MLQA_V1"
    _ev_json(root / "test/test-context-de-question-de.json", _ev_squad([("h" * 40, ["1932"])], version=1.0))
    _ev_json(root / "test/test-context-de-question-en.json", _ev_squad([("c", ["x"])], version=1.0))
    _ev_json(root / "dev/dev-context-es-question-es.json", _ev_squad([("d", ["y"])], version=1.0))
    _ev_json(tmp_path / "squad/dev-v1.1.json", _ev_squad([("e", ["z"])]))
    assert load_split(tmp_path, "mlqa", "test", "de")[0]["answers"] == [{"text": "1932", "answer_start": 0}]
    assert languages(tmp_path, "mlqa", "test") == ["de"]  # context language = question language only
    assert languages(tmp_path, "mlqa", "dev") == ["en", "es"]  # en from SQuAD dev
    assert load_split(tmp_path, "mlqa", "dev", "en")[0]["id"] == "e"


def test_eval_load_tydiqa_both_spellings(tmp_path):
    _ev_json(tmp_path / "tydiqa/tydiqa-goldp-v1.1-train/tydiqa.goldp.en.train.json", _ev_squad([("1", ["a b"])]))
    _ev_json(tmp_path / "tydiqa/tydiqa-goldp-v1.1-train/tydiqa-goldp-v1.1-train.json", _ev_squad([("2", ["c"])]))
    _ev_json(tmp_path / "tydiqa/tydiqa-goldp-v1.1-dev/tydiqa.sw.dev.json",
             _ev_squad([("swahili--123-0", ["Nairobi", "mji wa Nairobi"])]))
    _ev_json(tmp_path / "tydiqa/tydiqa-goldp-v1.1-dev/tydiqa.goldp.ar.dev.json", _ev_squad([("arabic-1-0", ["x"])]))
    assert languages(tmp_path, "tydiqa", "train") == ["en"]
    assert languages(tmp_path, "tydiqa", "test") == ["ar", "sw"]
    assert [a["text"] for a in load_split(tmp_path, "tydiqa", "test", "sw")[0]["answers"]] == ["Nairobi",
                                                                                                "mji wa Nairobi"]
    assert load_split(tmp_path, "tydiqa", "train", "en")[0]["id"] == "1"
    with pytest.raises(DataError, match="no 'dev' split"):
        load_split(tmp_path, "tydiqa", "dev", "en")


def test_eval_missing_folder_and_language(tmp_path):
    with pytest.raises(DataError) as e:
        load_split(tmp_path / "download", "udpos", "test", "de")
    assert str(tmp_path / "download/udpos/test-de.tsv") in str(e.value) and str(tmp_path) in str(e.value)
    _ev_write(tmp_path / "udpos/test-en.tsv", "Birds\n")
    _ev_write(tmp_path / "udpos/test-fr.tsv", "Oiseaux\n")
    with pytest.raises(DataError, match="found test files for: en, fr") as e:
        load_split(tmp_path, "udpos", "test", "de")
    assert str(tmp_path / "udpos/test-de.tsv") in str(e.value)
    with pytest.raises(DataError, match="unknown task 'pos'"):
        load_split(tmp_path, "pos", "test", "de")


def test_eval_malformed_json(tmp_path):
    path = _ev_write(tmp_path / "xquad/xquad.en.json", '{"data": [\n  {"paragraphs": }\n]}')
    with pytest.raises(DataError, match=f"{path}:2:"):
        load_split(tmp_path, "xquad", "test", "en")
    path = _ev_json(tmp_path / "xquad/xquad.es.json", {"data": [{"title": "no paragraphs"}]})
    with pytest.raises(DataError, match="not SQuAD v1.1 JSON"):
        load_split(tmp_path, "xquad", "test", "es")


# ------------------------------------------------------------------------------------------------
# Official label and prediction files


def test_eval_write_and_read_official_files(tmp_path):
    path = write_predictions(tmp_path, "udpos", "en", [["NOUN", "VERB"], ["ADJ"]])
    assert path == tmp_path / "udpos/test-en.tsv" and path.read_text() == "NOUN\nVERB\n\nADJ\n\n"
    path = write_predictions(tmp_path, "xnli", "de", ["neutral", "entailment"])
    assert path.read_text() == "neutral\nentailment\n"
    path = write_predictions(tmp_path, "xquad", "zh", {"q1": "北京"})
    assert path.name == "test-zh.json" and json.loads(path.read_text(encoding="utf-8")) == {"q1": "北京"}
    # XT read_tag: no trailing blank line, the last sentence still counts
    assert read_tag(_ev_write(tmp_path / "t.tsv", "B-PER\nO\n\nB-LOC")) == [["B-PER", "O"], ["B-LOC"]]
    assert read_label(_ev_write(tmp_path / "l.tsv", "1\r\n0\r\n")) == ["1", "0"]


def test_eval_write_labels_round_trip(tmp_path):
    questions = [{"id": "q1", "question": "Wann?", "context": "1932 ...",
                  "answers": [{"text": "1932", "answer_start": 0}]}]
    path = write_labels(tmp_path, "tydiqa", "fi", questions)
    assert json.loads(path.read_text())["data"][0]["paragraphs"][0]["qas"][0]["id"] == "q1"
    assert read_squad(path) == questions
    with pytest.raises(DataError, match="no labels"):
        write_labels(tmp_path, "xnli", "en", [{"text_a": "a", "text_b": "b", "label": None}])


# ------------------------------------------------------------------------------------------------
# The command line, end to end


def _ev_score_folders(tmp_path):
    gold, pred = tmp_path / "labels", tmp_path / "predictions"
    pos_gold = [["DET", "NOUN", "NOUN", "VERB", "SCONJ", "SCONJ", "PRON", "NOUN"], ["NOUN", "SYM", "NUM"]]
    pos_pred = [["DET", "NOUN", "NOUN", "VERB", "SCONJ", "ADP", "PRON", "NOUN"], ["NOUN", "NOUN", "NUM"]]
    _ev_write(gold / "udpos/test-en.tsv", "\n\n".join("\n".join(s) for s in pos_gold))  # no trailing blank
    write_predictions(pred, "udpos", "en", pos_pred)
    write_predictions(gold, "udpos", "de", [["NOUN", "VERB"]])
    write_predictions(pred, "udpos", "de", [["NOUN", "VERB"]])
    write_predictions(gold, "xnli", "en", ["entailment", "neutral", "contradiction", "neutral"])
    write_predictions(pred, "xnli", "en", ["entailment", "contradiction", "contradiction", "neutral"])
    write_predictions(gold, "xnli", "de", ["neutral", "neutral"])
    write_predictions(pred, "xnli", "de", ["neutral", "entailment"])
    questions, predictions = _ev_squad_case()
    _ev_json(gold / "xquad/test-en.json", _ev_squad([(q["id"], [a["text"] for a in q["answers"]]) for q in questions]))
    write_predictions(pred, "xquad", "en", predictions)
    _ev_json(gold / "mlqa/test-zh.json", _ev_squad([("a", ["北京大学。"]), ("b", ["清华大学"])], version=1.0))
    write_predictions(pred, "mlqa", "zh", {"a": "北京大学", "b": "北京大学"})
    return gold, pred


def test_eval_cli_score_json(tmp_path):
    gold, pred = _ev_score_folders(tmp_path)
    result = _ev_run("score", "--predictions", pred, "--labels", gold, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)  # exactly one JSON object
    assert list(scores) == ["udpos", "xquad", "mlqa", "xnli"]
    # udpos: en F1 14/19, P 7/9, R 7/10 (the POS case above); de all right: 100
    assert scores["udpos"]["en"] == {"f1": pytest.approx(1400 / 19), "precision": pytest.approx(700 / 9),
                                     "recall": pytest.approx(70.0)}
    assert scores["udpos"]["avg_f1"] == pytest.approx((1400 / 19 + 100) / 2)
    assert scores["udpos"]["avg_metric"] == pytest.approx((1400 / 19 + 100) / 2)
    # xnli: en 3/4, de 1/2 -> 62.5
    assert scores["xnli"]["avg_accuracy"] == pytest.approx(62.5) and scores["xnli"]["de"]["accuracy"] == 50.0
    # xquad: EM 40, F1 46 (the SQuAD case above, q5 unanswered) -> avg_metric 43
    assert scores["xquad"]["en"] == {"exact_match": pytest.approx(40.0), "f1": pytest.approx(46.0)}
    assert scores["xquad"]["avg_metric"] == pytest.approx(43.0)
    assert "Unanswered question q5" in result.stderr
    # mlqa zh: EM 50, F1 75 -> avg_metric 62.5
    assert scores["mlqa"]["avg_exact_match"] == pytest.approx(50.0) and scores["mlqa"]["avg_metric"] == 62.5


def test_eval_cli_score_listing(tmp_path):
    gold, pred = _ev_score_folders(tmp_path)
    result = _ev_run("score", "--predictions", pred, "--labels", gold)
    assert result.returncode == 0, result.stderr
    assert "udpos: avg_metric 86.84" in result.stdout and "xnli: avg_metric 62.50" in result.stdout


def test_eval_cli_score_bad_input(tmp_path):
    gold, pred = _ev_score_folders(tmp_path)
    _ev_fails(_ev_run("score", "--predictions", pred, "--labels", tmp_path / "nowhere"),
              tmp_path / "nowhere", "<task>/test-<lang>.tsv")
    (pred / "xnli/test-de.tsv").unlink()
    _ev_fails(_ev_run("score", "--predictions", pred, "--labels", gold), pred / "xnli/test-de.tsv")
    write_predictions(pred, "xnli", "de", ["neutral"])  # 1 line for 2 labels
    _ev_fails(_ev_run("score", "--predictions", pred, "--labels", gold), pred / "xnli/test-de.tsv",
              gold / "xnli/test-de.tsv")
    write_predictions(pred, "xnli", "de", ["neutral", "neutral"])
    _ev_write(pred / "udpos/test-de.tsv", "NOUN\nverb\n")  # a word, not a tag
    _ev_fails(_ev_run("score", "--predictions", pred, "--labels", gold), f"{pred / 'udpos/test-de.tsv'}:2:")
    write_predictions(pred, "udpos", "de", [["NOUN", "VERB"]])
    _ev_write(gold / "udpos/test-de.tsv", "")
    _ev_fails(_ev_run("score", "--predictions", pred, "--labels", gold), gold / "udpos/test-de.tsv", "no labels")
    write_predictions(gold, "udpos", "de", [["NOUN", "VERB"]])
    _ev_write(pred / "mlqa/test-zh.json", '{"a": "北京",\n "b": }')
    _ev_fails(_ev_run("score", "--predictions", pred, "--labels", gold), f"{pred / 'mlqa/test-zh.json'}:2:")
    _ev_json(gold / "mlqa/test-zh.json", _ev_squad([("a", [""])]))  # stripped test file: no gold
    write_predictions(pred, "mlqa", "zh", {"a": "北京"})
    _ev_fails(_ev_run("score", "--predictions", pred, "--labels", gold), gold / "mlqa/test-zh.json", "no gold")


def _ev_results(task, name, mean, std):
    out = {"task": task, "seeds": {"1": dict(mean), "2": dict(mean)}, "mean": mean, "std": std, "ic": None}
    return {**out, "name": name} if name else out


def test_eval_cli_table(tmp_path):
    a, b, c = tmp_path / "xmoe-run", tmp_path / "smoe-run", tmp_path / "pawsx-only"
    _ev_json(a / "udpos/results.json", _ev_results("udpos", "X-MoE", {"avg_f1": 70.8, "avg_metric": 70.8},
                                                   {"avg_f1": 0.3, "avg_metric": 0.3}))
    _ev_json(a / "xquad/results.json", _ev_results("xquad", "X-MoE", {"avg_f1": 72.4, "avg_exact_match": 56.2},
                                                   {"avg_f1": 0.5, "avg_exact_match": 0.4}))
    _ev_json(b / "udpos/results.json", _ev_results("udpos", None, {"avg_f1": 70.1}, {"avg_f1": 0.2}))
    _ev_json(b / "xquad/results.json", _ev_results("xquad", None, {"avg_f1": 71.3, "avg_exact_match": 55.2},
                                                   {"avg_f1": 0.1, "avg_exact_match": 0.6}))
    _ev_json(c / "results.json", _ev_results("pawsx", None, {"avg_accuracy": 85.2}, {"avg_accuracy": 0.1}))
    # Avg = mean of the task scores, QA as (F1 + EM)/2: X-MoE (70.8 + 64.3)/2 = 67.55, SMoE (70.1 + 63.25)/2
    table = build_table([a, b])
    assert [r["name"] for r in table["rows"]] == ["X-MoE", "smoe-run"] and table["avg_over"] == ["udpos", "xquad"]
    assert table["rows"][0]["avg"] == pytest.approx(67.55) and table["rows"][1]["avg"] == pytest.approx(66.675)
    result = _ev_run("table", a, b)
    assert result.returncode == 0, result.stderr
    header, row_a, row_b = result.stdout.splitlines()[:3]
    assert header.split()[:4] == ["Model", "POS", "F1", "NER"] and "XQuAD F1 / EM" in header
    assert row_a.startswith("X-MoE") and "70.8 ± 0.3" in row_a and "72.4 ± 0.5 / 56.2 ± 0.4" in row_a
    assert row_b.startswith("smoe-run") and " - " in row_b  # no NER results: "-"
    result = _ev_run("table", a, c, "--markdown")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and all(line.startswith("| ") for line in lines[:4])
    assert lines[3].startswith("| pawsx-only |") and "85.2 ± 0.1" in lines[3] and lines[3].endswith("| - |")
    assert json.loads(_ev_run("table", c, "--json").stdout)["rows"][0]["tasks"]["pawsx"] == {
        "avg_accuracy": {"mean": 85.2, "std": 0.1}}


def test_eval_cli_table_bad_input(tmp_path):
    _ev_fails(_ev_run("table", tmp_path / "missing-run"), tmp_path / "missing-run" / "<task>" / "results.json")
    _ev_json(tmp_path / "run/xnli/results.json", {"task": "xnli", "mean": {"avg_f1": 1.0}, "std": {}})
    _ev_fails(_ev_run("table", tmp_path / "run"), tmp_path / "run/xnli/results.json", "avg_accuracy")
    _ev_write(tmp_path / "run/xnli/results.json", '{"task": "xnli",\n')
    _ev_fails(_ev_run("table", tmp_path / "run"), f"{tmp_path / 'run/xnli/results.json'}:2:")


# ================================================================================================
# The synthetic world (eval_xtreme.py make-synthetic), read back with parsers written here
# ================================================================================================

_SYN_TEST_UPOS = {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
                  "PUNCT", "SCONJ", "SYM", "VERB", "X"}
_SYN_TEST_NER = {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"}


@pytest.fixture(scope="module")
def _syn_test_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return str(out), make_synthetic(str(out), seed=0)


def _syn_test_all_files(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _syn_test_read_tagging(path):
    """XTREME.md 3.3/3.4: word<TAB>tag lines, one blank line between sentences, none at the end."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    assert "\r" not in text and text.endswith("\n") and not text.endswith("\n\n"), path
    sentences = []
    for block in text[:-1].split("\n\n"):
        sent = []
        for line in block.split("\n"):
            fields = line.split("\t")
            assert len(fields) == 2 and fields[0] and fields[1], (path, line)
            assert not any(ch.isspace() for ch in fields[0]), (path, line)
            sent.append((fields[0], fields[1]))
        sentences.append(sent)
    return sentences


def _syn_test_read_pairs(path):
    """XTREME.md 3.2: rows from csv.writer(delimiter TAB): CRLF, no header; read back as XTREME
    does, with quoting off, so that quote characters stay in the text."""
    with open(path, "rb") as f:
        raw = f.read().decode("utf-8")
    lines = raw.split("\r\n")
    assert lines[-1] == "" and all("\n" not in line and "\r" not in line for line in lines[:-1]), path
    rows = list(csv.reader(io.StringIO(raw, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert all(len(r) == 3 for r in rows), path
    # the file is exactly what csv.writer writes for the quote-aware reading of itself
    decoded = list(csv.reader(io.StringIO(raw, newline=""), delimiter="\t"))
    buf = io.StringIO(newline="")
    csv.writer(buf, delimiter="\t").writerows(decoded)
    assert buf.getvalue() == raw, path
    return rows, decoded


def _syn_test_entities(sent):
    """IOB2 chunks (type, text); asserts that no I-X follows O or another type."""
    chunks, prev = [], "O"
    for w, t in sent:
        if t.startswith("I-"):
            assert prev != "O" and prev[2:] == t[2:], sent
            chunks[-1] = (chunks[-1][0], chunks[-1][1] + " " + w)
        elif t.startswith("B-"):
            chunks.append((t[2:], w))
        prev = t
    return chunks


def _syn_test_script(ch):
    return unicodedata.name(ch).split()[0]


def test_synth_layout_and_counts(_syn_test_world):
    root, summary = _syn_test_world
    expected = {os.path.join("mlm", f"{lang}.txt") for lang in SYN_LANGS}
    for task in ("udpos", "panx", "pawsx"):
        expected.add(os.path.join(task, "train-en.tsv"))
        expected |= {os.path.join(task, f"{s}-{lang}.tsv") for s in ("dev", "test") for lang in SYN_LANGS}
    expected |= {os.path.join("squad", "train-v1.1.json"), os.path.join("squad", "dev-v1.1.json")}
    expected |= {os.path.join("xquad", f"xquad.{lang}.json") for lang in SYN_LANGS}
    assert set(_syn_test_all_files(root)) == expected
    assert summary["languages"] == list(SYN_LANGS) and summary["train_language"] == "en"
    assert SYN_SIZES == {"train": 2000, "dev": 200, "test": 300}
    for task in ("udpos", "panx"):
        for name, n in summary["counts"][task].items():
            assert len(_syn_test_read_tagging(os.path.join(root, task, name + ".tsv"))) == n
            assert n == SYN_SIZES[name.split("-")[0]]
    for name, n in summary["counts"]["pawsx"].items():
        assert len(_syn_test_read_pairs(os.path.join(root, "pawsx", name + ".tsv"))[0]) == n
        assert n == SYN_SIZES[name.split("-")[0]]
    assert summary["counts"]["squad"] == {"train-v1.1": 2000, "dev-v1.1": 200}
    assert summary["counts"]["xquad"] == {f"xquad.{lang}": 300 for lang in SYN_LANGS}


def test_synth_deterministic_for_a_seed(_syn_test_world, tmp_path):
    root, _ = _syn_test_world
    make_synthetic(str(tmp_path / "again"), seed=0)
    make_synthetic(str(tmp_path / "other"), seed=1)
    a = _syn_test_all_files(root)
    assert _syn_test_all_files(tmp_path / "again") == a  # byte-identical
    b = _syn_test_all_files(tmp_path / "other")
    assert set(b) == set(a) and all(b[k] != a[k] for k in a)


def test_synth_languages_scripts_and_corpus_sizes(_syn_test_world):
    root, summary = _syn_test_world
    assert len(SYN_LANGS) >= 6 and SYN_LANGS[0] == "en"
    scripts, sizes = set(), []
    for lang in SYN_LANGS:
        with open(os.path.join(root, "mlm", f"{lang}.txt"), "rb") as f:
            data = f.read()
        sizes.append(len(data))
        assert summary["info"][lang]["mlm_bytes"] == len(data)
        text = data.decode("utf-8")
        assert text.endswith("\n") and "" not in text[:-1].split("\n")
        letters = [ch for ch in text[:20000] if ch.isalpha()]
        own = {_syn_test_script(ch) for ch in letters if not ch.isascii()}  # names are Latin everywhere
        declared = summary["info"][lang]["script"].upper()
        assert own <= {declared}, (lang, own)
        if declared != "LATIN":
            assert sum(not ch.isascii() for ch in letters) > len(letters) / 2, lang
        scripts |= {_syn_test_script(ch) for ch in letters}
    assert len(scripts) >= 3 and {"LATIN", "CYRILLIC", "GREEK"} <= scripts
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # high- to low-resource
    assert sizes[0] > 1_000_000 and sizes[-1] < 200_000 and sum(sizes) < 5_200_000


def test_synth_code_switching_only_in_the_pretraining_text(_syn_test_world):
    """English content words appear in the distant languages' MLM lines (about 0.3 of the lines), never
    in their labelled files, where the only ASCII words are names, numbers and punctuation."""
    root, _ = _syn_test_world
    english = set()
    for sent in _syn_test_read_tagging(os.path.join(root, "udpos", "train-en.tsv")):
        english |= {w for w, t in sent if t in ("NOUN", "VERB", "ADJ") and w.islower() and len(w) > 3}
    for lang in ("ru", "el", "ar", "hi"):
        with open(os.path.join(root, "mlm", f"{lang}.txt"), encoding="utf-8") as f:
            lines = f.read().splitlines()[:2000]
        share = sum(any(w in english for w in line.split()) for line in lines) / len(lines)
        assert 0.1 < share < 0.4, (lang, share)
        for sent in _syn_test_read_tagging(os.path.join(root, "udpos", f"test-{lang}.tsv")):
            assert all(t in ("PROPN", "NUM", "PUNCT") for w, t in sent if w.isascii() and w.isalpha()), sent


def test_synth_udpos_files(_syn_test_world):
    root, _ = _syn_test_world
    train = _syn_test_read_tagging(os.path.join(root, "udpos", "train-en.tsv"))
    tags = {t for s in train for _, t in s}
    assert tags <= _SYN_TEST_UPOS and len(tags) >= 12
    for split in ("dev", "test"):
        per_lang = {lang: _syn_test_read_tagging(os.path.join(root, "udpos", f"{split}-{lang}.tsv"))
                    for lang in SYN_LANGS}
        for lang, sents in per_lang.items():
            assert {t for s in sents for _, t in s} <= _SYN_TEST_UPOS, lang
        # parallel meanings: numbers and names are the same anchors in every language
        for i in range(SYN_SIZES[split]):
            anchors = {lang: sorted(w for w, t in per_lang[lang][i] if t in ("NUM", "PROPN")) for lang in SYN_LANGS}
            assert all(a == anchors["en"] for a in anchors.values()), anchors


def test_synth_panx_files(_syn_test_world):
    root, _ = _syn_test_world
    train = _syn_test_read_tagging(os.path.join(root, "panx", "train-en.tsv"))
    assert {t for s in train for _, t in s} == _SYN_TEST_NER
    assert all(_syn_test_entities(s) for s in train)  # every sentence names an entity
    multiword = [c for s in train for c in _syn_test_entities(s) if " " in c[1]]
    assert {c[0] for c in multiword} == {"PER", "ORG", "LOC"}
    for split in ("dev", "test"):
        per_lang = {lang: _syn_test_read_tagging(os.path.join(root, "panx", f"{split}-{lang}.tsv"))
                    for lang in SYN_LANGS}
        for i in range(SYN_SIZES[split]):
            ents = {lang: sorted(_syn_test_entities(per_lang[lang][i])) for lang in SYN_LANGS}
            assert ents["en"] and all(e == ents["en"] for e in ents.values()), ents
            assert all(text.isascii() for _, text in ents["en"])  # Latin-script names everywhere


def test_synth_pawsx_files(_syn_test_world):
    root, _ = _syn_test_world
    rows, decoded = _syn_test_read_pairs(os.path.join(root, "pawsx", "train-en.tsv"))
    assert {r[2] for r in rows} == {"0", "1"}
    assert 0.4 < sum(r[2] == "1" for r in rows) / len(rows) < 0.6
    quoted = [r for r in rows if r[0].startswith('"') or r[1].startswith('"')]
    assert quoted and all('""' in (r[0] + r[1]) for r in quoted)  # csv quoting, kept by QUOTE_NONE
    for r, d in zip(rows, decoded):  # PAWS-style: both sentences share most of their words
        a, b = d[0].lower().split(), d[1].lower().split()
        assert d[0] != d[1] and len(set(a) & set(b)) >= 0.4 * min(len(set(a)), len(set(b))), d
    for split in ("dev", "test"):
        labels = None
        for lang in SYN_LANGS:
            rows, _ = _syn_test_read_pairs(os.path.join(root, "pawsx", f"{split}-{lang}.tsv"))
            assert {r[2] for r in rows} == {"0", "1"}, lang
            assert labels is None or [r[2] for r in rows] == labels  # parallel across languages
            labels = [r[2] for r in rows]


def test_synth_squad_and_xquad_files(_syn_test_world):
    root, _ = _syn_test_world
    ids = {}
    paths = [("squad/train-v1.1.json", "en", 2000), ("squad/dev-v1.1.json", "en", 200)] + \
        [(f"xquad/xquad.{lang}.json", lang, 300) for lang in SYN_LANGS]
    for name, lang, n in paths:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            d = json.load(f)
        assert d["version"] == "1.1" and isinstance(d["data"], list)
        qids = []
        for art in d["data"]:
            assert isinstance(art["title"], str)
            for p in art["paragraphs"]:
                ctx = p["context"]
                assert len(ctx.encode("utf-8")) <= 320 and ctx.count(" . ") + ctx.count(" । ") >= 1
                for qa in p["qas"]:
                    qids.append(qa["id"])
                    assert qa["question"].endswith(("?", ";", "؟")), qa
                    (ans,) = qa["answers"]
                    s, text = ans["answer_start"], ans["text"]
                    assert text and text == text.strip() and ctx[s:s + len(text)] == text, (ctx, ans)
                    assert (s == 0 or ctx[s - 1] == " ") and (s + len(text) == len(ctx) or ctx[s + len(text)] == " ")
        assert len(qids) == n and len(set(qids)) == n, name
        ids[name] = qids
    xq = [ids[f"xquad/xquad.{lang}.json"] for lang in SYN_LANGS]
    assert all(q == xq[0] for q in xq)  # XQuAD: the same question ids in every language
    assert not set(xq[0]) & set(ids["squad/train-v1.1.json"])


# ================================================================================================
# train_mlm.py: masking and sampling by hand; the CLI end to end; resume; 2 processes; bad input
# ================================================================================================

_TR_DIR = Path(__file__).resolve().parent
_TR_WORDS = {
    "en": "the cat dog sat on a mat and ran far away quickly red blue house tree".split(),
    "de": "der die das katze hund saß auf der matte und lief weit weg rot blau".split(),
    "ru": "кот собака сидел на коврике и бежал далеко быстро красный синий дом".split(),
}


def _tr_corpus(folder, lines=None, seed=0):
    """A small 3-language corpus: random sentences over a few words per language (two scripts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for lang, n in (lines or {"en": 600, "de": 250, "ru": 120}).items():
        text = "".join(" ".join(rng.choice(_TR_WORDS[lang]) for _ in range(rng.randint(3, 9))) + "\n"
                       for _ in range(n))
        (folder / f"{lang}.txt").write_text(text, encoding="utf-8")
    return folder


def _tr_start(args, tmp, nproc=None):
    """Start the CLI (or torchrun with nproc processes) in the background."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(_TR_DIR)}
    script = str(_TR_DIR / "train_mlm.py")
    cmd = ([sys.executable, script] if nproc is None else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script])
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=tmp, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _tr_wait(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _tr_rows(out_dir, kind):
    """The log's rows of one kind: data (step 0: languages, n_i, q_i), train (a step), eval."""
    rows = [json.loads(s) for s in (Path(out_dir) / "log.jsonl").read_text().splitlines() if s]
    key = {"data": "q", "train": "loss", "eval": "val_mlm_loss"}[kind]
    return [r for r in rows if key in r]


def _tr_has_sentencepiece():
    return importlib.util.find_spec("sentencepiece") is not None


def _tr_ckpt(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------
# Masking and language sampling against hand computations


def test_train_bert_masking_statistics():
    tok = train_mlm.ByteTokenizer()
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 260, size=(256, 512))
    ids[:, 0], ids[:, 100], ids[:, 101], ids[:, -50:] = 1, 2, 1, 0  # <s>, </s>, <s>, padding
    inp, labels = train_mlm.bert_mask(ids, np.random.default_rng(1), tok)
    special = ids < 4
    assert (labels[special] == -100).all() and (inp[special] == ids[special]).all()  # never touched
    sel = labels != -100
    assert (labels[sel] == ids[sel]).all()  # the label is the original token
    assert abs(sel.sum() / (~special).sum() - 0.15) < 0.005  # 15% of the non-special tokens
    to_mask, kept = inp[sel] == 3, inp[sel] == ids[sel]
    replaced = ~to_mask & ~kept
    # a random byte equals the original with probability 1/256, so "unchanged" is 10% + 10%/256
    assert abs(to_mask.mean() - 0.8) < 0.01
    assert abs(kept.mean() - (0.1 + 0.1 / 256)) < 0.01
    assert abs(replaced.mean() - (0.1 - 0.1 / 256)) < 0.01
    assert (inp[sel][replaced] >= 4).all() and (inp[sel][replaced] < 260).all()  # a byte, never a special
    assert len(np.unique(inp[sel][replaced])) > 250  # drawn over all 256 bytes
    assert (inp[~sel & ~special] == ids[~sel & ~special]).all()


def test_train_sampling_probabilities_follow_n_to_the_alpha():
    n = [1000.0, 100.0, 10.0]
    total = sum(n)
    for alpha in (0.7, 0.3, 1.0, 0.0):
        p = [x / total for x in n]
        hand = [x ** alpha / sum(y ** alpha for y in p) for x in p]  # Conneau and Lample 2019
        assert np.allclose(train_mlm.sampling_probs(n, alpha), hand, rtol=1e-12)


def test_train_global_batches_sample_languages_by_q_and_depend_on_step_only(tmp_path):
    # every line 29 letters -> <s> 29 </s> = 31 tokens, two to a 64-token row (62 tokens + 2 pads)
    lines = {"aa": 400, "bb": 100, "cc": 20}
    for lang, k in lines.items():
        (tmp_path / f"{lang}.txt").write_text((lang[0] * 29 + "\n") * k)
    tok = train_mlm.ByteTokenizer()
    langs, train, train_lang, val, val_lang = train_mlm.read_corpus(tmp_path, tok, 64)
    assert langs == ["aa", "bb", "cc"]
    rows = [k // 2 for k in lines.values()]  # 200, 50, 10 packed rows
    held = [max(1, min(32, r // 10)) for r in rows]  # the documented validation split: 20, 5, 1
    n_tokens = [62 * (r - h) for r, h in zip(rows, held)]
    q = [n ** 0.7 / sum(m ** 0.7 for m in n_tokens) for n in n_tokens]
    assert len(val) == sum(held) and (val[:, 62:] == tok.pad).all()
    counts = np.zeros(3)
    for step in range(40):
        inp, labels = train_mlm.global_batch(step, 0, 256, np.array(q), train, train_lang, tok)
        original = np.where(labels != -100, labels, inp)
        letter = np.array([np.bincount(r[r >= 4]).argmax() - 4 for r in original])  # the row's letter byte
        counts += [(letter == ord(c)).sum() for c in "abc"]
    assert np.allclose(counts / counts.sum(), q, atol=0.015)
    a, b = (train_mlm.global_batch(7, 0, 32, np.array(q), train, train_lang, tok) for _ in range(2))
    c = train_mlm.global_batch(8, 0, 32, np.array(q), train, train_lang, tok)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], c[0])


def test_train_cli_samples_languages_by_its_alpha(tmp_path):
    # as above: 200, 50, 10 packed rows of 62 tokens, of which 20, 5, 1 are held out for validation
    for lang, k in {"aa": 400, "bb": 100, "cc": 20}.items():
        (tmp_path / f"{lang}.txt").write_text((lang[0] * 29 + "\n") * k)
    rc, out, err = _tr_wait(_tr_start(["--preset", "tiny", "--data", tmp_path, "--steps", 1, "--alpha", 0.3,
                                       "--out", tmp_path / "run"], tmp_path))
    assert rc == 0, err
    n = [62 * 180, 62 * 45, 62 * 9]
    q = [x ** 0.3 / sum(y ** 0.3 for y in n) for x in n]  # q_i = n_i^alpha / sum_j n_j^alpha
    data = _tr_rows(tmp_path / "run", "data")
    assert len(data) == 1 and data[0]["languages"] == ["aa", "bb", "cc"] and data[0]["tokens"] == n
    assert np.allclose(data[0]["q"], q, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# End to end: the loss falls; resume is bit-identical; a NaN keeps the last good checkpoint


_TR_TINY = ["--preset", "tiny", "--steps", 16, "--eval-every", 8, "--batch-size", 8, "--lr", 2e-3, "--warmup", 6]


@pytest.fixture(scope="module")
def _tr_runs(tmp_path_factory):
    """full: 16 steps. part: the same run stopped after 8 (a checkpoint), then resumed to 16 twice:
    as is (resumed) and with an absurd learning rate that must blow up (nan)."""
    tmp = tmp_path_factory.mktemp("train")
    data = _tr_corpus(tmp / "corpus")
    base = _TR_TINY + ["--data", data]
    full, part = _tr_start(base + ["--out", tmp / "full"], tmp), _tr_start(base + ["--out", tmp / "resumed", "--stop-after", 8], tmp)
    res = {"full": _tr_wait(full), "part": _tr_wait(part)}
    shutil.copytree(tmp / "resumed", tmp / "stopped")  # kept as it was at the stop
    shutil.copytree(tmp / "resumed", tmp / "nan")
    resumed = _tr_start(["--resume", "--out", tmp / "resumed"], tmp)
    nan = _tr_start(["--resume", "--out", tmp / "nan", "--lr", 1e30], tmp)
    res.update(resumed=_tr_wait(resumed), nan=_tr_wait(nan))
    return tmp, res


def test_train_end_to_end_loss_falls_and_writes_log_and_checkpoint(_tr_runs):
    tmp, res = _tr_runs
    rc, out, err = res["full"]
    assert rc == 0, err
    rows = _tr_rows(tmp / "full", "train")
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert set(rows[0]) >= {"step", "loss", "mlm_loss", "balance_loss", "lr", "tau", "tokens_per_s"}
    assert np.mean([r["loss"] for r in rows[-4:]]) < rows[0]["loss"] - 0.3
    for r in rows:  # Eq. 9 and the schedule: linear warmup over 6 steps, linear decay to 0 at 16
        assert math.isclose(r["loss"], r["mlm_loss"] + 1e-2 * r["balance_loss"], rel_tol=1e-9)
        s = r["step"] - 1
        assert math.isclose(r["lr"], 2e-3 * (s + 1) / 6 if s < 6 else 2e-3 * (16 - s) / 10, rel_tol=1e-9)
    evals = _tr_rows(tmp / "full", "eval")
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[0]["rf"] is None and 0 <= evals[1]["rf"][0] <= 1
    assert len(evals[0]["expert_load"][0]) == 4 and sum(evals[0]["expert_load"][0]) == sum(evals[1]["expert_load"][0])
    assert evals[1]["rc"][0] > 0 and evals[1]["val_mlm_loss"] < rows[0]["mlm_loss"]
    assert "unigram entropy" in out and "python finetune.py --task udpos" in out
    ckpt = _tr_ckpt(tmp / "full")
    assert {"model", "optimizer", "step", "config", "args", "schedule", "rng", "data"} <= set(ckpt)
    assert ckpt["step"] == 16
    model = MaskedLM(XMoEConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])  # the unwrapped model, no "module." prefixes


def test_train_resume_is_bit_identical_to_the_uninterrupted_run(_tr_runs):
    tmp, res = _tr_runs
    assert res["part"][0] == 0 and res["resumed"][0] == 0, res["part"][2] + res["resumed"][2]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    for kind in ("data", "train", "eval"):
        assert strip(_tr_rows(tmp / "resumed", kind)) == strip(_tr_rows(tmp / "full", kind))
    a, b = _tr_ckpt(tmp / "full"), _tr_ckpt(tmp / "resumed")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for k in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(a["optimizer"][k][n], b["optimizer"][k][n]) for n in a["optimizer"][k])


def test_train_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(_tr_runs):
    tmp, res = _tr_runs
    rc, out, err = res["nan"]
    assert rc not in (0, 2) and "Traceback" not in err
    assert "error: loss is nan at step 10" in err and "step 8" in err  # step 9's update blew it up
    stopped, after = _tr_ckpt(tmp / "stopped"), _tr_ckpt(tmp / "nan")
    assert after["step"] == 8 and all(torch.equal(after["model"][k], v) for k, v in stopped["model"].items())
    assert [r["step"] for r in _tr_rows(tmp / "nan", "train")] == list(range(1, 10))


# ------------------------------------------------------------------------------------------------
# 2 processes (DDP, and expert parallelism) reproduce 1 process


@pytest.fixture(scope="module")
def _tr_ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = _tr_corpus(tmp / "corpus")
    base = ["--preset", "tiny", "--data", data, "--steps", 6, "--eval-every", 6, "--batch-size", 8,
            "--dropout", 0, "--balance-coef", 0, "--float64"]  # float64: 1 and 2 processes agree to rounding
    procs = {"one": _tr_start(base + ["--grad-accum", 2, "--out", tmp / "one"], tmp),
             "ddp": _tr_start(base + ["--out", tmp / "ddp"], tmp, nproc=2),
             "ep": _tr_start(base + ["--out", tmp / "ep", "--expert-parallel"], tmp, nproc=2)}
    return tmp, {k: _tr_wait(p) for k, p in procs.items()}


@pytest.mark.parametrize("mode", ["ddp", "ep"])
def test_train_two_processes_reproduce_one_process(_tr_ddp, mode):
    tmp, res = _tr_ddp
    assert res["one"][0] == 0, res["one"][2]
    assert res[mode][0] == 0, res[mode][1] + res[mode][2]
    one, two = _tr_rows(tmp / "one", "train"), _tr_rows(tmp / mode, "train")
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert abs(a["mlm_loss"] - b["mlm_loss"]) < 1e-10 and abs(a["loss"] - b["loss"]) < 1e-10
    a, b = _tr_ckpt(tmp / "one")["model"], _tr_ckpt(tmp / mode)["model"]
    assert a.keys() == b.keys()  # under expert parallelism the checkpoint still holds every expert
    for k in a:
        assert a[k].dtype == torch.float64
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-12, msg=k)
    one_eval, two_eval = _tr_rows(tmp / "one", "eval")[0], _tr_rows(tmp / mode, "eval")[0]
    assert abs(one_eval["val_mlm_loss"] - two_eval["val_mlm_loss"]) < 1e-10
    assert one_eval["expert_load"] == two_eval["expert_load"]  # discrete: identical in float64


# ------------------------------------------------------------------------------------------------
# Bad input: `error: ...` naming the flag or file, exit code 2, no traceback


_TR_BAD = {
    # case: (arguments, what the message must name)
    "missing_data": (["--data", "nope"], "nope"),
    "empty_data": (["--data", "empty"], "empty"),
    "not_utf8": (["--data", "latin1"], "de.txt, line 3"),
    "unknown_preset": (["--preset", "huge"], "--preset"),
    "invalid_config": (["--n-heads", 3], "--n-heads"),
    "invalid_type": (["--n-experts", "many"], "--n-experts"),
    "no_checkpoint": (["--resume", "--out", "nothing"], "ckpt.pt"),
    "corrupt_checkpoint": (["--resume", "--out", "corrupt"], "corrupt"),
    "other_config": (["--resume", "--out", "other", "--n-experts", 8], "n_experts"),
    "indivisible_batch": (["--batch-size", 10, "--grad-accum", 3], "--batch-size"),
    "expert_parallel_alone": (["--expert-parallel"], "torchrun"),
    "missing_sentencepiece": (["--spm", "x.model"], "sentencepiece"),
}


@pytest.fixture(scope="module")
def _tr_bad(tmp_path_factory, _tr_runs):
    tmp = tmp_path_factory.mktemp("bad")
    data = _tr_corpus(tmp / "corpus", {"en": 60, "de": 60})
    (tmp / "empty").mkdir()
    latin = _tr_corpus(tmp / "latin1", {"en": 60})
    (latin / "de.txt").write_bytes("gut\nsehr gut\nstra\u00dfe\n".encode("latin-1"))  # line 3: not UTF-8
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint at all" * 10)
    shutil.copytree(_tr_runs[0] / "full", tmp / "other")
    procs = {}
    for case, (args, _) in _TR_BAD.items():
        extra = [] if "--data" in args or "--resume" in args else ["--data", data]
        procs[case] = _tr_start(["--preset", "tiny", "--steps", 2, *extra, *args] if "--resume" not in args
                                else args, tmp)
    return {case: _tr_wait(p) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(_TR_BAD))
def test_train_bad_input_gives_a_clear_error_and_exit_code_2(_tr_bad, case):
    if case == "missing_sentencepiece" and _tr_has_sentencepiece():
        pytest.skip("sentencepiece is installed; this case checks the message when it is not")
    rc, out, err = _tr_bad[case]
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    lines = [s for s in err.splitlines() if s.startswith("error:")]
    assert lines and _TR_BAD[case][1] in lines[0], err


# ================================================================================================
# finetune.py: QA windows and span search by brute force; frozen routing; the CLI; bad input
# ================================================================================================

_FT_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# QA windows and the span search against brute force


def test_finetune_windows_cover_the_context_and_max_context_by_hand():
    assert finetune.window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert finetune.window_starts(3, 4, 2) == [0]
    assert finetune.window_starts(10, 4, 9) == [0, 4, 8]  # a stride beyond the window never leaves a gap
    # 10 tokens, windows [0,4) [2,6) [4,8) [6,10), score min(left, right) context: token 2 has 1 in
    # window 0 (pos 2) and 0 in window 1 (pos 0); token 3 has 0 in window 0 and 1 in window 1 (pos 1);
    # token 4: 1 in window 1 (pos 2), 0 in window 2; token 5: 0 in window 1, 1 in window 2 (pos 1)
    best = finetune.max_context_windows(10, [0, 2, 4, 6], 4)
    assert best.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]


def _ft_brute_best(windows, max_answer):
    """Every (window, start, end) with start <= end < start + max_answer inside the context, the
    start in its max-context window and, where given, start and end allowed: the best start + end logit."""
    best = None
    for w in windows:
        for i in range(len(w["start_logits"])):
            for j in range(len(w["end_logits"])):
                a, b = i - w["offset"], j - w["offset"]
                if 0 <= a < w["length"] and 0 <= b < w["length"] and a <= b < a + max_answer and w["max_ctx"][a] \
                        and w.get("can_start", [True] * w["length"])[a] and w.get("can_end", [True] * w["length"])[b]:
                    s = float(w["start_logits"][i] + w["end_logits"][j])
                    if best is None or s > best[0]:
                        best = (s, w["doc_start"] + a, w["doc_start"] + b)
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bounds", [False, True])
def test_finetune_span_search_matches_brute_force_over_all_windows(seed, bounds):
    rng = np.random.default_rng(seed)
    n, capacity, stride, offset = 23, 8, 3, 5
    starts = finetune.window_starts(n, capacity, stride)
    best_ctx = finetune.max_context_windows(n, starts, capacity)
    can_start, can_end = rng.random(n) < 0.4, rng.random(n) < 0.4  # byte checkpoints: word boundaries
    windows = []
    for w, s in enumerate(starts):
        length = min(capacity, n - s)
        L = offset + length + 1
        windows.append(dict(start_logits=rng.normal(size=L), end_logits=rng.normal(size=L), offset=offset,
                            doc_start=s, length=length, max_ctx=(best_ctx[s:s + length] == w).tolist()))
        if bounds:
            windows[-1].update(can_start=can_start[s:s + length].tolist(), can_end=can_end[s:s + length].tolist())
    got = finetune.best_span(windows, n_best=10_000, max_answer=4)  # n_best beyond the window: all pairs
    want = _ft_brute_best(windows, 4)
    assert got[1:] == want[1:] and abs(got[0] - want[0]) < 1e-9


def test_finetune_byte_context_tokens_map_back_to_the_answer_text():
    tok = finetune.Tokenizer({"tokenizer": {"kind": "byte"}})
    context = "Der Zug nach Köln fährt um 9 Uhr ab."
    ids, spans = finetune.context_tokens(context, tok)
    assert len(ids) == len(spans) == len(context.encode("utf-8"))  # one byte token a byte, spaces included
    ex = {"context": context, "answers": [{"text": "Köln", "answer_start": context.index("Köln")}]}
    first, last = finetune.answer_tokens(ex, spans)
    assert finetune.span_text(context, spans, first, last) == "Köln"
    assert bytes(i - 4 for i in ids[first:last + 1]).decode("utf-8") == "Köln"
    # a span may start only on a word's first byte and end only on its last: whole words, by hand
    can_start, can_end = finetune.word_bounds(spans)
    words = context.split()
    firsts = [len(" ".join(words[:k]).encode()) + (k > 0) for k in range(len(words))]
    lasts = [f + len(w.encode()) - 1 for f, w in zip(firsts, words)]
    assert [t for t, ok in enumerate(can_start) if ok] == firsts and [t for t, ok in enumerate(can_end) if ok] == lasts
    assert can_start[first] and can_end[last]


@pytest.mark.parametrize("task,byte,want", [
    ("pawsx", False, (128, None, None, 30)),   # XTREME's subword lengths
    ("pawsx", True, (256, None, None, 120)),   # 4 bytes a subword: 512, capped by max_len 256
    ("xquad", False, (256, 85, 64, 30)),       # window under 384: stride a third, query <= half
    ("xquad", True, (256, 85, 128, 120)),
])
def test_finetune_length_defaults_count_subwords_or_bytes(task, byte, want):
    cfg = XMoEConfig.preset("small")  # max_len 256
    names = ("max_length", "doc_stride", "max_query_length", "max_answer_length")
    args = finetune.build_parser().parse_args(["--task", task, "--data", "d", "--init", "c", "--out", "o"])
    args = finetune.resolve_args(args, cfg, "small", TASKS[task]["kind"], byte=byte)
    assert tuple(getattr(args, n, None) for n in names) == want
    args = finetune.build_parser().parse_args(["--task", task, "--data", "d", "--init", "c", "--out", "o",
                                               "--max-length", "100", "--max-answer-length", "7"])
    args = finetune.resolve_args(args, cfg, "small", TASKS[task]["kind"], byte=byte)
    assert (args.max_length, args.max_answer_length) == (100, 7)  # a flag beats the default


# ------------------------------------------------------------------------------------------------
# Frozen routing: training one seed leaves every sparse-layer parameter as pre-trained


def _ft_args(**kw):
    base = dict(task="pawsx", batch_size=8, lr=1e-3, warmup=0.1, weight_decay=0.01, epochs=1, max_steps=4,
                balance_coef=1e-2, freeze_moe=True, ic_every=2, max_length=64, n_best=20, max_answer_length=30,
                float64=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("freeze", [True, False])
def test_finetune_frozen_routing_keeps_the_sparse_layers_bit_identical(freeze):
    torch.manual_seed(0)
    cfg = XMoEConfig.preset("tiny", dropout=0.0)
    state = {k: v.clone() for k, v in MaskedLM(cfg).state_dict().items()}
    tok = finetune.Tokenizer({"tokenizer": {"kind": "byte"}})
    examples = [dict(text_a=f"sentence {i} about cats", text_b=f"another {i % 3} about dogs", label=str(i % 2))
                for i in range(32)]
    args = _ft_args(freeze_moe=freeze)
    ctx = dict(args=args, task="pawsx", cfg=cfg, tok=tok, dist=dict(ddp=False, rank=0, world=1, ep=False),
               device=torch.device("cpu"), mlm_state=state, dev=None,
               train_feats=finetune.pair_features(examples, tok, TASKS["pawsx"]["labels"], 64))
    model, history, loads = finetune.train_seed(1, ctx)
    moe = {k for k, _ in model.named_parameters() if ".moe." in k}
    assert moe, "the tiny model has a sparse layer"
    after = {k: v for k, v in model.state_dict().items()}
    for k in moe:
        same = torch.equal(after[k], state[k])
        assert same == freeze, k  # frozen: bit-identical; --no-freeze-moe: trained
    changed = [k for k, v in after.items() if k.startswith("encoder.") and k not in moe and not torch.equal(v, state[k])]
    assert changed  # the rest of the encoder trains either way
    assert [w["step"] for w in loads] == [2, 4] and sum(sum(l) for l in loads[0]["loads"]) > 0


# ------------------------------------------------------------------------------------------------
# The CLI end to end on a tiny checkpoint and a tiny synthetic world: one run per head type


def _ft_start(args, cwd, nproc=None, script="finetune.py"):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(_FT_DIR)}
    cmd = ([sys.executable, str(_FT_DIR / script)] if nproc is None else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(_FT_DIR / script)])
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _ft_wait(proc):
    out, err = proc.communicate(timeout=400)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def _ft_world(tmp_path_factory):
    """The synthetic world and a tiny checkpoint pre-trained on its mlm/ text for a few steps."""
    tmp = tmp_path_factory.mktemp("ft")
    make_synthetic(tmp / "world", seed=0)
    rc, out, err = _ft_wait(_ft_start(["--preset", "tiny", "--data", tmp / "world" / "mlm", "--steps", 20,
                                       "--dropout", 0, "--out", tmp / "pre"], tmp, script="train_mlm.py"))
    assert rc == 0, err
    return tmp


_FT_RUNS = {  # name: task and extra flags
    "udpos": ("udpos", ["--seeds", 1, 2, "--max-train", 200, "--epochs", 1]),
    "pawsx": ("pawsx", ["--max-train", 200, "--epochs", 1]),
    "xquad": ("xquad", ["--max-train", 100, "--epochs", 1]),
}


@pytest.fixture(scope="module")
def _ft_runs(_ft_world):
    tmp = _ft_world
    procs = {name: _ft_start(["--task", task, "--data", tmp / "world", "--init", tmp / "pre" / "ckpt.pt",
                              "--out", tmp / name, *extra], tmp) for name, (task, extra) in _FT_RUNS.items()}
    return tmp, {name: _ft_wait(p) for name, p in procs.items()}


@pytest.mark.parametrize("name", list(_FT_RUNS))
def test_finetune_end_to_end_writes_results_and_official_predictions(_ft_runs, name):
    tmp, res = _ft_runs
    rc, out, err = res[name]
    assert rc == 0, err
    task = _FT_RUNS[name][0]
    results = json.loads((tmp / name / "results.json").read_text())
    seeds = ["1", "2"] if name == "udpos" else ["1"]
    assert results["task"] == task and list(results["seeds"]) == seeds and results["split"] == "test"
    langs = languages(tmp / "world", task, "test")
    assert len(langs) == 7
    # every language has an official prediction file, and the files score, through the score CLI, to
    # what results.json says
    labels = tmp / f"{name}_labels"
    for lang in langs:
        write_labels(labels, task, lang, load_split(tmp / "world", task, "test", lang))
    for seed in seeds:
        scored = subprocess.run([sys.executable, str(_FT_DIR / "eval_xtreme.py"), "score", "--predictions",
                                 tmp / name / "predictions" / f"seed{seed}", "--labels", labels, "--json"],
                                capture_output=True, text=True)
        assert scored.returncode == 0, scored.stderr
        again = json.loads(scored.stdout)[task]
        mine = results["seeds"][seed]
        assert sorted(k for k in again if not k.startswith("avg")) == langs
        for k, v in mine.items():
            if k.startswith("avg_"):
                assert abs(again[k] - v) < 1e-6, (k, again[k], v)
    mean = results["mean"][f"avg_{'f1' if task != 'pawsx' else 'accuracy'}"]
    per = [results["seeds"][s][f"avg_{'f1' if task != 'pawsx' else 'accuracy'}"] for s in seeds]
    assert abs(mean - sum(per) / len(per)) < 1e-9
    if name == "udpos":  # two seeds: a sample std and an inter-run consistency in [-1, 1]
        assert abs(results["std"]["avg_f1"] - float(np.std(per, ddof=1))) < 1e-9
        assert results["ic"] is not None and -1 <= results["ic"] <= 1 and results["ic_curve"]


# ------------------------------------------------------------------------------------------------
# Bad input: `error: ...` naming what is wrong, exit code 2, no traceback


_FT_BAD = {
    "missing_init": (["--init", "nowhere.pt"], "nowhere.pt"),
    "corrupt_init": (["--init", "corrupt.pt"], "corrupt.pt"),
    "other_config": (["--init", "other.pt"], "other.pt"),
    "no_task_folder": (["--task", "panx", "--data", "empty"], "panx"),
    "expert_parallel_alone": (["--expert-parallel"], "torchrun"),
    "max_length": (["--max-length", 5000], "--max-length"),
    "unknown_task": (["--task", "ner"], "--task"),
}


@pytest.fixture(scope="module")
def _ft_bad(_ft_world):
    tmp = _ft_world
    (tmp / "corrupt.pt").write_bytes(b"no checkpoint" * 20)
    (tmp / "empty").mkdir()
    ckpt = torch.load(tmp / "pre" / "ckpt.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["n_experts"] = 8  # the weights hold 4 experts
    torch.save(ckpt, tmp / "other.pt")
    procs = {}
    for case, (args, _) in _FT_BAD.items():
        given = dict(zip(args[::2], args[1::2])) if case != "expert_parallel_alone" else {}
        base = {"--task": "udpos", "--data": tmp / "world", "--init": tmp / "pre" / "ckpt.pt", "--out": tmp / f"bad_{case}"}
        flat = [x for k, v in {**base, **given}.items() for x in (k, v)]
        procs[case] = _ft_start(flat + (args if case == "expert_parallel_alone" else []), tmp)
    return {case: _ft_wait(p) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(_FT_BAD))
def test_finetune_bad_input_gives_a_clear_error_and_exit_code_2(_ft_bad, case):
    rc, out, err = _ft_bad[case]
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    lines = [s for s in err.splitlines() if s.startswith("error:")]
    assert lines and _FT_BAD[case][1] in lines[0], err


# ------------------------------------------------------------------------------------------------
# Expert parallelism: 2 processes, each with half the experts, fine-tune as 1 process does


@pytest.fixture(scope="module")
def _ft_ep(_ft_world):
    tmp = _ft_world
    base = ["--task", "udpos", "--data", tmp / "world", "--init", tmp / "pre" / "ckpt.pt", "--no-freeze-moe",
            "--balance-coef", 0, "--max-train", 64, "--batch-size", 8, "--epochs", 2, "--ic-every", 4,
            "--float64"]  # float64: the two arrangements agree to rounding, so argmax decisions agree too
    procs = {"one": _ft_start(base + ["--out", tmp / "ep_one"], tmp),
             "ep": _ft_start(base + ["--out", tmp / "ep_two", "--expert-parallel"], tmp, nproc=2)}
    return tmp, {k: _ft_wait(p) for k, p in procs.items()}


def test_finetune_expert_parallel_two_processes_match_one_process(_ft_ep):
    tmp, res = _ft_ep
    for k in ("one", "ep"):
        assert res[k][0] == 0, res[k][2]
    one, two = (json.loads((tmp / d / "results.json").read_text()) for d in ("ep_one", "ep_two"))
    rows = lambda d: [json.loads(s) for s in (tmp / d / "seed1" / "log.jsonl").read_text().splitlines()]
    losses = lambda d: [r["loss"] for r in rows(d) if "loss" in r]
    assert len(losses("ep_one")) == 20 and np.allclose(losses("ep_one"), losses("ep_two"), rtol=1e-10, atol=1e-12)
    assert one["seeds"] == two["seeds"]  # every language's scores: discrete decisions, identical
    # the expert loads count the same tokens at the same experts
    loads = lambda d: [w["loads"] for w in json.loads((tmp / d / "seed1" / "expert_loads.json").read_text())["windows"]]
    assert loads("ep_one") == loads("ep_two")
