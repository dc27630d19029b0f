#!/usr/bin/python3
"""An independent PyTorch implementation of the muonps MoE transformer.

It is written from the model's specification (README / issue text: the
DeepSeek-V3-style decoder with standard multi-head attention or DeepSeek-V3's
Multi-head Latent Attention), not from the C++ code, and serves three purposes:

  grad IN.safetensors OUT.safetensors [--out-dtype F32|F64]
      The loss and the gradient of every trainable tensor in float64.
      IN holds
        __metadata__["config"]      the ModelConfig as JSON (proto field names)
        __metadata__["loss_scale"]  multiplier on the summed cross-entropy
        __metadata__["aux_scale"]   multiplier on the summed aux balance loss
        every parameter and buffer under its HF name (F32, or F64)
        "inputs", "targets"         token ids, shape (B, T): I32, I64, or F32
                                    holding exact integers (muonps's writer
                                    only writes F32)
      OUT receives
        "loss"            shape [1]: loss_scale * sum CE + aux_scale * sum aux
        "loss_sum"        shape [1]: sum of per-token cross-entropy
        "aux_sum"         shape [1]: sum over MoE layers of aux (0 unless aux_loss)
        "grad.<name>"     for every trainable tensor (buffers excluded)
        "load.<layer>"    shape [E]: tokens routed to each expert in MoE layer <layer>
      in dtype --out-dtype (default F32, which muonps's reader accepts); the
      loss is also stored exactly in __metadata__["loss"] (repr of a double).

  shapes CONFIG.json
      Prints, one per line, "name shape..." of every tensor of the model a
      ModelConfig JSON describes, in the Hugging Face DeepSeek-V3 layout.

  bench [--threads N] [--steps N] [--warmup N] [--muon]
      Times one training step of the default model (micro_batch 2, 4 slots,
      T 256) in float32: forward + backward of every slot, then AdamW over
      all parameters (or, with --muon, Muon with Newton-Schulz on the hidden
      matrices and AdamW on the rest). Prints one JSON line with median
      milliseconds and tokens/s. bench/torch_train_step.py drives this.

The model, per layer on hidden states h (B, T, C):
  a = rmsnorm(h) * input_layernorm,  rmsnorm(x) = x / sqrt(mean(x^2) + eps)
  q, k, v = a Wq^T, a Wk^T, a Wv^T; RoPE ("rotate_half") on q, k
  h += causal_softmax(q k^T / sqrt(D)) v Wo^T
  or, under attention = "mla" (DeepSeek-V3's MLA, Hugging Face names):
  q = a Wq^T, or rmsnorm(a Wqa^T) * q_a_layernorm Wqb^T, per head [q_nope | q_pe]
  [c | k_pe] = a Wkva^T,  [k_nope | v] per head = (rmsnorm(c) * kv_a_layernorm) Wkvb^T
  q_pe and the one k_pe (shared by the heads) rotated with pairs (x[2i], x[2i+1])
  (view(d/2, 2).transpose, then rotate_half); Q = [q_nope | q_pe], K = [k_nope | k_pe]
  h += causal_softmax(Q K^T / sqrt(nope + rope)) v Wo^T
  m = rmsnorm(h) * post_attention_layernorm
  dense: y = down(silu(gate(m)) * up(m))
  MoE:   r = m Wg^T, s = sigmoid(r) | softmax(r), top-K of s + b (b only under
         aux_free_bias, ties to the lower index), w = s[chosen] (/ sum when
         norm_topk_prob) * routed_scaling_factor,
         y = sum_j w_j expert_j(m) + shared(m)
  h += y
logits = rmsnorm(h) * norm Wlm^T; CE per token; under aux_loss each MoE layer
adds aux = sum_e f_e P_e with f_e = E / (K N) * count_e (a constant) and
P_e = mean_n s[n, e] / sum_e' s[n, e'].

Only numpy, torch and the standard library are used.
"""

import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as functional

