"""Loads a Llama-family directory that kiln wrote into `transformers` and compares its logits
with kiln's (kiln_logits.safetensors beside the weights).

    cargo run --release -p kiln-model --example llama_export -- llama-s /tmp/llama_s
    /work/venv/bin/python tools/check_hf_llama_export.py /tmp/llama_s
"""

import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(d: str):
    ref = load_file(f"{d}/kiln_logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids = ref["ids"].long().unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    kiln = ref["logits"]
    rel = ((logits - kiln).norm() / logits.norm()).item()
    agree = (logits.argmax(-1) == kiln.argmax(-1)).float().mean().item()
    print(f"{type(model).__name__}: logits relative error {rel:.2e}, argmax agreement {agree:.3f}")
    assert rel < 1e-4 and agree == 1.0


if __name__ == "__main__":
    main(sys.argv[1])
