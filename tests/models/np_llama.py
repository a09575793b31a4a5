"""Independent float64 numpy forward of a LlamaCanon model, written from the paper's definitions.

It reads the Hugging Face ``config.json`` dict and HF tensors (PyTorch layouts: Linear ``[out, in]``, Conv1d
``[C, 1, K]``), so it shares nothing with canon-jax's parameter layout or conversion code. Loops run over
taps, heads and rotation pairs (vectorised over time) to stay close to the formulas.
"""

import numpy as np


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def canon(x, w, b, cfg, mask=None):
    """x: [T, C]; w: [C, 1, K] (tap K-1 on the current token)."""
    if mask is not None:
        x = x * mask[:, None]
    t_len, c = x.shape
    k = w.shape[2]
    out = np.zeros_like(x)
    for j in range(k):
        shift = k - 1 - j  # tap j looks `shift` tokens back
        out[shift:] += w[:, 0, j] * x[: t_len - shift]
    if b is not None:
        out += b
    if cfg.get("canon_activation", False):
        out = silu(out)
    if cfg.get("canon_residual", True):
        out = out + x
    return out


def rope(x, pos, rope_dim, theta, version):
    """x: [T, hd] one head; rotates the first rope_dim channels (pair i by angle pos * theta^(-2i/rope_dim))."""
    y = x.copy()
    half = rope_dim // 2
    for i in range(half):
        ang = pos * theta ** (-2.0 * i / rope_dim)
        c, s = np.cos(ang), np.sin(ang)
        a_idx, b_idx = (i, i + half) if version == "huggingface" else (2 * i, 2 * i + 1)
        a, b = x[:, a_idx], x[:, b_idx]
        y[:, a_idx] = a * c - b * s
        y[:, b_idx] = b * c + a * s
    return y


def forward(cfg, sd, ids, mask=None):
    """Logits [B, T, V] (float64) for int ids [B, T]; ``mask`` [B, T] marks valid keys / Canon inputs (optional)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    d, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    kvh = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or d // nh
    rope_dim = hd if cfg.get("rope_dim") is None else cfg["rope_dim"]
    eps, canon_set = cfg["rms_norm_eps"], cfg.get("canon_set", "")
    head = sd["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else sd["lm_head.weight"]

    def cw(name):
        return sd[name + ".weight"], sd.get(name + ".bias")

    outs = []
    for bi in range(ids.shape[0]):
        m = None if mask is None else mask[bi].astype(np.float64)
        t_len = ids.shape[1]
        pos = np.arange(t_len) if m is None else np.maximum(np.cumsum(m) - 1, 0)
        x = sd["model.embed_tokens.weight"][ids[bi]]
        for li in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{li}."
            a = rms(x, sd[p + "input_layernorm.weight"], eps)
            if "A" in canon_set:
                a = canon(a, *cw(p + "canonA"), cfg, m)
            q = a @ sd[p + "self_attn.q_proj.weight"].T
            k = a @ sd[p + "self_attn.k_proj.weight"].T
            v = a @ sd[p + "self_attn.v_proj.weight"].T
            if cfg.get("qk_norm"):
                q = rms(q, sd[p + "self_attn.q_norm.weight"], eps)
                k = rms(k, sd[p + "self_attn.k_norm.weight"], eps)
            if "B" in canon_set:
                qkv = canon(np.concatenate([q, k, v], -1), *cw(p + "self_attn.canonB"), cfg, m)
                q, k, v = qkv[:, : nh * hd], qkv[:, nh * hd : (nh + kvh) * hd], qkv[:, (nh + kvh) * hd :]
            attn = np.zeros((t_len, nh * hd))
            for h in range(nh):
                g = h // (nh // kvh)
                qh = rope(q[:, h * hd : (h + 1) * hd], pos, rope_dim, cfg["rope_theta"], cfg["rope_version"])
                kh = rope(k[:, g * hd : (g + 1) * hd], pos, rope_dim, cfg["rope_theta"], cfg["rope_version"])
                vh = v[:, g * hd : (g + 1) * hd]
                # causal mask plus padding mask on the keys; a query with no visible key keeps output 0
                visible = np.tril(np.ones((t_len, t_len), bool))
                if m is not None:
                    visible &= (m > 0)[None, :]
                sc = np.where(visible, qh @ kh.T / np.sqrt(hd), -np.inf)
                row_max = np.max(np.where(visible, sc, -1e300), axis=1, keepdims=True)
                pr = np.where(visible, np.exp(sc - row_max), 0.0)
                pr /= np.maximum(pr.sum(1, keepdims=True), 1e-300)
                attn[:, h * hd : (h + 1) * hd] = pr @ vh
            x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
            c = rms(x, sd[p + "post_attention_layernorm.weight"], eps)
            if "C" in canon_set:
                c = canon(c, *cw(p + "canonC"), cfg, m)
            gt = c @ sd[p + "mlp.gate_proj.weight"].T
            up = c @ sd[p + "mlp.up_proj.weight"].T
            if "D" in canon_set:
                f = gt.shape[1]
                gu = canon(np.concatenate([gt, up], -1), *cw(p + "mlp.canonD"), cfg, m)
                gt, up = gu[:, :f], gu[:, f:]
            x = x + (silu(gt) * up) @ sd[p + "mlp.down_proj.weight"].T
        x = rms(x, sd["model.norm.weight"], eps)
        outs.append(x @ head.T)
    return np.stack(outs)


def cross_entropy(logits, targets):
    z = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - z).sum(-1)) + z[..., 0]
    return np.mean(logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
