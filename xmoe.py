"""
X-MoE in one file: a Transformer encoder with sparse mixture-of-experts layers and the hypersphere
router of Chi et al., "On the Representation Collapse of Sparse Mixture of Experts" (NeurIPS 2022),
beside the SMoE (Switch-style) baseline and the Dense baseline it is compared with.

    python xmoe.py                      # a tiny forward/backward demo on the CPU

    from xmoe import XMoEConfig, MoELayer, MaskedLM
    cfg = XMoEConfig.preset("tiny", routing="xmoe", gate="softmax")
    y, balance = MoELayer(cfg)(x, pad_mask)       # x: (B, L, d); pad_mask: (B, L), True = padding

Read it top to bottom, as it is built: the Transformer's feed-forward and attention, the router (Eqs.
1, 3, 6, 7, 8), the experts, the sparse layer (Eq. 2: index-based dispatch, capacity, padding), the
block, the config, the encoder and the masked-LM model (Eq. 9). Then a banner says where a first
reading can stop: expert parallelism comes last. The analyses (RC Eq. 10, RF, IC) are in analysis.py.
Where we follow the authors' code rather than the paper's text, the comment says so (torchscale =
microsoft/torchscale, component/xmoe/routing.py).
"""

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Transformer pieces: feed-forward and self-attention (pre-LayerNorm, GELU)


class FeedForward(nn.Module):
    """W2 GELU(W1 x), the FFN of a Transformer block and of every expert sublayer."""

    def __init__(self, d_model, d_ffn, dropout):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ffn)
        self.fc2 = nn.Linear(d_ffn, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SelfAttention(nn.Module):
    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x, pad_mask):
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        # key padding mask: True = may attend; broadcast over heads and queries
        keep = None if pad_mask is None else ~pad_mask[:, None, None, :]  # (B, 1, 1, L)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # (B, nh, L, hs)
        y = y.transpose(1, 2).reshape(B, L, d)
        return self.drop(self.proj(y))


