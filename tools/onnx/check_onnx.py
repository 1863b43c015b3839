#!/usr/bin/env python3
"""Checks `kiln export --format onnx` against transformers, through onnxruntime.

For each model (a tiny random GPT-2 written here by transformers, seed fixed, and the committed
Llama / Qwen2 fixtures in crates/kiln-model/tests/fixtures), this script:

1. runs `kiln export --format onnx` (f32) and `--format onnx --qdq`;
2. validates both files with `onnx.checker.check_model(full_check=True)`;
3. runs them in onnxruntime (CPU) on the same int64 input ids (two shapes, so the dynamic
   batch and sequence axes are exercised) and compares the logits with transformers' f32 logits:
   - f32: max|Δ| / max|ref| <= 1e-4;
   - QDQ (int8 weights per output channel, int8 activations per tensor, max|x|/127 scales
     calibrated by kiln on random tokens): a quantized model, compared with the float logits
     loosely: max|Δ| / max|ref| <= QDQ_REL_BOUND and top-1 agreement >= QDQ_TOP1_BOUND over
     all positions, for the graph as written (graph optimizations off: each Q/DQ runs as the
     spec defines it) and, on CPUs with VNNI, for onnxruntime's fused int8 kernels too (without
     VNNI they saturate; the figure is printed, not bounded). And exactly: the int8 weights times
     their scales reproduce transformers' weights within half a quantization step.

Exits 1 on any failure.

    /work/venv/bin/python tools/onnx/check_onnx.py [--kiln target/release/kiln]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "crates", "kiln-model", "tests", "fixtures")
F32_BOUND = 1e-4
QDQ_REL_BOUND = 0.10
QDQ_TOP1_BOUND = 0.90
# onnxruntime's x86 int8 GEMM without VNNI multiplies u8 x s8 pairs with 16-bit saturation
# (vpmaddubsw), which full-range int8 activations can overflow (onnxruntime's quantization
# docs, "reduce_range"); its fused QDQ results are only bounded where the CPU has VNNI.
VNNI = any(f in open("/proc/cpuinfo").read().split() for f in ("avx512_vnni", "avx_vnni")) \
    if os.path.exists("/proc/cpuinfo") else True


def make_gpt2(path):
    """A tiny GPT-2 with random weights (std 0.1 so logits spread), vocab not a multiple of 64."""
    torch.manual_seed(1234)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=97,
                     initializer_range=0.1, activation_function="gelu_new")
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:  # non-trivial LayerNorm gains and biases
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy().astype(np.float64), model


def ort_logits(onnx_path, ids, optimize=True):
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    (out,) = sess.run(["logits"], {"input_ids": ids})
    return out.astype(np.float64)


def export(kiln, ckpt, out, qdq):
    cmd = [kiln, "export", "--ckpt", ckpt, "--format", "onnx", "--out", out] + (["--qdq"] if qdq else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")


def weight_check(onnx_path, hf_model):
    """Dequantized int8 weights vs transformers' weights: within half a step per channel."""
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(onnx_path).graph.initializer}
    sd = {k: v.numpy().astype(np.float64) for k, v in hf_model.state_dict().items()}
    is_gpt2 = hf_model.config.model_type == "gpt2"
    c = hf_model.config.hidden_size
    worst = 0.0
    checked = 0
    for name, q in inits.items():
        if not name.endswith(".weight_int8"):
            continue
        base = name[: -len(".weight_int8")]
        deq = q.astype(np.float64) * inits[base + ".weight_scale"].astype(np.float64)[None, :]  # [in, out]
        parts = base.split(".")
        if base == "lm_head":
            ref = sd.get("lm_head.weight", sd.get("transformer.wte.weight", sd.get("model.embed_tokens.weight")))
        elif is_gpt2:
            l, kind = parts[1], parts[2]
            pre = f"transformer.h.{l}."
            conv = {"fc": "mlp.c_fc", "down": "mlp.c_proj", "o": "attn.c_proj"}
            if kind in "qkv":
                w = sd[pre + "attn.c_attn.weight"]  # Conv1D: [in, 3c]
                i = "qkv".index(kind)
                ref = w[:, i * c:(i + 1) * c].T
            else:
                ref = sd[pre + conv[kind] + ".weight"].T
        else:
            l, kind = parts[1], parts[2]
            names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                     "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
            ref = sd[f"model.layers.{l}.{names[kind]}.weight"]
        ref = ref.T  # [out, in] -> [in, out]
        step = inits[base + ".weight_scale"].astype(np.float64)[None, :]
        err = np.abs(deq - ref) / step
        worst = max(worst, float(err.max()))
        checked += 1
    return worst, checked


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--keep", help="directory to keep the exported files in")
    args = ap.parse_args()
    if not os.path.exists(args.kiln):
        sys.exit(f"no kiln binary at {args.kiln} (build it, or pass --kiln PATH)")
    work = args.keep or tempfile.mkdtemp(prefix="kiln_onnx_")
    os.makedirs(work, exist_ok=True)
    models = [("gpt2_tiny_random", make_gpt2(os.path.join(work, "gpt2_tiny")))]
    for name in ("hf_llama_tiny", "hf_qwen2_tiny", "hf_llama_scaled_tiny"):
        models.append((name, os.path.join(FIXTURES, name)))

    rng = np.random.default_rng(7)
    failures = []
    results = []
    for name, ckpt in models:
        vocab = json.load(open(os.path.join(ckpt, "config.json")))["vocab_size"]
        inputs = [rng.integers(0, vocab, size=(2, 13), dtype=np.int64),
                  rng.integers(0, vocab, size=(1, 40), dtype=np.int64)]
        refs = [hf_logits(ckpt, ids) for ids in inputs]
        hf_model = refs[0][1]
        for qdq in (False, True):
            out = os.path.join(work, f"{name}{'_qdq' if qdq else ''}.onnx")
            export(args.kiln, ckpt, out, qdq)
            onnx.checker.check_model(out, full_check=True)
            # The QDQ graph as written (each Q/DQ a float op) and as onnxruntime optimizes it
            # (fused into int8 kernels); the f32 graph optimized as usual.
            for optimize in ((True,) if not qdq else (False, True)):
                rel, agree, total = 0.0, 0, 0
                for ids, (ref, _) in zip(inputs, refs):
                    got = ort_logits(out, ids, optimize)
                    if got.shape != ref.shape:
                        failures.append(f"{name} qdq={qdq}: shape {got.shape} vs {ref.shape}")
                        continue
                    rel = max(rel, float(np.abs(got - ref).max() / np.abs(ref).max()))
                    agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                    total += ref.shape[0] * ref.shape[1]
                top1 = agree / max(total, 1)
                form = "f32" if not qdq else ("qdq, int8 kernels" if optimize else "qdq, as written")
                line = f"{name:22s} {form:18s} max|d|/max|ref| {rel:.2e}  top-1 agreement {top1:.3f}"
                if not qdq:
                    if rel > F32_BOUND:
                        failures.append(f"{name} f32: rel {rel:.3e} > {F32_BOUND}")
                elif not optimize or VNNI:
                    if rel > QDQ_REL_BOUND or top1 < QDQ_TOP1_BOUND:
                        failures.append(f"{name} {form}: rel {rel:.3e} (bound {QDQ_REL_BOUND}), "
                                        f"top-1 {top1:.3f} (bound {QDQ_TOP1_BOUND})")
                else:
                    line += "  (not bounded: no VNNI, see above)"
                print(line, flush=True)
            if qdq:
                wworst, n = weight_check(out, hf_model)
                print(f"{'':22s} int8 weights: worst |dequantized - w| {wworst:.3f} steps over {n} matrices")
                if wworst > 0.5 + 1e-3 or n == 0:
                    failures.append(f"{name}: dequantized weights off by {wworst} steps")
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, torch {torch.__version__}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("all ONNX checks passed")


if __name__ == "__main__":
    main()
