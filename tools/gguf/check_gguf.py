"""Checks a GGUF file that `kiln export` wrote, with independent readers:

1. the `gguf` package (llama.cpp's own Python reader) parses it; the architecture, shapes and
   types are as expected, and the dequantized token embedding matches the checkpoint within the
   type's bound;
2. with `--llama-cpp`, llama.cpp itself (PyPI `llama-cpp-python`) loads and runs it, and its
   logits for a token sequence are compared with kiln's (`kiln eval logits`).

    kiln export --ckpt DIR --type q8_0 --out m.gguf
    kiln eval logits --ckpt DIR --ids 1,2,3,... --out kiln_logits.safetensors
    /work/venv/bin/python tools/gguf/check_gguf.py DIR m.gguf [--llama-cpp kiln_logits.safetensors --ids 1,2,3,...]
"""

import argparse
import json
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file

# Worst-case error of one weight relative to its block's largest magnitude.
BOUND = {"F32": 1e-7, "F16": 1e-3, "Q8_0": 0.5 / 127 + 1e-3, "Q4_0": 1.0 / 8 + 1e-3}


def checkpoint_tensors(d: Path) -> dict:
    if (d / "model.safetensors").exists():
        return load_file(str(d / "model.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(d / shard)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--llama-cpp", type=Path, help="kiln logits (safetensors with 'logits') to compare with llama.cpp")
    ap.add_argument("--ids", help="the comma-separated token ids kiln's logits are for")
    args = ap.parse_args()
    ckpt = args.ckpt / "checkpoint" if (args.ckpt / "checkpoint" / "config.json").exists() else args.ckpt

    r = GGUFReader(str(args.gguf))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    tensors = {t.name: t for t in r.tensors}
    print(f"gguf reader: architecture {arch}, {len(tensors)} tensors, {len(r.fields)} metadata keys")
    emb = tensors["token_embd.weight"]
    ref = checkpoint_tensors(ckpt)
    ref_emb = ref.get("transformer.wte.weight", ref.get("model.embed_tokens.weight", ref.get("wte.weight")))
    got = dequantize(emb.data, emb.tensor_type).reshape(ref_emb.shape).astype(np.float32)
    kind = emb.tensor_type.name
    amax = np.abs(ref_emb).reshape(-1, 32).max(axis=1).repeat(32).reshape(ref_emb.shape) if kind.startswith("Q") else np.abs(ref_emb) + 1e-30
    worst = float((np.abs(got - ref_emb) / amax).max())
    print(f"token_embd {kind}: worst error {worst:.2e} of the block's largest magnitude (bound {BOUND[kind]:.2e})")
    assert worst <= BOUND[kind], "dequantized embedding outside the bound"
    n_layer = int(r.fields[f"{arch}.block_count"].parts[-1][0])
    assert all(f"blk.{i}.ffn_down.weight" in tensors for i in range(n_layer)), "a block is missing"

    if args.llama_cpp:
        import llama_cpp

        kiln = load_file(str(args.llama_cpp))["logits"]
        ids = [int(i) for i in args.ids.split(",")]
        llm = llama_cpp.Llama(
            model_path=str(args.gguf), n_ctx=max(64, len(ids)), n_threads=2, logits_all=True, verbose=False,
            type_k=0, type_v=0, n_batch=len(ids),
        )
        llm.eval(ids)
        ours = np.asarray(llm.scores[: len(ids)], dtype=np.float32)[:, : kiln.shape[1]]
        rel = float(np.linalg.norm(ours - kiln) / np.linalg.norm(kiln))
        agree = float((ours.argmax(-1) == kiln.argmax(-1)).mean())
        print(f"llama.cpp {llama_cpp.__version__}: logits relative error vs kiln {rel:.2e}, argmax agreement {agree:.3f}")
        if kind == "F32":
            assert rel < 1e-3 and agree == 1.0


if __name__ == "__main__":
    main()
