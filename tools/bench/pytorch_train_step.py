#!/usr/bin/env python3
"""Time GPT-2 training steps in eager PyTorch on the CPU, as the baseline for `kiln bench train`.

Same model as tools/gpt2_reference.py at the gpt-s preset (n_layer=6, n_embd=384, n_head=6,
block_size=256), attention through F.scaled_dot_product_attention(is_causal=True) (the fast
path a PyTorch user would take). One step = forward, cross-entropy, backward,
clip_grad_norm_(1.0), AdamW (lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
dim >= 2 parameters), on one fixed random batch.

Prints one JSON line:
  {"impl": "pytorch", "torch_version", "threads", "precision", "batch", "seq", "vocab",
   "n_params", "tokens_per_s", "step_ms", "gflops", "peak_rss_mb"}

Example:
  /work/venv/bin/python tools/bench/pytorch_train_step.py --threads 2 --steps 10
"""

import argparse
import contextlib
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpt2_reference import GPT, GPTConfig, make_adamw  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                    help="bf16 = torch.autocast('cpu', dtype=torch.bfloat16) around forward+loss; "
                         "weights and optimizer stay f32")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                    block_size=max(args.block_size, args.seq), vocab_size=args.vocab)
    model = GPT(cfg, attn_impl="sdpa")
    model.train()
    opt = make_adamw(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    params = list(model.parameters())

    B, T = args.batch, args.seq
    x = torch.randint(0, args.vocab, (B, T))
    y = torch.randint(0, args.vocab, (B, T))

    def autocast():
        if args.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()  # forces completion of the step

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - t0

    # FLOPs per step (nanoGPT / PaLM estimate):
    #   flops_per_token = 6*N + 12*n_layer*n_embd*T
    # where N = number of parameters excluding wpe (so wte, the tied head, is counted once),
    # 6*N = forward (2N) + backward (4N) matmul flops, and 12*L*C*T the attention scores and
    # weighted sum (q@k^T and att@v, forward and backward, counting the full T x T square).
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("wpe."))
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * T
    step_s = elapsed / args.steps
    tokens_per_s = B * T / step_s
    result = {
        "impl": "pytorch",
        "torch_version": torch.__version__,
        "threads": args.threads,
        "precision": args.precision,
        "batch": B,
        "seq": T,
        "vocab": args.vocab,
        "n_params": n_params,
        "tokens_per_s": round(tokens_per_s, 2),
        "step_ms": round(step_s * 1e3, 3),
        "gflops": round(flops_per_token * tokens_per_s / 1e9, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
