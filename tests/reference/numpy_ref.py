"""Plain-numpy (float64) ports of the DeepSeek-V3 math, written from REFERENCE.md sections 2-4.

Nothing here imports jax or dsv3_jax: the tests hand in the module's weights as numpy arrays (a
nested dict shaped like `nnx.to_pure_dict(nnx.state(module))`) and a config object from which only
plain sizes are read. Weights are stored "in -> out" (einsum layout):
    wq_a [D, Q], wq_b [Q, N, dn+dr], wq [D, N, dn+dr], wkv_a [D, R+dr], wkv_b [R, N, dn+dv],
    wo [N, dv, D], router [D, E], w_gate/w_up [E, D, F], w_down [E, F, D], MLP gate/up [D, F], down [F, D].
"""
from __future__ import annotations

import math

import numpy as np


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# ----------------------------------------------------------------------------- basic layers


def rms_norm(x, w, eps):
    """w * x / sqrt(mean(x^2) + eps)."""
    x = f64(x)
    return f64(w) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def swiglu(x, w_gate, w_up, w_down):
    """down(silu(gate(x)) * up(x)); x [..., D], w_gate/w_up [D, F], w_down [F, D]."""
    x = f64(x)
    return (silu(x @ f64(w_gate)) * (x @ f64(w_up))) @ f64(w_down)


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


# ----------------------------------------------------------------------------- RoPE / YaRN


def get_mscale(factor, mscale=1.0):
    """0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def inv_freq(d, theta, rope_scaling=None):
    """theta^(-2j/d) for j < d/2, YaRN-blended per REFERENCE section 2 when rope_scaling is given.

    rope_scaling: None or an object with factor, original_max_position_embeddings, beta_fast, beta_slow.
    """
    j = np.arange(d // 2, dtype=np.float64)
    base = theta ** (-2.0 * j / d)
    if rope_scaling is None or rope_scaling.factor <= 1.0:
        return base
    L0 = rope_scaling.original_max_position_embeddings

    def fcd(r):
        return d * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(theta))

    low = max(math.floor(fcd(rope_scaling.beta_fast)), 0)
    high = min(math.ceil(fcd(rope_scaling.beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((j - low) / (high - low), 0.0, 1.0)
    return base * ((1.0 - ramp) + ramp / rope_scaling.factor)


def rope_cos_factor(rope_scaling):
    """HF's attention factor on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    if rope_scaling is None or rope_scaling.factor <= 1.0:
        return 1.0
    return get_mscale(rope_scaling.factor, rope_scaling.mscale) / get_mscale(
        rope_scaling.factor, rope_scaling.mscale_all_dim
    )


def rope_complex(x, angles, factor=1.0):
    """Rotate interleaved pairs (x[2i], x[2i+1]) as complex numbers: z_i * factor * exp(1j * angles_i).

    `angles` must broadcast against x[..., 0::2] (e.g. positions[:, None, None] * freqs for x [T, N, d]).
    """
    x = f64(x)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * (factor * np.exp(1j * f64(angles)))
    out = np.empty(z.shape[:-1] + (x.shape[-1],))
    out[..., 0::2] = z.real
    out[..., 1::2] = z.imag
    return out


def softmax_scale(cfg):
    """(dn + dr)^-0.5 * mscale^2 with mscale = 0.1 * mscale_all_dim * ln(factor) + 1 under YaRN."""
    s = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = get_mscale(rs.factor, rs.mscale_all_dim)
        s *= m * m
    return s


# ----------------------------------------------------------------------------- MLA