# ---------------------------------------------------------------------------
# safetensors, read and written by hand

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
}


def read_safetensors(path):
    """Returns (tensors: name -> numpy array, metadata: dict)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if 8 + header_len > len(raw):
        raise ValueError(f"{path}: header length {header_len} past the end of the file")
    header = json.loads(raw[8:8 + header_len].decode("utf-8"))
    data = raw[8 + header_len:]
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, entry in header.items():
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * np.dtype(dtype).itemsize or end > len(data):
            raise ValueError(f"{path}: tensor {name}: bad data offsets {begin}, {end}")
        array = np.frombuffer(data[begin:end], dtype=np.dtype(dtype).newbyteorder("<"))
        tensors[name] = array.reshape(shape).copy()
    return tensors, metadata


def write_safetensors(path, tensors, metadata, dtype="F32"):
    """Writes name -> array (cast to dtype) in insertion order."""
    np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pieces = []
    offset = 0
    for name, value in tensors.items():
        array = np.ascontiguousarray(np.asarray(value, dtype=np_dtype))
        blob = array.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        pieces.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in pieces:
            f.write(blob)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# configuration and parameter names

_DEFAULTS = {
    "vocab_size": 256,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "first_k_dense_replace": 1,
    "intermediate_size": 512,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 128,
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "balancing": "aux_free_bias",
    "bias_update_rate": 1e-3,
    "aux_loss_alpha": 1e-3,
    "initializer_range": 0.02,
    "attention": "mha",
}


def model_config(overrides):
    cfg = dict(_DEFAULTS)
    cfg.update(overrides)
    if cfg["scoring_func"] not in ("sigmoid", "softmax"):
        raise ValueError(f"scoring_func: {cfg['scoring_func']}")
    if cfg["balancing"] not in ("aux_free_bias", "aux_loss"):
        raise ValueError(f"balancing: {cfg['balancing']}")
    if cfg["attention"] not in ("mha", "mla"):
        raise ValueError(f"attention: {cfg['attention']}")
    if cfg["attention"] == "mla":
        D = cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg.setdefault("q_lora_rank", 0)
        cfg.setdefault("kv_lora_rank", 4 * D)
        cfg.setdefault("qk_nope_head_dim", D)
        cfg.setdefault("qk_rope_head_dim", D // 2)
        cfg.setdefault("v_head_dim", D)
        if cfg["q_lora_rank"] is None:
            cfg["q_lora_rank"] = 0
    return cfg


def parameter_shapes(cfg):
    """(name, shape, trainable) in the HF DeepSeek-V3 layout."""
    C, V = cfg["hidden_size"], cfg["vocab_size"]
    E, F = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    I, SF = cfg["intermediate_size"], cfg["n_shared_experts"] * cfg["moe_intermediate_size"]
    out = [("model.embed_tokens.weight", (V, C), True)]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out.append((p + "input_layernorm.weight", (C,), True))
        if cfg["attention"] == "mla":
            H, R = cfg["num_attention_heads"], cfg["kv_lora_rank"]
            dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
            QR = cfg["q_lora_rank"]
            a = p + "self_attn."
            if QR:
                out.append((a + "q_a_proj.weight", (QR, C), True))
                out.append((a + "q_a_layernorm.weight", (QR,), True))
                out.append((a + "q_b_proj.weight", (H * (dn + dr), QR), True))
            else:
                out.append((a + "q_proj.weight", (H * (dn + dr), C), True))
            out.append((a + "kv_a_proj_with_mqa.weight", (R + dr, C), True))
            out.append((a + "kv_a_layernorm.weight", (R,), True))
            out.append((a + "kv_b_proj.weight", (H * (dn + dv), R), True))
            out.append((a + "o_proj.weight", (C, H * dv), True))
        else:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out.append((p + f"self_attn.{proj}.weight", (C, C), True))
        out.append((p + "post_attention_layernorm.weight", (C,), True))
        if l < cfg["first_k_dense_replace"]:
            out.append((p + "mlp.gate_proj.weight", (I, C), True))
            out.append((p + "mlp.up_proj.weight", (I, C), True))
            out.append((p + "mlp.down_proj.weight", (C, I), True))
        else:
            out.append((p + "mlp.gate.weight", (E, C), True))
            out.append((p + "mlp.gate.e_score_correction_bias", (E,), False))
            for e in range(E):
                ep = p + f"mlp.experts.{e}."
                out.append((ep + "gate_proj.weight", (F, C), True))
                out.append((ep + "up_proj.weight", (F, C), True))
                out.append((ep + "down_proj.weight", (C, F), True))
            if SF > 0:
                out.append((p + "mlp.shared_experts.gate_proj.weight", (SF, C), True))
                out.append((p + "mlp.shared_experts.up_proj.weight", (SF, C), True))
                out.append((p + "mlp.shared_experts.down_proj.weight", (C, SF), True))
    out.append(("model.norm.weight", (C,), True))
    out.append(("lm_head.weight", (V, C), True))
    return out


# ---------------------------------------------------------------------------
# the model


def rmsnorm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rope_tables(T, D, theta, dtype):
    # angle(p, i) = p * theta^(-2i/D), i < D/2, always computed in float64.
    i = torch.arange(D // 2, dtype=torch.float64)
    inv_freq = theta ** (-2.0 * i / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angle.cos().to(dtype), angle.sin().to(dtype)  # (T, D/2) each


def apply_rope(x, cos, sin):
    # x (B, H, T, D); the pair is (x[i], x[i + D/2]).
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope_pairs(x, cos, sin):
    # DeepSeek-V3's apply_rotary_pos_emb: the pairs are (x[2i], x[2i+1]);
    # view(d/2, 2).transpose moves them to (x'[i], x'[i + d/2]), then rotate_half.
    *lead, d = x.shape
    x = x.reshape(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)
    return apply_rope(x, cos, sin)


def mla_attention(a, params, p, cfg, cos, sin):
    B, T, C = a.shape
    H, R = cfg["num_attention_heads"], cfg["kv_lora_rank"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    eps = cfg["rms_norm_eps"]
    w = lambda name: params[p + "self_attn." + name + ".weight"]
    if cfg["q_lora_rank"]:
        q = functional.linear(rmsnorm(functional.linear(a, w("q_a_proj")), w("q_a_layernorm"), eps),
                              w("q_b_proj"))
    else:
        q = functional.linear(a, w("q_proj"))
    q = q.view(B, T, H, dn + dr).transpose(1, 2)  # (B, H, T, dn + dr)
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    compressed = functional.linear(a, w("kv_a_proj_with_mqa"))  # (B, T, R + dr)
    c, k_pe = compressed[..., :R], compressed[..., R:]
    kv = functional.linear(rmsnorm(c, w("kv_a_layernorm"), eps), w("kv_b_proj"))
    kv = kv.view(B, T, H, dn + dv).transpose(1, 2)  # (B, H, T, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    k_pe = k_pe.view(B, 1, T, dr)
    q_pe = apply_rope_pairs(q_pe, cos, sin)
    k_pe = apply_rope_pairs(k_pe, cos, sin).expand(B, H, T, dr)
    qh = torch.cat((q_nope, q_pe), dim=-1)
    kh = torch.cat((k_nope, k_pe), dim=-1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(dn + dr)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, T, dv)
    out = out.transpose(1, 2).reshape(B, T, H * dv)
    return functional.linear(out, w("o_proj"))


def swiglu_mlp(x, gate, up, down):
    return functional.linear(functional.silu(functional.linear(x, gate)) * functional.linear(x, up),
                             down)


def attention(a, params, p, cfg, cos, sin):
    B, T, C = a.shape
    H = cfg["num_attention_heads"]
    D = C // H

    def heads(x):
        return x.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)

    q = apply_rope(heads(functional.linear(a, params[p + "self_attn.q_proj.weight"])), cos, sin)
    k = apply_rope(heads(functional.linear(a, params[p + "self_attn.k_proj.weight"])), cos, sin)
    v = heads(functional.linear(a, params[p + "self_attn.v_proj.weight"]))
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, T, D)
    out = out.transpose(1, 2).reshape(B, T, C)
    return functional.linear(out, params[p + "self_attn.o_proj.weight"])


def choose_experts(scores, bias, K):
    """Top-K experts per row of scores + bias; ties go to the lower index.

    A stable sort on the negated key keeps equal keys in index order, which is
    exactly the tie rule (torch.topk makes no such promise). Not differentiable.
    """
    key = scores.detach()
    if bias is not None:
        key = key + bias.detach().to(key.dtype)
    order = np.argsort(-key.cpu().numpy(), axis=1, kind="stable")
    return torch.from_numpy(np.ascontiguousarray(order[:, :K])).to(scores.device)  # (N, K)


def moe_block(m, params, p, cfg):
    """Returns (y, aux, load) for m (N, C)."""
    N, C = m.shape
    E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    logits = functional.linear(m, params[p + "mlp.gate.weight"])  # (N, E)
    if cfg["scoring_func"] == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = torch.softmax(logits, dim=-1)
    bias = params[p + "mlp.gate.e_score_correction_bias"] if cfg["balancing"] == "aux_free_bias" else None
    chosen = choose_experts(scores, bias, K)  # (N, K)
    weights = torch.gather(scores, 1, chosen)  # (N, K), differentiable in scores
    if cfg["norm_topk_prob"]:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * cfg["routed_scaling_factor"]

    y = torch.zeros_like(m)
    load = torch.zeros(E, dtype=torch.int64)
    for e in range(E):
        # Grouped: gather every (token, slot) routed to e, one SwiGLU, scatter-add.
        token, slot = torch.nonzero(chosen == e, as_tuple=True)
        load[e] = token.numel()
        if token.numel() == 0:
            continue
        ep = p + f"mlp.experts.{e}."
        out = swiglu_mlp(m.index_select(0, token), params[ep + "gate_proj.weight"],
                         params[ep + "up_proj.weight"], params[ep + "down_proj.weight"])
        y = y.index_add(0, token, out * weights[token, slot].unsqueeze(-1))
    if cfg["n_shared_experts"] > 0:
        sp = p + "mlp.shared_experts."
        y = y + swiglu_mlp(m, params[sp + "gate_proj.weight"], params[sp + "up_proj.weight"],
                           params[sp + "down_proj.weight"])

    aux = None
    if cfg["balancing"] == "aux_loss":
        f = (E / (K * N)) * load.to(scores.dtype)  # a constant: the choice is not differentiable
        P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
        aux = (f * P).sum()
    return y, aux, load


def forward(params, inputs, targets, cfg, loss_scale, aux_scale):
    """Returns (objective, loss_sum, aux_sum, loads) for inputs/targets (B, T) int64."""
    B, T = inputs.shape
    C = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    eps = cfg["rms_norm_eps"]
    dtype = params["model.embed_tokens.weight"].dtype
    mla = cfg["attention"] == "mla"
    rope_dim = cfg["qk_rope_head_dim"] if mla else C // H
    cos, sin = rope_tables(T, rope_dim, cfg["rope_theta"], dtype)
    h = functional.embedding(inputs, params["model.embed_tokens.weight"])  # (B, T, C)
    aux_terms = []
    loads = {}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        a = rmsnorm(h, params[p + "input_layernorm.weight"], eps)
        h = h + (mla_attention if mla else attention)(a, params, p, cfg, cos, sin)
        m = rmsnorm(h, params[p + "post_attention_layernorm.weight"], eps)
        if l < cfg["first_k_dense_replace"]:
            y = swiglu_mlp(m, params[p + "mlp.gate_proj.weight"], params[p + "mlp.up_proj.weight"],
                           params[p + "mlp.down_proj.weight"])
        else:
            y, aux, load = moe_block(m.reshape(B * T, C), params, p, cfg)
            y = y.view(B, T, C)
            loads[l] = load
            if aux is not None:
                aux_terms.append(aux)
        h = h + y
    x = rmsnorm(h, params["model.norm.weight"], eps)
    logits = functional.linear(x, params["lm_head.weight"])  # (B, T, V)
    loss_sum = functional.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1),
                                        reduction="sum")
    aux_sum = torch.stack(aux_terms).sum() if aux_terms else torch.zeros((), dtype=dtype)
    objective = loss_scale * loss_sum + aux_scale * aux_sum
    return objective, loss_sum, aux_sum, loads


# ---------------------------------------------------------------------------
# grad mode


def token_tensor(array, name):
    values = np.asarray(array)
    if values.dtype.kind == "f":
        rounded = np.rint(values)
        if not np.array_equal(rounded, values):
            raise ValueError(f"{name}: float token ids must be exact integers")
        values = rounded
    return torch.from_numpy(values.astype(np.int64))


def grad_main(args):
    tensors, metadata = read_safetensors(args.input)
    for key in ("config", "loss_scale", "aux_scale"):
        if key not in metadata:
            raise ValueError(f"{args.input}: __metadata__ lacks {key!r}")
    cfg = model_config(json.loads(metadata["config"]))
    loss_scale = float(metadata["loss_scale"])
    aux_scale = float(metadata["aux_scale"])
    inputs = token_tensor(tensors["inputs"], "inputs")
    targets = token_tensor(tensors["targets"], "targets")
    if inputs.dim() != 2 or inputs.shape != targets.shape:
        raise ValueError("inputs and targets must both be (B, T)")

    params = {}
    trainable = []
    for name, shape, train in parameter_shapes(cfg):
        if name not in tensors:
            raise ValueError(f"{args.input}: missing tensor {name}")
        value = tensors[name]
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: shape {value.shape}, expected {shape}")
        params[name] = torch.tensor(value, dtype=torch.float64, requires_grad=train)
        if train:
            trainable.append(name)

    torch.set_grad_enabled(True)
    objective, loss_sum, aux_sum, loads = forward(params, inputs, targets, cfg, loss_scale,
                                                  aux_scale)
    grads = torch.autograd.grad(objective, [params[n] for n in trainable], allow_unused=True)

    out = {
        "loss": np.array([objective.item()]),
        "loss_sum": np.array([loss_sum.item()]),
        "aux_sum": np.array([aux_sum.item()]),
    }
    for name, g in zip(trainable, grads):
        value = np.zeros(params[name].shape) if g is None else g.detach().numpy()
        out["grad." + name] = value
    for l, load in loads.items():
        out[f"load.{l}"] = load.numpy().astype(np.float64)
    write_safetensors(args.output, out, {"loss": repr(objective.item())}, dtype=args.out_dtype)


# ---------------------------------------------------------------------------
# bench mode


def newton_schulz5(g, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.t() if g.shape[0] > g.shape[1] else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.t()
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    return x.t() if g.shape[0] > g.shape[1] else x


class MuonWithAdamW:
    """Muon (nesterov, NS5, match_rms_adamw scale) on hidden matrices, AdamW elsewhere."""

    def __init__(self, named_params, lr=0.02, adam_lr=0.02, momentum=0.95, weight_decay=0.1):
        self.matrices = [p for n, p in named_params
                         if p.dim() == 2 and n not in ("model.embed_tokens.weight", "lm_head.weight")]
        ids = {id(p) for p in self.matrices}
        others = [p for _, p in named_params if id(p) not in ids]
        self.adamw = torch.optim.AdamW(others, lr=adam_lr, betas=(0.9, 0.95), eps=1e-8,
                                       weight_decay=weight_decay)
        self.buffers = [torch.zeros_like(p) for p in self.matrices]
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay

    @torch.no_grad()
    def step(self):
        for p, buf in zip(self.matrices, self.buffers):
            buf.mul_(self.momentum).add_(p.grad)
            u = p.grad + self.momentum * buf
            o = newton_schulz5(u)
            scale = 0.2 * math.sqrt(max(p.shape))
            p.mul_(1 - self.lr * self.wd).add_(o, alpha=-self.lr * scale)
        self.adamw.step()

    def zero_grad(self):
        for p in self.matrices:
            p.grad = None
        self.adamw.zero_grad(set_to_none=True)


def bench_step(threads, steps, warmup, muon, micro_batch=2, slots=4):
    """Median timings of a float32 training step of the default model (a dict)."""
    torch.set_num_threads(threads)
    torch.set_grad_enabled(True)
    cfg = model_config({})
    T = cfg["max_position_embeddings"]
    gen = torch.Generator().manual_seed(1)
    named = []
    params = {}
    for name, shape, train in parameter_shapes(cfg):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            value = torch.ones(shape)
        elif not train:
            value = torch.zeros(shape)
        else:
            value = torch.randn(shape, generator=gen) * cfg["initializer_range"]
        value.requires_grad_(train)
        params[name] = value
        if train:
            named.append((name, value))
    if muon:
        opt = MuonWithAdamW(named)
    else:
        opt = torch.optim.AdamW([p for _, p in named], lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.1)
    tokens = torch.randint(0, cfg["vocab_size"], (slots, micro_batch, T + 1), generator=gen)
    total_tokens = slots * micro_batch * T
    scale = 1.0 / total_tokens

    fwd_ms, bwd_ms, opt_ms, step_ms = [], [], [], []
    for step in range(warmup + steps):
        opt.zero_grad()
        t_fwd = t_bwd = 0.0
        start = time.perf_counter()
        for s in range(slots):
            inputs = tokens[s, :, :-1].contiguous()
            targets = tokens[s, :, 1:].contiguous()
            t0 = time.perf_counter()
            objective, _, _, _ = forward(params, inputs, targets, cfg, scale, 0.0)
            t1 = time.perf_counter()
            objective.backward()
            t2 = time.perf_counter()
            t_fwd += t1 - t0
            t_bwd += t2 - t1
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if step >= warmup:
            fwd_ms.append(t_fwd * 1e3)
            bwd_ms.append(t_bwd * 1e3)
            opt_ms.append((t4 - t3) * 1e3)
            step_ms.append((t4 - start) * 1e3)
    med = lambda xs: float(np.median(xs))
    return {
        "optimizer": "muon+adamw" if muon else "adamw",
        "threads": torch.get_num_threads(),
        "tokens_per_step": total_tokens,
        "step_ms": med(step_ms),
        "forward_ms": med(fwd_ms),
        "backward_ms": med(bwd_ms),
        "optimizer_ms": med(opt_ms),
        "tokens_per_s": total_tokens / (med(step_ms) * 1e-3),
        "torch": torch.__version__,
    }


def shapes_main(args):
    with open(args.config, encoding="utf-8") as f:
        cfg = model_config(json.load(f))
    for name, shape, _ in parameter_shapes(cfg):
        print(name, *shape)


def bench_main(args):
    print(json.dumps(bench_step(args.threads, args.steps, args.warmup, args.muon,
                                args.micro_batch, args.slots)), flush=True)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("grad", help="loss and gradients in float64")
    g.add_argument("input")
    g.add_argument("output")
    g.add_argument("--out-dtype", choices=("F32", "F64"), default="F32")
    sh = sub.add_parser("shapes", help="the tensors of a model config, one per line")
    sh.add_argument("config")
    b = sub.add_parser("bench", help="time a float32 training step of the default model")
    b.add_argument("--threads", type=int, default=torch.get_num_threads())
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--micro-batch", type=int, default=2)
    b.add_argument("--slots", type=int, default=4)
    b.add_argument("--muon", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "grad":
        torch.set_num_threads(1)
        grad_main(args)
    elif args.mode == "shapes":
        shapes_main(args)
    else:
        bench_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
