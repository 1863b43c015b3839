#!/usr/bin/env python3
"""GPT-2 reference in plain PyTorch, and the fixture generator for kiln's Rust tests.

The model is nanoGPT-style GPT-2, f32, no dropout:

    x = wte[idx] + wpe[pos]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ wte.weight^T                      (tied output head)

    attn: c_attn (Linear C->3C, bias; rows q, then k, then v, heads contiguous in each),
          causal softmax(q k^T / sqrt(head_dim)) v, c_proj (Linear C->C, bias)
    mlp:  c_fc (Linear C->4C, bias), GELU(approximate='tanh'), c_proj (Linear 4C->C, bias)
    LayerNorm eps 1e-5 everywhere.

Attention implementation: `attn_impl="math"` (the default, and what the fixtures use) is the
explicit q @ k^T * scale, masked_fill(-inf) above the diagonal, softmax in float32, @ v.
`attn_impl="sdpa"` uses F.scaled_dot_product_attention(is_causal=True) (the benchmark uses it).

Parameter names (model.named_parameters()) are exactly the names the Rust side reads:
    wte.weight [V, C], wpe.weight [block_size, C],
    h.{i}.ln_1.{weight,bias} [C], h.{i}.attn.c_attn.weight [3C, C], h.{i}.attn.c_attn.bias [3C],
    h.{i}.attn.c_proj.weight [C, C], h.{i}.attn.c_proj.bias [C], h.{i}.ln_2.{weight,bias} [C],
    h.{i}.mlp.c_fc.weight [4C, C], h.{i}.mlp.c_fc.bias [4C], h.{i}.mlp.c_proj.weight [C, 4C],
    h.{i}.mlp.c_proj.bias [C], ln_f.{weight,bias} [C]
All Linear weights are PyTorch layout [out, in].

Run as a script, it writes one safetensors fixture per config (see tests/fixtures/README.md):

    /work/venv/bin/python tools/gpt2_reference.py --out crates/kiln-model/tests/fixtures
"""

import argparse
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, attn_impl: str):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.attn_impl = attn_impl
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=True)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=True)

    def forward(self, x):
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # rows of c_attn.weight: q, then k, then v
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # [B, nh, T, hd]
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # [B, nh, T, T]
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf"))
            att = F.softmax(att.float(), dim=-1).to(v.dtype)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=True)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=True)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, attn_impl: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(cfg, attn_impl)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, attn_impl: str = "math"):
        super().__init__()
        assert attn_impl in ("math", "sdpa")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg, attn_impl) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-2 init: N(0, 0.02) for Linear and embeddings, zero biases, LayerNorm (1, 0),
        and N(0, 0.02/sqrt(2*n_layer)) for the two residual projections (attn and mlp c_proj).
        Visited in named_parameters() order, so a fixed torch seed gives fixed weights."""
        proj_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if ".ln_" in name or name.startswith("ln_f"):
                if name.endswith(".weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, proj_std)
            else:  # wte, wpe, c_attn.weight, c_fc.weight
                p.normal_(0.0, 0.02)

    @torch.no_grad()
    def perturb_norms_and_biases(self):
        """Make LayerNorm weights 1 + 0.1*randn and every bias 0.02*randn, so that a test
        comparing against this model exercises non-trivial scale and shift values."""
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.02 * torch.randn_like(p))
            elif p.dim() == 1:  # LayerNorm weights (ln_1, ln_2, ln_f)
                p.copy_(1.0 + 0.1 * torch.randn_like(p))

    def forward(self, idx, targets=None):
        B, T = idx.shape
        assert T <= self.cfg.block_size
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        logits = x @ self.wte.weight.t()  # tied head: [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1).long()
            )
        return logits, loss


def make_adamw(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw):
    """AdamW with weight decay on every parameter with dim >= 2 (wte, wpe, Linear weights)
    and none on the rest (biases, LayerNorm)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


# ----------------------------------------------------------------------------- fixtures

CONFIGS = {
    # vocab 97: deliberately not a multiple of 64 (kiln pads the vocab to 128 internally).
    "gpt_tiny": dict(n_layer=2, n_embd=64, n_head=4, block_size=64, vocab_size=97, batch=3, seq=13),
    # gpt-s width and heads (C=384, 6 heads of 64). block_size 64 rather than 256 to save space
    # (only wpe depends on it; seq 37 < 64).
    "gpt_s_small": dict(n_layer=1, n_embd=384, n_head=6, block_size=48, vocab_size=500, batch=2, seq=37),
}

SEED = 1337
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, GRAD_CLIP, STEPS = 1e-3, 0.9, 0.95, 1e-8, 0.1, 1.0, 10


def make_fixture(name, spec):
    cfg = GPTConfig(**{k: spec[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})
    B, T = spec["batch"], spec["seq"]

    torch.manual_seed(SEED)
    model = GPT(cfg, attn_impl="math")
    model.perturb_norms_and_biases()
    model.train()  # no dropout anywhere, so train/eval are the same

    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)

    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["x"] = x.to(torch.int32)
    out["y"] = y.to(torch.int32)

    params = list(model.parameters())
    opt = make_adamw(model, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WEIGHT_DECAY,
                     fused=False, foreach=False)
    losses, grad_norms = [], []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        logits, loss = model(x, y)
        loss.backward()
        if step == 0:  # forward and gradients at the initial weights
            out["logits"] = logits.detach().clone()
            out["loss"] = loss.detach().reshape(1).clone()
            for n, p in model.named_parameters():
                out["grad." + n] = p.grad.detach().clone()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=GRAD_CLIP, foreach=False)
        opt.step()
        losses.append(loss.item())
        grad_norms.append(norm.item())
    out["losses"] = torch.tensor(losses, dtype=torch.float32)
    out["grad_norms"] = torch.tensor(grad_norms, dtype=torch.float32)

    for k, v in out.items():
        assert v.dtype in (torch.float32, torch.int32), (k, v.dtype)
    meta = {
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
        "block_size": cfg.block_size, "vocab_size": cfg.vocab_size, "batch": B, "seq": T,
        "lr": LR, "beta1": BETA1, "beta2": BETA2, "eps": EPS, "weight_decay": WEIGHT_DECAY,
        "grad_clip": GRAD_CLIP, "steps": STEPS, "seed": SEED, "torch_version": torch.__version__,
        "attention": "math: softmax(masked_fill(q@k^T/sqrt(hd), triu(1), -inf)) @ v, f32",
        "gelu": "tanh", "layernorm_eps": 1e-5, "dtype": "float32",
    }
    meta = {k: str(v) for k, v in meta.items()}
    return {k: v.contiguous() for k, v in out.items()}, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="crates/kiln-model/tests/fixtures", help="output directory")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    args = ap.parse_args()

    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order
    os.makedirs(args.out, exist_ok=True)
    for name in args.configs.split(","):
        tensors, meta = make_fixture(name, CONFIGS[name])
        path = os.path.join(args.out, f"{name}.safetensors")
        save_file(tensors, path, metadata=meta)
        V = int(meta["vocab_size"])
        losses = tensors["losses"].tolist()
        print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB, {len(tensors)} tensors")
        print(f"  ln(V)={math.log(V):.4f} loss0={tensors['loss'].item():.6f}")
        print("  losses: " + " ".join(f"{l:.6f}" for l in losses))
        print("  grad_norms: " + " ".join(f"{n:.4f}" for n in tensors["grad_norms"].tolist()))
        assert abs(losses[0] - math.log(V)) < 0.5, "initial loss should be near ln(V)"
        assert losses[-1] < losses[0], "losses should fall"


if __name__ == "__main__":
    main()