def mla(x, p, cfg, positions=None):
    """Plain multi-head attention from MLA weights (REFERENCE section 2, steps 1-5).

    x [B, T, D]; p = {'wq_a','q_norm','wq_b'} or {'wq'}, plus 'wkv_a','kv_norm','wkv_b','wo', each a
    dict holding 'kernel' (projections) or 'scale' (norms). Returns [B, T, D].
    """
    x = f64(x)
    B, T, _ = x.shape
    N, dn, dr, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    eps = cfg.rms_norm_eps
    pos = np.arange(T) if positions is None else positions
    freqs = inv_freq(dr, cfg.rope_theta, cfg.rope_scaling)
    cf = rope_cos_factor(cfg.rope_scaling)
    # 1. queries
    if "wq" in p:
        q = np.einsum("btd,dnh->btnh", x, f64(p["wq"]["kernel"]))
    else:
        cq = rms_norm(x @ f64(p["wq_a"]["kernel"]), p["q_norm"]["scale"], eps)
        q = np.einsum("btq,qnh->btnh", cq, f64(p["wq_b"]["kernel"]))
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    # 2./3. latent, shared rope key, per-head keys and values
    kv = x @ f64(p["wkv_a"]["kernel"])  # [B, T, R + dr]
    c_kv, k_pe = kv[..., :R], kv[..., R:]
    c_kv = rms_norm(c_kv, p["kv_norm"]["scale"], eps)
    kvb = np.einsum("btr,rnh->btnh", c_kv, f64(p["wkv_b"]["kernel"]))
    k_nope, v = kvb[..., :dn], kvb[..., dn:]
    # 4. rope on q_pe and k_pe only; k_pe is ONE head broadcast to every head
    ang = np.asarray(pos, np.float64)[:, None, None] * freqs  # [T, 1, dr/2]
    q_pe = rope_complex(q_pe, ang, cf)  # [B, T, N, dr]
    k_pe = rope_complex(k_pe[:, :, None, :], ang, cf)  # [B, T, 1, dr]
    k = np.concatenate([k_nope, np.broadcast_to(k_pe, (B, T, N, dr))], axis=-1)
    qq = np.concatenate([q_nope, q_pe], axis=-1)
    scores = np.einsum("btnh,bsnh->bnts", qq, k) * softmax_scale(cfg)
    mask = np.tril(np.ones((T, T), bool))
    scores = np.where(mask, scores, -np.inf)
    probs = softmax(scores, axis=-1)
    o = np.einsum("bnts,bsnh->btnh", probs, v)
    return np.einsum("btnh,nhd->btd", o, f64(p["wo"]["kernel"]))


def mla_latent(x, p, cfg, positions=None):
    """(normed c_kv [B, T, R], roped k_pe [B, T, dr]): what an absorbed-attention cache stores."""
    x = f64(x)
    T = x.shape[1]
    R, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    pos = np.arange(T) if positions is None else positions
    kv = x @ f64(p["wkv_a"]["kernel"])
    c_kv = rms_norm(kv[..., :R], p["kv_norm"]["scale"], cfg.rms_norm_eps)
    freqs = inv_freq(dr, cfg.rope_theta, cfg.rope_scaling)
    ang = np.asarray(pos, np.float64)[:, None] * freqs  # [T, dr/2]
    k_pe = rope_complex(kv[..., R:], ang, rope_cos_factor(cfg.rope_scaling))
    return c_kv, k_pe


def mla_absorbed(q_nope, q_pe, c_kv, k_pe, wkv_b, wo, cfg):
    """Absorbed attention (REFERENCE section 2): scores from the latent, never expanding K/V.

    q_nope [B, T, N, dn], roped q_pe [B, T, N, dr], c_kv [B, S, R], k_pe [B, S, dr], wkv_b [R, N, dn+dv].
    """
    dn = cfg.qk_nope_head_dim
    w = f64(wkv_b)
    q_abs = np.einsum("btnh,rnh->btnr", f64(q_nope), w[..., :dn])
    scores = (np.einsum("btnr,bsr->bnts", q_abs, f64(c_kv)) + np.einsum("btnh,bsh->bnts", f64(q_pe), f64(k_pe)))
    scores *= softmax_scale(cfg)
    T, S = scores.shape[-2:]
    scores = np.where(np.tril(np.ones((T, S), bool), S - T), scores, -np.inf)
    probs = softmax(scores, -1)
    o_lat = np.einsum("bnts,bsr->btnr", probs, f64(c_kv))
    o = np.einsum("btnr,rnh->btnh", o_lat, w[..., dn:])
    return np.einsum("btnh,nhd->btd", o, f64(wo))


# ----------------------------------------------------------------------------- DeepSeekMoE


def topk_desc(a, k):
    """Indices of the k largest entries of each row, largest first (a [N, E])."""
    return np.argsort(-a, axis=-1, kind="stable")[:, :k]