def upcast(x):
    """bfloat16 or float16 (autocast) -> float32; float32 and float64 (the tests' precision) stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ------------------------------------------------------------------------------------------------
# The router: routing scores (Eq. 1 or Eq. 6), top-1 choice, gate (Eq. 3 / Eq. 7), balance loss (Eq. 8)


TAU_INIT = {"softmax": 0.3, "sigmoid": 0.07}  # Table 6: X-MoE's initial tau, also tau_0 of Eq. 8
EXPERT_EMB_GAIN = 0.32  # torchscale routing.py:175-178 initialises X-MoE's e_i orthogonally with this gain


def balance_loss(scores, expert, tau0):
    """Eq. 8: (N / |B|) sum_i sum_{token in B} t_i softmax(s / tau0)_i = N sum_i f_i P_i, with t_i taken
    as f_i, the fraction of the |B| tokens whose top-1 expert is i (no gradient flows through it), as
    Switch Transformers and torchscale do (with t_i a count the sum is |B| N sum_i f_i P_i), and P_i
    the mean over the tokens of softmax(s / tau0)_i. Equals 1 for a perfectly uniform router."""
    T, N = scores.shape
    if T == 0:
        return scores.new_zeros(())
    f = torch.bincount(expert, minlength=N).to(scores.dtype) / T  # f_i = t_i / |B|
    P = (scores / tau0).softmax(dim=-1).mean(dim=0)
    return N * (f * P).sum()  # Eq. 8


class RouterOutput(NamedTuple):
    scores: torch.Tensor  # (T, N) float32, the routing scores s_i before the temperature
    expert: torch.Tensor  # (T,) long, k = argmax_i s_i (Eq. 1)
    gate: torch.Tensor  # (T,) float32, g(s_k) (Eq. 3 / 7)
    balance_loss: torch.Tensor  # 0-dim, Eq. 8 over these T tokens
    z: torch.Tensor  # (T, d_e) what is scored against e_i: W^T h / |W^T h| (Eq. 6), h (Eq. 1), or an ablation's


class Router(nn.Module):
    """Scores T tokens against N experts and picks one expert per token.

    routing="smoe": s_i = h . e_i with e_i in R^d (Eq. 1), tau = 1 fixed (Eq. 3).
    routing="xmoe": s_i = (W^T h) . e_i / (|W^T h| |e_i|) with W in R^{d x d_e}, e_i in R^{d_e}
    (Eq. 6) and a learnable temperature tau (Eq. 7). The ablations of Table 3 switch off the
    projection W (dim_reduction=False: score in R^d) or both L2 normalisations (l2_norm=False;
    then tau is 1 and fixed, as for SMoE: the temperature exists to rescale cosines in [-1, 1]).
    The config's None fields take the paper's values here, where they are used.

    Where SMoE and X-MoE differ, side by side:
                   SMoE (Eq. 1, 3)              X-MoE (Eq. 6, 7)
      scores       h . e_i, e_i in R^d          cos(W^T h, e_i), W in R^{d x d_e}, d_e = N / 2
      temperature  tau = 1, fixed               tau learned, from 0.3 (softmax) or 0.07 (sigmoid)
      e_i init     N(0, 0.02), as every weight  orthogonal, gain 0.32 (torchscale)
      tau_0, Eq. 8 1                            the initial tau
    """

    def __init__(self, cfg):
        super().__init__()
        xmoe = cfg.routing == "xmoe"
        cosine = xmoe and cfg.l2_norm  # the scores are cosines in [-1, 1]
        self.gate_fn, self.l2_norm, self.xmoe, self.detach = cfg.gate, cosine, xmoe, cfg.detach_route
        d_e = cfg.d_model
        if xmoe and cfg.dim_reduction:
            d_e = cfg.d_route if cfg.d_route is not None else max(1, cfg.n_experts // 2)  # section 3.1: N / 2
        self.proj = nn.Linear(cfg.d_model, d_e, bias=False) if xmoe and cfg.dim_reduction else None  # W
        self.expert_emb = nn.Parameter(torch.empty(cfg.n_experts, d_e))  # e_i, (N, d_e)
        self.reset_expert_emb()
        tau = cfg.tau_init if cfg.tau_init is not None else TAU_INIT[cfg.gate] if cosine else 1.0  # Table 6; Eq. 3
        learn = cfg.learn_tau if cfg.learn_tau is not None else cosine
        # tau is learned in log space so that it stays positive whatever the optimiser does
        log_tau = torch.tensor(math.log(tau))
        if learn:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        self.balance_tau = cfg.balance_tau if cfg.balance_tau is not None else tau  # tau_0 of Eq. 8, fixed

    def reset_expert_emb(self):
        if self.xmoe:
            nn.init.orthogonal_(self.expert_emb, gain=EXPERT_EMB_GAIN)
        else:
            nn.init.normal_(self.expert_emb, std=0.02)  # as the other weights

    @property
    def tau(self):
        return self.log_tau.exp()

    def read_subspace(self):
        """(k, d) rows spanning the directions of h the scores read: W's columns (proj.weight's rows,
        (d_e, d)) with dimension reduction, else the e_i (N, d) (Eq. 6's cosine then also reads |h|). A
        copy: it stays what the router read when it was taken."""
        return (self.expert_emb if self.proj is None else self.proj.weight).detach().to(torch.float32, copy=True)

    def forward(self, h):
        """h: (T, d) hidden states of the tokens to route (no padding)."""
        # the router runs in float32 even under bf16 autocast: top-1 choices are brittle in low precision
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = upcast(h.detach() if self.detach else h)  # detach_route: neither J_2 (Eqs. 4-5) nor Eq. 8 reaches h
            z = h if self.proj is None else self.proj(h)  # W^T h, (T, d_e)
            e = self.expert_emb
            if self.l2_norm:
                z, e = F.normalize(z, dim=-1), F.normalize(e, dim=-1)  # the two norms of Eq. 6
            scores = z @ e.t()  # (T, N): s_i = h^T e_i (Eq. 1) or the cosine of Eq. 6
            expert = scores.argmax(dim=-1)  # k = argmax_i s_i (Eq. 1)
            logits = scores / self.tau
            if self.gate_fn == "softmax":
                # exp(s_k/tau) / sum_j exp(s_j/tau) (Eq. 7; Eq. 3 with tau = 1)
                gate = logits.softmax(dim=-1).gather(1, expert[:, None]).squeeze(1)
            else:
                gate = torch.sigmoid(logits.gather(1, expert[:, None]).squeeze(1))  # sigma(s_k/tau) (Eq. 7 / 3)
            balance = balance_loss(scores, expert, self.balance_tau)
        return RouterOutput(scores, expert, gate, balance, z)


# ------------------------------------------------------------------------------------------------
# Experts: each expert is a stack of residual FFN sublayers (BASE layers, Lewis et al. 2021)

class ExpertSublayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ffn, cfg.moe_dropout)

    def forward(self, x):
        return x + self.ffn(self.ln(x))


class Expert(nn.Module):
    """f_k of Eq. 2: what a stack of `expert_depth` residual sublayers adds to its input.

    The stack computes x_D = h + u_1 + ... + u_D; f_k(h) = x_D - h is the expert's update, so the
    layer's output h + g(s_k) f_k(h) scales the whole update by the gate and keeps h as the skip path.
    """

    def __init__(self, cfg):
        super().__init__()
        self.sublayers = nn.Sequential(*[ExpertSublayer(cfg) for _ in range(cfg.expert_depth)])

    def forward(self, h):  # (n, d) -> (n, d)
        return self.sublayers(h) - h


# ------------------------------------------------------------------------------------------------
# The sparse layer: route, sort the tokens by expert, run each expert on its slice, scatter back

class MoELayer(nn.Module):
    """h' = h + g(s_k) f_k(h), k = argmax_i s_i (Eq. 1, 2), for every non-padding token.

    Dispatch is index-based: tokens are sorted by expert and each expert runs on one contiguous
    slice, so the cost is the experts' FLOPs plus O(T) gathers, never the GShard-style one-hot
    (tokens x experts x capacity) tensors whose cost grows with the square of the tokens.
    Padding tokens are never routed, computed or counted; they come out unchanged. With a
    `capacity_factor` c, expert i keeps its first ceil(c T / N) tokens in batch order and the
    dropped tokens come out unchanged. Every expert runs every step (also on zero tokens), so all
    parameters are in the autograd graph and DDP needs no find_unused_parameters.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.capacity_factor = cfg.n_experts, cfg.capacity_factor
        self.router = Router(cfg)
        self.experts = nn.ModuleList([Expert(cfg) for _ in range(cfg.n_experts)])
        self.ep_group = None  # process group of expert parallelism (end of the file); None = all experts here

    def forward(self, x, pad_mask=None):
        """x: (B, L, d), pad_mask: (B, L) bool, True = padding -> (h', the balance loss of Eq. 8)."""
        B, L, d = x.shape
        h = x.reshape(B * L, d)
        # index_select, not h[idx]: its backward is an index_add, much cheaper than h[idx]'s index_put
        if pad_mask is None:  # every position is a token: no gather before the router
            tokens, r = None, self.router(h)
        else:
            tokens = (~pad_mask.reshape(-1)).nonzero().squeeze(1)  # (T,) positions of real tokens
            r = self.router(h.index_select(0, tokens))
        order, counts = self.dispatch_order(r.expert)  # kept tokens, sorted by expert; (N,) sizes
        routed = order if tokens is None else tokens.index_select(0, order)  # (n,) positions in h, expert-major
        f = self.run_experts(h.index_select(0, routed), counts)  # (n, d): f_k(h) for each routed token
        gate = r.gate.index_select(0, order).unsqueeze(1)  # (n, 1)
        y = h.index_add(0, routed, (gate * f).to(h.dtype))  # h + g(s_k) f_k(h) (Eq. 2)
        return y.view(B, L, d), r.balance_loss

    def dispatch_order(self, expert):
        """Stable sort of the tokens by expert, minus the tokens beyond each expert's capacity."""
        N, T = self.n_experts, expert.numel()
        order = torch.argsort(expert, stable=True)  # (T,) stable: batch order within an expert
        counts = torch.bincount(expert, minlength=N)  # (N,)
        if self.capacity_factor is None:
            return order, counts
        capacity = math.ceil(self.capacity_factor * T / N)
        first = torch.cumsum(counts, 0) - counts  # (N,) where each expert's slice starts
        rank_in_expert = torch.arange(T, device=expert.device) - first[expert[order]]
        keep = rank_in_expert < capacity
        return order[keep], counts.clamp(max=capacity)

    def run_experts(self, h_sorted, counts):
        """h_sorted: (n, d) tokens grouped by expert, counts: (N,) group sizes -> f_k(h), (n, d)."""
        if self.ep_group is not None:
            return run_experts_parallel(self, h_sorted, counts)
        slices = h_sorted.split(counts.tolist())
        return torch.cat([expert(s) for expert, s in zip(self.experts, slices)])


def freeze_moe(model):
    """Frozen routing for fine-tuning (section 3.3): every parameter of every sparse layer (W, e_i, tau,
    all experts) stops training. The balance loss is still added, and its gradient reaches the layers
    below, which go on learning: the routing function is fixed, but the hidden states it routes move,
    so a token's expert can still change. -> the number of frozen parameters."""
    n = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            for p in layer.parameters():
                p.requires_grad_(False)
                n += p.numel()
    return n


def parameter_counts(model):
    """(total, active per token): a token runs one expert of each sparse layer."""
    total = sum(p.numel() for p in model.parameters())
    idle = [e for m in model.modules() if isinstance(m, MoELayer) for e in m.experts[1:]]  # all but one expert
    return total, total - sum(p.numel() for e in idle for p in e.parameters())


# ------------------------------------------------------------------------------------------------
# Transformer block and the configuration

class Block(nn.Module):
    """Pre-LayerNorm block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ffn, cfg.dropout)

    def forward(self, x, pad_mask):
        x = x + self.attn(self.ln1(x), pad_mask)
        return x + self.ffn(self.ln2(x))


@dataclass(frozen=True)
class XMoEConfig:
    vocab_size: int = 260  # byte-level UTF-8 (256) + <pad> <s> </s> <mask>; XLM-R's is 250002
    max_len: int = 256  # learned positions (small: 256 byte tokens hold a sentence pair in any script)
    d_model: int = 128  # hidden size d
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4
    d_ffn: int = 512  # FFN inner size, also of every expert sublayer
    dropout: float = 0.1  # Transformer dropout (Table 7)
    n_experts: int = 16  # N
    expert_depth: int = 2  # FFN sublayers per expert (Table 6: 3)
    moe_after: tuple = (2,)  # a sparse layer after each of these blocks, counted from 1 (base: after the 6th)
    routing: str = "xmoe"  # "xmoe" (Eq. 6) | "smoe" (Eq. 1, Switch-style baseline) | "dense" (no sparse layer)
    gate: str = "softmax"  # "softmax" | "sigmoid" (Eq. 3 / 7)
    d_route: Optional[int] = None  # d_e, routing dimension of xmoe; None = N / 2 (section 3.1)
    dim_reduction: bool = True  # xmoe: project h with W to d_e (Table 3 ablation when False)
    l2_norm: bool = True  # xmoe: L2-normalise W^T h and e_i (Table 3 ablation when False)
    learn_tau: Optional[bool] = None  # None = learned for xmoe with l2_norm, else fixed
    tau_init: Optional[float] = None  # None = TAU_INIT[gate] (Table 6) for xmoe with l2_norm, else 1.0
    balance_tau: Optional[float] = None  # tau_0 of Eq. 8; None = the initial tau
    balance_coef: float = 1e-2  # alpha of Eq. 9 (Table 7)
    capacity_factor: Optional[float] = None  # None = dropless; c = keep ceil(c T / N) tokens per expert
    moe_dropout: float = 0.0  # dropout inside the experts (Table 7: X-MoE dropout 0)
    detach_route: bool = False  # ablation: the router scores h.detach(): J_2 (Eqs. 4-5), Eq. 8 do not reach h

    @property
    def sparse_after(self):
        """Block counts after which a sparse layer sits, in order (none for the Dense baseline)."""
        return () if self.routing == "dense" else self.moe_after

    # --- presets, overrides and validation (the None fields are resolved in Router, where they are used)

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        for k in overrides:
            if k not in known:
                raise ValueError(f"unknown config field {k!r}; the fields are {', '.join(sorted(known))}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{**d, "moe_after": tuple(d["moe_after"])})

    def __post_init__(self):
        object.__setattr__(self, "moe_after", tuple(sorted(self.moe_after)))  # block order, as the encoder meets them
        checks = [
            ("vocab_size", self.vocab_size >= 1, "must be at least 1"),
            ("max_len", self.max_len >= 1, "must be at least 1"),
            ("d_model", self.d_model >= 1, "must be at least 1"),
            ("n_layers", self.n_layers >= 1, "must be at least 1"),
            ("n_heads", self.n_heads >= 1 and self.d_model % self.n_heads == 0,
             f"must be positive and divide d_model={self.d_model}"),
            ("d_ffn", self.d_ffn >= 1, "must be at least 1"),
            ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            ("moe_dropout", 0.0 <= self.moe_dropout < 1.0, "must be in [0, 1)"),
            ("n_experts", self.n_experts >= 1, "must be at least 1"),
            ("expert_depth", self.expert_depth >= 1, "must be at least 1"),
            ("routing", self.routing in ("xmoe", "smoe", "dense"), "must be 'xmoe', 'smoe' or 'dense'"),
            ("gate", self.gate in ("softmax", "sigmoid"), "must be 'softmax' or 'sigmoid'"),
            ("d_route", self.d_route is None or self.d_route >= 1, "must be at least 1 (or None for N/2)"),
            ("tau_init", self.tau_init is None or self.tau_init > 0, "must be positive"),
            ("balance_tau", self.balance_tau is None or self.balance_tau > 0, "must be positive"),
            ("balance_coef", self.balance_coef >= 0, "must be non-negative"),
            ("capacity_factor", self.capacity_factor is None or self.capacity_factor > 0,
             "must be positive (or None for dropless)"),
            ("moe_after", len(self.moe_after) > 0 and all(isinstance(i, int) and 1 <= i <= self.n_layers
                                                           for i in self.moe_after)
             and len(set(self.moe_after)) == len(self.moe_after),  # for Dense: where h is measured
             f"must list distinct block counts between 1 and n_layers={self.n_layers}"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"XMoEConfig.{name}={getattr(self, name)!r} is invalid: it {why}")


PRESETS = {
    # tests: seconds on a CPU
    "tiny": XMoEConfig(vocab_size=260, max_len=64, d_model=32, n_layers=2, n_heads=2, d_ffn=64,
                       n_experts=4, expert_depth=1, moe_after=(1,)),
    # the default run: minutes on a laptop CPU, meaningful on one GPU
    "small": XMoEConfig(),
    # reproduce.py's study: `small` at half the width, so that 15 pre-training runs fit an hour on a CPU
    "mini": XMoEConfig(d_model=64, d_ffn=256),
    # the paper's model: Tables 6 and 7, XLM-R vocabulary
    "base": XMoEConfig(vocab_size=250002, max_len=512, d_model=768, n_layers=12, n_heads=12,
                       d_ffn=3072, n_experts=32, expert_depth=3, moe_after=(6,), d_route=16),
}


# ------------------------------------------------------------------------------------------------
# The encoder and the masked-LM model

class EncoderOutput(NamedTuple):
    hidden: torch.Tensor  # (B, L, d) after the final LayerNorm
    balance_loss: torch.Tensor  # 0-dim, sum over the sparse layers of Eq. 8 (unweighted)


class Encoder(nn.Module):
    """Token + learned position embeddings, pre-LN blocks with sparse layers after the chosen
    blocks (BASE layers style, section 4.1), final LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.moe = nn.ModuleDict({str(i): MoELayer(cfg) for i in cfg.sparse_after})  # key: after block i
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, input_ids, pad_mask=None):
        B, L = input_ids.shape
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={self.cfg.max_len}")
        pos = torch.arange(L, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # (B, L, d)
        balance = torch.zeros((), device=x.device)
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, pad_mask)
            if str(i) in self.moe:
                x, layer_balance = self.moe[str(i)](x, pad_mask)  # Eq. 2 for every token
                balance = balance + layer_balance
        return EncoderOutput(self.ln_f(x), balance)


