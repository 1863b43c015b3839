#!/usr/bin/env python3
"""Generation speed side by side: kiln, PyTorch + transformers, and llama.cpp, on the same
GPT-2-architecture model with random weights, the same prompt length, tokens and threads.

For a preset (gpt-s: 6×384, vocab 8192, context 256; gpt2-124m: 12×768, vocab 50257) it makes
one checkpoint directory with `transformers` (random init, seed 0) and a byte-level BPE vocabulary
of the right size trained by `kiln tokenizer train` on tinyshakespeare, exports it to GGUF with
`kiln export`, and then runs, alternately for R rounds:

  kiln bench generate --ckpt DIR --prompt-len P --gen G --json
  PyTorch: prefill P tokens, then G-1 single-token steps with the KV cache (greedy)
  llama.cpp (llama-cpp-python): the same on the GGUF, f32 weights and f32 KV cache

With --quant q8_0 (or q4_0) the weights are quantized on both sides instead: kiln's own
`kiln quantize --scheme int8` (per-channel, RTN) or `--scheme int4 --group-size 32` (RTN)
checkpoint beside llama.cpp's Q8_0 (Q4_0) GGUF exported by kiln; PyTorch has no peer there.

Prefill tokens/s = P / prefill time; decode tokens/s = (G-1) / decode time; best of 3 per round.

    /work/venv/bin/python tools/bench/compare_generate.py --preset gpt-s --rounds 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {"gpt-s": (6, 384, 6, 256, 8192), "gpt2-124m": (12, 768, 12, 1024, 50257)}


def kiln_bin() -> str:
    return os.environ.get("KILN", str(ROOT / "target" / "release" / "kiln"))


def prepare(preset: str, types, work: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, n_head, ctx, vocab = PRESETS[preset]
    d = work / preset
    if not (d / "model.safetensors").exists():
        d.mkdir(parents=True, exist_ok=True)
        data = Path(os.environ.get("KILN_DATA", ROOT.parent / "shared" / "data")) / "tinyshakespeare"
        text = sorted(data.glob("*.txt"))[0]
        subprocess.run([kiln_bin(), "tokenizer", "train", "--input", str(text), "--vocab-size", str(min(vocab, 8192)),
                        "--out", str(d / "tokenizer.json")], check=True, capture_output=True)
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=ctx, vocab_size=vocab,
                         activation_function="gelu_new", bos_token_id=vocab - 1, eos_token_id=vocab - 1)
        GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    for ty in types:
        g = d / f"model-{ty}.gguf"
        if not g.exists():
            subprocess.run([kiln_bin(), "export", "--ckpt", str(d), "--type", ty, "--out", str(g)], check=True,
                           capture_output=True)
    return d


def run_kiln(d: Path, p: int, g: int, threads: int) -> dict:
    out = subprocess.run([kiln_bin(), "--threads", str(threads), "bench", "generate", "--ckpt", str(d),
                          "--prompt-len", str(p), "--gen", str(g), "--reps", "3", "--json"],
                         check=True, capture_output=True, text=True).stdout
    v = json.loads(out.strip().splitlines()[-1])
    return {"prefill": v["prefill_tokens_per_s"], "decode": v["decode_tokens_per_s"]}


def run_torch(d: Path, p: int, g: int, threads: int) -> dict:
    code = f"""