def route(scores, bias, *, k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    """REFERENCE section 3 steps 2-5. scores [N, E] (sigmoid) -> weights [N, K], ids [N, K]."""
    s = f64(scores)
    N, E = s.shape
    sc = s + f64(bias)[None, :]
    per = E // n_group
    grouped = sc.reshape(N, n_group, per)
    gscore = np.sort(grouped, axis=-1)[..., -2:].sum(-1) if per >= 2 else grouped[..., 0]  # top-2 sum
    keep = topk_desc(gscore, topk_group)  # [N, topk_group]
    gmask = np.zeros((N, n_group), bool)
    np.put_along_axis(gmask, keep, True, axis=1)
    sc = np.where(np.repeat(gmask, per, axis=1), sc, -np.inf)
    idx = topk_desc(sc, k)
    w = np.take_along_axis(s, idx, axis=1)  # ORIGINAL scores, not biased ones
    if norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    return w * routed_scaling_factor, idx


def experts_onehot(x, idx, w, w_gate, w_up, w_down):
    """sum_k w_k * SwiGLU_{idx_k}(x), looping over experts with a one-hot combine matrix. x [N, D]."""
    x = f64(x)
    N = x.shape[0]
    E = w_gate.shape[0]
    combine = np.zeros((N, E))
    for kk in range(idx.shape[1]):
        combine[np.arange(N), idx[:, kk]] += w[:, kk]
    y = np.zeros_like(x)
    for e in range(E):
        rows = combine[:, e] != 0
        if rows.any():
            y[rows] += combine[rows, e:e + 1] * swiglu(x[rows], w_gate[e], w_up[e], w_down[e])
    return y


def balance_loss(scores, idx, E):
    """Sequence-wise L_bal (no alpha), mean over sequences. scores [B, T, E], idx [B, T, K]."""
    s = f64(scores)
    B, T, K = idx.shape
    out = []
    for b in range(B):
        count = np.bincount(idx[b].reshape(-1), minlength=E)
        f = E / (K * T) * count
        P = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
        out.append((f * P).sum())
    return float(np.mean(out))


def moe(x, p, cfg):
    """DeepSeekMoE layer. x [B, T, D] -> (y [B, T, D], counts [E], balance loss)."""
    x = f64(x)
    B, T, D = x.shape
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = sigmoid(x @ f64(p["router"]))  # [B, T, E]
    w, idx = route(scores.reshape(-1, E), p["bias"], k=K, n_group=cfg.n_group, topk_group=cfg.topk_group,
                   routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob)
    y = experts_onehot(x.reshape(-1, D), idx, w, f64(p["w_gate"]), f64(p["w_up"]), f64(p["w_down"]))
    if cfg.n_shared_experts > 0:
        sh = p["shared"]
        y = y + swiglu(x.reshape(-1, D), sh["gate"]["kernel"], sh["up"]["kernel"], sh["down"]["kernel"])
    counts = np.bincount(idx.reshape(-1), minlength=E).astype(np.float64)
    return y.reshape(B, T, D), counts, balance_loss(scores, idx.reshape(B, T, K), E)


# ----------------------------------------------------------------------------- blocks and the model


def block(x, p, cfg, is_moe):
    """Pre-norm block: x += MLA(norm(x)); x += FFN(norm(x)). Returns (x, counts or None, bal or None)."""
    eps = cfg.rms_norm_eps
    x = f64(x) + mla(rms_norm(x, p["attn_norm"]["scale"], eps), p["attn"], cfg)
    h = rms_norm(x, p["ffn_norm"]["scale"], eps)
    if is_moe:
        y, counts, bal = moe(h, p["ffn"], cfg)
        return x + y, counts, bal
    f = p["ffn"]
    return x + swiglu(h, f["gate"]["kernel"], f["up"]["kernel"], f["down"]["kernel"]), None, None


def layer_slice(tree, i):
    """Parameters of layer i of a stacked (leading 'layers' axis) parameter tree."""
    if isinstance(tree, dict):
        return {k: layer_slice(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def forward(tokens, p, cfg):
    """Whole DeepSeek-V3 forward incl. MTP (REFERENCE sections 2-4), layer by layer.

    Returns dict(logits [B, T, V], mtp_logits [D x [B, T, V]], counts [n_moe_blocks, E], balance).
    mtp depth k, position i: embedding of token i+k (0 past the end) FIRST in the concatenation with
    hnorm(h^{k-1}_i); h^0 = final-normed main hidden; shared embedding and head.
    """
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    eps = cfg.rms_norm_eps
    emb = f64(p["embed"]["embedding"])
    head = f64(p["lm_head"])
    x = emb[tokens]
    counts, bals = [], []
    for i in range(cfg.first_k_dense_replace):
        x, _, _ = block(x, layer_slice(p["dense_layers"], i), cfg, False)
    for i in range(cfg.num_hidden_layers - cfg.first_k_dense_replace):
        x, c, b = block(x, layer_slice(p["moe_layers"], i), cfg, True)
        counts.append(c)
        bals.append(b)
    h = rms_norm(x, p["norm"]["scale"], eps)
    logits = h @ head
    has_moe = cfg.first_k_dense_replace < cfg.num_hidden_layers
    mtp_logits = []
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        m = p["mtp"][k - 1]
        nxt = np.zeros_like(tokens)
        nxt[:, : T - k] = tokens[:, k:]
        e = rms_norm(emb[nxt], m["enorm"]["scale"], eps)
        hh = rms_norm(h, m["hnorm"]["scale"], eps)
        hp = np.concatenate([e, hh], axis=-1) @ f64(m["eh_proj"]["kernel"])
        h, c, b = block(hp, m["block"], cfg, has_moe)
        if has_moe:
            counts.append(c)
            bals.append(b)
        mtp_logits.append(rms_norm(h, m["norm"]["scale"], eps) @ head)
    return dict(logits=logits, mtp_logits=mtp_logits, counts=np.stack(counts) if counts else None,
                balance=float(np.mean(bals)) if bals else 0.0)