class MLMOutput(NamedTuple):
    loss: Optional[torch.Tensor]  # mlm_loss + balance_coef * balance_loss (Eq. 9), None without labels
    mlm_loss: Optional[torch.Tensor]  # mean cross-entropy over the masked tokens (0 when there are none)
    balance_loss: torch.Tensor  # unweighted sum over the sparse layers (for logging)
    logits: torch.Tensor  # (B, L, vocab)


class MaskedLM(nn.Module):
    """Encoder + MLM head (dense, GELU, LayerNorm, decoder tied to the token embedding + own bias)."""

    def __init__(self, cfg):
        super().__init__()
        seed_state = torch.random.get_rng_state()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.head_ln = nn.LayerNorm(cfg.d_model)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.initialize(seed_state)

    def initialize(self, seed_state):
        """init_weights from the generator's state before the modules were built (their default
        initialisation drew from it too), the sparse layers last and from a forked stream: with one
        seed, Dense, SMoE and X-MoE start from the same weights outside their sparse layers, and SMoE
        and X-MoE from the same experts, so that a paired comparison differs in the router alone."""
        torch.random.set_rng_state(seed_state)
        layers = [m for m in self.modules() if isinstance(m, MoELayer)]
        sparse = {id(m) for layer in layers for m in layer.modules()}
        for module in self.modules():
            if id(module) not in sparse:
                init_weights(module)
        with torch.random.fork_rng(devices=[]):
            for layer in layers:
                layer.experts.apply(init_weights)
                layer.router.apply(init_weights)  # W
                layer.router.reset_expert_emb()

    def forward(self, input_ids, labels=None, pad_mask=None):
        enc = self.encoder(input_ids, pad_mask)
        z = self.head_ln(F.gelu(self.head_dense(enc.hidden)))
        logits = F.linear(z, self.encoder.tok_emb.weight, self.head_bias)  # (B, L, vocab), tied decoder
        if labels is None:
            return MLMOutput(None, None, enc.balance_loss, logits)
        ce = F.cross_entropy(upcast(logits).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        mlm = ce / (labels != -100).sum().clamp(min=1)  # the mean over the masked tokens
        loss = mlm + self.cfg.balance_coef * enc.balance_loss  # Eq. 9
        return MLMOutput(loss, mlm, enc.balance_loss, logits)


def init_weights(module):
    """BERT-style: N(0, 0.02) for linear and embedding weights, zero biases (LayerNorm keeps 1 and 0).
    W (router.proj) is a Linear and follows this rule; e_i and tau have the Router's own."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# ================================================================================================
# A first reading can stop here. What follows is expert parallelism: for experts that outgrow one
# GPU, each rank of a process group keeps N / K of them and tokens travel to their expert's rank and
# back with all_to_all_single. The results equal the single-process layer's (test_xmoe.py).


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_split, in_split, group):
        ctx.splits, ctx.group = (out_split, in_split), group
        out = x.new_empty((sum(out_split),) + x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_split, in_split, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_split, in_split = ctx.splits
        return AllToAll.apply(grad.contiguous(), in_split, out_split, ctx.group), None, None, None


def shard_experts(layer, group=None):
    """Keep only this rank's n_experts / K experts of a MoELayer (K = group size); tokens will be
    exchanged with all_to_all_single. Call after the weights are loaded; gather_experts undoes it
    for a checkpoint. -> the layer."""
    K, rank = dist.get_world_size(group), dist.get_rank(group)
    if layer.n_experts % K:
        raise ValueError(f"expert parallelism: n_experts={layer.n_experts} is not divisible by the "
                         f"{K} processes; use a number of processes that divides it")
    per = layer.n_experts // K
    layer.experts = nn.ModuleList(list(layer.experts)[rank * per:(rank + 1) * per])
    layer.ep_group = group if group is not None else dist.group.WORLD
    return layer


def run_experts_parallel(layer, h_sorted, counts):
    """Send each expert's slice to the rank that holds it, run the local experts, send back.

    Rank r holds experts [r*E, (r+1)*E). The tokens for them arrive from every source rank in
    source order, so they are regrouped by local expert before running and ungrouped after.
    """
    group, K = layer.ep_group, dist.get_world_size(layer.ep_group)
    E = len(layer.experts)
    # every rank learns how many tokens each source sends to each of its local experts
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)  # (K*E,) [source, local expert]
    send_split = counts.view(K, E).sum(1).tolist()
    recv_split = recv_counts.view(K, E).sum(1).tolist()
    received = AllToAll.apply(h_sorted, recv_split, send_split, group)  # (m, d), source-major
    # regroup source-major -> expert-major, run, and undo the permutation
    src_expert = torch.arange(K * E, device=counts.device) % E
    regroup = torch.argsort(src_expert.repeat_interleave(recv_counts), stable=True)
    by_expert = received[regroup].split(recv_counts.view(K, E).sum(0).tolist())
    out = torch.cat([expert(s) for expert, s in zip(layer.experts, by_expert)])
    # out[j] belongs at row regroup[j] of `received`: e.g. regroup = [2, 0, 1] puts out[0] at 2
    out = torch.empty_like(out).index_copy(0, regroup, out)  # back to source-major
    return AllToAll.apply(out, send_split, recv_split, group)  # (n, d)


def gather_experts(model, named):
    """`named` (a state dict, or any tensors keyed by parameter name, such as AdamW's moments) with
    the experts of every sharded MoELayer gathered from all ranks and numbered globally, so that a
    checkpoint written under expert parallelism loads in one process and the other way round. A
    collective: every rank of the expert group calls it."""
    named = dict(named)
    for name, layer in model.named_modules():
        if not isinstance(layer, MoELayer) or layer.ep_group is None:
            continue
        K, E, prefix = dist.get_world_size(layer.ep_group), len(layer.experts), f"{name}.experts.".lstrip(".")
        for k in [k for k in named if k.startswith(prefix)]:  # the same order on every rank
            i, rest = k[len(prefix):].split(".", 1)
            v = named.pop(k)
            pieces = [torch.empty_like(v) for _ in range(K)]
            dist.all_gather(pieces, v.contiguous(), group=layer.ep_group)
            for r, piece in enumerate(pieces):
                named[f"{prefix}{r * E + int(i)}.{rest}"] = piece
    return named


def local_experts(model, named):
    """The inverse of gather_experts: a whole `named` (all experts) cut down to this rank's experts."""
    named = dict(named)
    for name, layer in model.named_modules():
        if not isinstance(layer, MoELayer) or layer.ep_group is None:
            continue
        E, rank, prefix = len(layer.experts), dist.get_rank(layer.ep_group), f"{name}.experts.".lstrip(".")
        for k in [k for k in named if k.startswith(prefix)]:
            i, rest = k[len(prefix):].split(".", 1)
            v = named.pop(k)
            if rank * E <= int(i) < (rank + 1) * E:
                named[f"{prefix}{int(i) - rank * E}.{rest}"] = v
    return named


# ------------------------------------------------------------------------------------------------

if __name__ == "__main__":  # a tiny forward and backward: every token of 2 sequences is a label
    torch.manual_seed(0)
    cfg, ids = XMoEConfig.preset("tiny"), torch.randint(4, 260, (2, 16))
    model = MaskedLM(cfg)
    out = model(ids, labels=ids)
    out.loss.backward()
    router = model.encoder.moe["1"].router
    print(f"tiny {cfg.routing}/{cfg.gate}: loss {out.loss.item():.4f} = mlm {out.mlm_loss.item():.4f} + "
          f"{cfg.balance_coef} * balance {out.balance_loss.item():.4f} (Eq. 9); tau {router.tau.item():.3f}, "
          f"d loss / d log tau {router.log_tau.grad.item():+.2e}")
