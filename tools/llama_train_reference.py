"""A 10-step AdamW training curve of the committed Llama-family fixtures, by PyTorch +
`transformers` (the reference for kiln's Llama training path).

For each fixture directory (hf_llama_tiny: untied head, GQA 4/2; hf_qwen2_tiny: q/k/v biases,
tied head) it loads the model with `transformers`, takes 10 AdamW steps on one fixed batch with
the hyper-parameters kiln's GPT-2 curve uses (lr 1e-3, betas 0.9/0.95, eps 1e-8, weight decay
0.1 on tensors of two or more dimensions, gradient clipping to norm 1.0), and writes the batch,
the losses and the gradient norms before clipping to `<name>_train_ref.safetensors`.

    /work/venv/bin/python tools/llama_train_reference.py crates/kiln-model/tests/fixtures
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

LR, BETA1, BETA2, EPS, WEIGHT_DECAY, GRAD_CLIP, STEPS = 1e-3, 0.9, 0.95, 1e-8, 0.1, 1.0, 10
B, T = 3, 24


def curve(fixture: Path, seed: int) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(fixture, attn_implementation="eager")
    model = model.float().train()  # no dropout in these configs, so train() changes nothing
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T), generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    params = [p for p in model.parameters()]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(BETA1, BETA2), eps=EPS, foreach=False, fused=False)
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=GRAD_CLIP, foreach=False)
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    assert losses[-1] < losses[0], f"{fixture.name}: the loss should fall ({losses})"
    return {
        "x": x.to(torch.int32),
        "y": y.to(torch.int32),
        "losses": torch.tensor(losses, dtype=torch.float32),
        "grad_norms": torch.tensor(norms, dtype=torch.float32),
    }


def main(out: Path):
    import transformers

    for name, seed in [("llama", 11), ("qwen2", 12)]:
        ref = curve(out / f"hf_{name}_tiny", seed)
        meta = {
            "lr": str(LR), "beta1": str(BETA1), "beta2": str(BETA2), "eps": str(EPS),
            "weight_decay": str(WEIGHT_DECAY), "grad_clip": str(GRAD_CLIP), "steps": str(STEPS),
            "batch": str(B), "seq": str(T),
            "torch": torch.__version__, "transformers": transformers.__version__,
        }
        save_file(ref, str(out / f"{name}_train_ref.safetensors"), metadata=meta)
        print(name, "losses", " ".join(f"{v:.5f}" for v in ref["losses"].tolist()))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/kiln-model/tests/fixtures"))
