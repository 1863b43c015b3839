#!/usr/bin/env python3
"""PyTorch autocast fixtures for kiln's mixed-precision tests.

Loads the f32 weights, inputs and targets of the GPT-2 fixtures that tools/gpt2_reference.py
wrote (the same model code, attention in the explicit "math" form) and runs forward, the loss
and backward under `torch.autocast('cpu', dtype=...)` for bf16 and fp16: Linear layers and
matmuls in the low precision, softmax and cross-entropy in f32, parameters f32 (autocast casts
them per op). Writes `<name>_autocast.safetensors` next to them with, per dtype D in
{bf16, fp16}:

    D.logits [B, T, V] (as f32), D.loss [1], and for gpt_tiny D.grad.<param> for every parameter

    /work/venv/bin/python tools/autocast_reference.py --dir crates/kiln-model/tests/fixtures
"""

import argparse
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_reference import GPT, GPTConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run(name, fixture_dir, with_grads):
    path = os.path.join(fixture_dir, f"{name}.safetensors")
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    t = load_file(path)
    cfg = GPTConfig(**{k: int(meta[k]) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})
    model = GPT(cfg, attn_impl="math")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(t[n])
    x, y = t["x"].long(), t["y"].long()
    out = {}
    for tag, dtype in DTYPES.items():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            logits, loss = model(x, y)
        loss.backward()
        out[f"{tag}.logits"] = logits.detach().float().contiguous()
        out[f"{tag}.loss"] = loss.detach().float().reshape(1)
        if with_grads:
            for n, p in model.named_parameters():
                out[f"{tag}.grad.{n}"] = p.grad.detach().float().contiguous()
        e = ((out[f"{tag}.logits"] - t["logits"]).norm() / t["logits"].norm()).item()
        print(f"{name} {tag}: loss {loss.item():.6f} (f32 {t['loss'].item():.6f}), logits vs f32 {e:.2e}")
    meta_out = {"source": f"{name}.safetensors", "torch_version": torch.__version__,
                "autocast": "torch.autocast('cpu', dtype) around forward + loss; backward outside"}
    dst = os.path.join(fixture_dir, f"{name}_autocast.safetensors")
    save_file(out, dst, metadata=meta_out)
    print(f"{dst}: {os.path.getsize(dst) / 1e6:.2f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="crates/kiln-model/tests/fixtures")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    run("gpt_tiny", args.dir, with_grads=True)
    run("gpt_s_small", args.dir, with_grads=False)


if __name__ == "__main__":
    main()