import json, time, torch
from transformers import GPT2LMHeadModel
torch.set_num_threads({threads})
m = GPT2LMHeadModel.from_pretrained({str(d)!r}, torch_dtype=torch.float32).eval()
ids = torch.randint(0, m.config.vocab_size, (1, {p}), generator=torch.Generator().manual_seed(0))
best_p = best_d = 1e9
with torch.inference_mode():
    for _ in range(4):
        t0 = time.perf_counter(); out = m(input_ids=ids, use_cache=True); t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range({g} - 1):
            out = m(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
print(json.dumps({{"prefill": {p} / best_p, "decode": ({g} - 1) / best_d, "torch": torch.__version__}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_llamacpp(gguf: Path, p: int, g: int, threads: int, repack: bool = True) -> dict:
    """llama.cpp's best of 4. With repack=False its extra buffer types (the weight repacking and
    AMX kernels) are off: on a Xeon with AMX, llama-cpp-python 0.3.36 built natively crashes on
    Q8_0 and Q4_0 with them. A build without AMX repacks fine there; put it first on PYTHONPATH:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
    -DGGML_AMX_INT8=OFF ..." pip install --target DIR llama-cpp-python==0.3.36."""
    code = f"""
import json, time, random
import numpy as np, llama_cpp
import llama_cpp.llama_cpp as capi
if not {repack!r}:
    default_params = capi.llama_model_default_params
    def no_extra_bufts():
        mp = default_params()
        mp.use_extra_bufts = False
        return mp
    capi.llama_model_default_params = no_extra_bufts
llm = llama_cpp.Llama(model_path={str(gguf)!r}, n_ctx={p + g}, n_batch={p}, n_threads={threads},
                      n_threads_batch={threads}, type_k=0, type_v=0, verbose=False)
random.seed(0)
ids = [random.randrange(llm.n_vocab()) for _ in range({p})]
# Without logits_all llama-cpp-python keeps no scores; read the last position's logits directly.
last = lambda: int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
best_p = best_d = 1e9
for _ in range(4):
    llm.reset()
    t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
    nxt = last()
    for _ in range({g} - 1):
        llm.eval([nxt])
        nxt = last()
    t2 = time.perf_counter()
    best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
print(json.dumps({{"prefill": {p} / best_p, "decode": ({g} - 1) / best_d, "llama_cpp": llama_cpp.__version__,
                  "repack": {repack!r}, "system": llama_cpp.llama_print_system_info().decode().strip()}}))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode < 0 and repack:
        print(f"llama.cpp died with signal {-run.returncode} on {gguf.name}; again without repacking",
              file=sys.stderr, flush=True)
        return run_llamacpp(gguf, p, g, threads, repack=False)
    if run.returncode != 0:
        sys.exit(f"llama.cpp failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt-s", choices=sorted(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kiln_bench_models"))
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--quant", choices=["q8_0", "q4_0"], help="quantized weights on both sides")
    ap.add_argument("--kiln-ckpt", type=Path,
                    help="time this kiln checkpoint instead of the one made here (e.g. int4 with another group size)")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds to sleep before each run, so one peer's exit does not disturb the next")
    args = ap.parse_args()
    ty = args.quant or "f32"
    d = prepare(args.preset, [ty], args.work)
    kd = d
    if args.quant:
        kd = d.parent / f"{d.name}-kiln-{args.quant}"
        if not kd.exists():
            scheme = ["--scheme", "int8"] if args.quant == "q8_0" else ["--scheme", "int4", "--group-size", "32"]
            subprocess.run([kiln_bin(), "quantize", "--ckpt", str(d), *scheme, "--method", "rtn", "--out", str(kd)],
                           check=True, capture_output=True)
    if args.kiln_ckpt:
        kd = args.kiln_ckpt
    peers = {"kiln": lambda: run_kiln(kd, args.prompt_len, args.gen, args.threads)}
    if not args.quant:
        peers["pytorch"] = lambda: run_torch(d, args.prompt_len, args.gen, args.threads)
    if not args.no_llama_cpp:
        peers["llama.cpp"] = lambda: run_llamacpp(d / f"model-{ty}.gguf", args.prompt_len, args.gen, args.threads)
    rows = {k: [] for k in peers}
    for r in range(args.rounds):
        for name, f in peers.items():
            time.sleep(args.pause)
            v = f()
            rows[name].append(v)
            print(f"round {r + 1} {name:10s} prefill {v['prefill']:9.1f} tok/s   decode {v['decode']:8.1f} tok/s", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("prefill", "decode")} for k, v in rows.items()}
    print(f"\nmedians ({args.preset}, prompt {args.prompt_len}, gen {args.gen}, {args.threads} threads, {ty}):")
    for k, v in med.items():
        ratio = "" if k == "kiln" else f"   kiln/{k}: prefill {med['kiln']['prefill'] / v['prefill']:.2f}x, decode {med['kiln']['decode'] / v['decode']:.2f}x"
        print(f"  {k:10s} prefill {v['prefill']:9.1f}  decode {v['decode']:8.1f}{ratio}")
    print(json.dumps({"preset": args.preset, "weights": ty, "medians": med, "rounds": rows}))


if __name__ == "__main__":
    main()
