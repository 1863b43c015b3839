"""Fixtures for kiln's Llama-family models, made by Hugging Face `transformers` (the reference).

For each tiny random model it writes a Hugging Face checkpoint directory (config.json,
model.safetensors or shards with an index, tokenizer.json, tokenizer_config.json with a chat
template) and `<name>_ref.safetensors` holding, for a fixed batch: tokens, targets, the logits,
the mean cross-entropy, the gradient of every parameter, and 20 greedy tokens.

    /work/venv/bin/python tools/llama_reference.py crates/kiln-model/tests/fixtures
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = (
    "The quick brown fox jumps over the lazy dog. A kiln fires clay into stone; the model learns "
    "to predict the next token. Llama models use rotary positions, RMSNorm and a SwiGLU MLP. "
) * 20


def make_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    return tok


def build(kind: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        attn_implementation="eager",
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(rope_theta=10000.0, tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama_scaled":
        cfg = transformers.LlamaConfig(
            rope_theta=500000.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            tie_word_embeddings=True,
            attention_bias=True,
            **{**common, "num_hidden_layers": 1, "num_key_value_heads": 1},
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(rope_theta=1000000.0, tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    # Random init draws tiny std-0.02 weights; scale up so the logits are not all near zero.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.mul_(4.0)
    return model.float().eval()


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(300)
    for kind, seed in [("llama", 1), ("qwen2", 2), ("llama_scaled", 3)]:
        model = build(kind, seed)
        d = out / f"hf_{kind}_tiny"
        # The Llama fixture is sharded to exercise model.safetensors.index.json.
        shard = "150KB" if kind == "llama" else "50MB"
        model.save_pretrained(d, safe_serialization=True, max_shard_size=shard)
        tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "bos_token": "<|endoftext|>",
                    "eos_token": "<|im_end|>",
                    "chat_template": CHAT_TEMPLATE,
                    "tokenizer_class": "PreTrainedTokenizerFast",
                },
                indent=2,
            )
        )
        g = torch.Generator().manual_seed(seed + 100)
        b, t = 2, 16
        tokens = torch.randint(0, 300, (b, t), generator=g)
        targets = torch.randint(0, 300, (b, t), generator=g)
        logits = model(input_ids=tokens).logits
        loss = F.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1))
        model.zero_grad()
        loss.backward()
        ref = {
            "tokens": tokens.to(torch.int32),
            "targets": targets.to(torch.int32),
            "logits": logits.detach().contiguous(),
            "loss": loss.detach().reshape(1),
        }
        for name, p in model.named_parameters():
            ref[f"grad.{name}"] = p.grad.detach().contiguous()
        # 20 greedy tokens after the first row's first 8 tokens, by full recompute.
        ids = tokens[:1, :8]
        with torch.no_grad():
            for _ in range(20):
                nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
        ref["greedy"] = ids[0].to(torch.int32)
        save_file(ref, str(out / f"{kind}_ref.safetensors"), metadata={"transformers": transformers_version()})
        print(kind, "loss", float(loss), "files", sorted(p.name for p in d.iterdir()))


def transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/kiln-model/tests/fixtures"))
