#!/usr/bin/env python3
"""Check that a kiln-written GPT-2 checkpoint loads in Hugging Face transformers and gives the
same logits as kiln.

  1. transformers.GPT2LMHeadModel.from_pretrained(DIR), f32, eval mode;
     logits_hf = model(ids)  -> [T, V]
  2. $KILN eval logits --ckpt DIR --ids 1,2,3 --out TMP.safetensors
     (writes tensor "logits" [T, V] f32, V = the unpadded vocab)   -> logits_kiln
     or, with --logits FILE, read "logits" from FILE instead of running kiln.
  3. For each position t: rel_t = ||kiln_t - hf_t|| / ||hf_t||; pass if max_t rel_t < --tol
     (default 1e-4). Also prints the whole-tensor relative error and the argmax agreement.

Exit status: 0 match, 1 mismatch, 2 could not run (load failure, kiln failure, shape mismatch).

Examples:
  /work/venv/bin/python tools/check_hf_checkpoint.py runs/demo/ckpt --ids 1,2,3,4
  /work/venv/bin/python tools/check_hf_checkpoint.py DIR --logits kiln_logits.safetensors
  # test helpers, no kiln needed:
  /work/venv/bin/python tools/check_hf_checkpoint.py /tmp/ck --make-test-ckpt
  /work/venv/bin/python tools/check_hf_checkpoint.py /tmp/ck --write-hf-logits /tmp/hf.safetensors
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
DEFAULT_IDS = "0,1,2,3,5,8,13,21,34,55,89,7,42,11,64,9"


def make_test_ckpt(path, vocab=97, n_layer=2, n_embd=64, n_head=4, n_positions=64, seed=0):
    """A small random GPT-2 checkpoint written by transformers, to test the loading half."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    print(f"wrote a random GPT-2 checkpoint to {path}: {sorted(os.listdir(path))}")


def hf_logits(ckpt, ids):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(ckpt).float()  # .float(): works on any transformers version
    model.eval()
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise SystemExit(f"ids {bad} out of range for vocab_size {vocab}")
    if len(ids) > model.config.n_positions:
        raise SystemExit(f"{len(ids)} ids > n_positions {model.config.n_positions}")
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long))
    return out.logits[0].float()  # [T, V]


def kiln_logits(kiln, ckpt, ids, out_path):
    cmd = [kiln, "eval", "logits", "--ckpt", ckpt, "--ids", ",".join(map(str, ids)), "--out", out_path]
    print("running: " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd)
    except OSError as e:
        print(f"could not run kiln ({kiln}): {e}; build it or pass --kiln / $KILN", file=sys.stderr)
        sys.exit(2)
    if proc.returncode != 0:
        print(f"kiln failed with exit status {proc.returncode}", file=sys.stderr)
        sys.exit(2)
    return load_logits(out_path)


def load_logits(path):
    from safetensors.torch import load_file

    return load_file(path)["logits"].float()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", metavar="DIR", help="checkpoint directory (config.json + model.safetensors)")
    ap.add_argument("--ids", default=DEFAULT_IDS, help=f"comma-separated token ids (default {DEFAULT_IDS})")
    ap.add_argument("--kiln", default=os.environ.get("KILN", os.path.join(ROOT, "target", "release", "kiln")),
                    help="kiln binary (default $KILN or target/release/kiln)")
    ap.add_argument("--logits", help="compare with tensor 'logits' [T, V] in this safetensors file "
                                     "instead of running kiln")
    ap.add_argument("--tol", type=float, default=1e-4, help="max per-position relative error (default 1e-4)")
    ap.add_argument("--make-test-ckpt", action="store_true",
                    help="write a small random GPT-2 checkpoint to DIR with transformers and exit")
    ap.add_argument("--write-hf-logits", metavar="FILE",
                    help="write the transformers logits for --ids to FILE (tensor 'logits') and exit")
    args = ap.parse_args()

    if args.make_test_ckpt:
        make_test_ckpt(args.ckpt)
        return 0

    ids = [int(s) for s in args.ids.split(",") if s.strip()]
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        ref = hf_logits(args.ckpt, ids)
    except SystemExit:
        raise
    except Exception as e:  # a load failure is the thing this tool exists to catch
        print(f"FAIL: transformers could not load {args.ckpt}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"transformers: loaded {args.ckpt}, logits {tuple(ref.shape)}")

    if args.write_hf_logits:
        from safetensors.torch import save_file

        save_file({"logits": ref.contiguous()}, args.write_hf_logits)
        print(f"wrote {args.write_hf_logits}")
        return 0

    if args.logits:
        got = load_logits(args.logits)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            got = kiln_logits(args.kiln, args.ckpt, ids, os.path.join(tmp, "logits.safetensors"))

    if got.shape != ref.shape:
        print(f"FAIL: shape mismatch: kiln {tuple(got.shape)} vs transformers {tuple(ref.shape)}",
              file=sys.stderr)
        return 2
    per_pos = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    worst = int(per_pos.argmax())
    total = ((got - ref).norm() / ref.norm()).item()
    argmax_agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"max per-position rel err {per_pos.max().item():.3e} (position {worst}), "
          f"whole-tensor rel err {total:.3e}, max abs diff {(got - ref).abs().max().item():.3e}, "
          f"argmax agreement {argmax_agree:.3f}")
    if per_pos.max().item() < args.tol:
        print(f"OK: logits match within {args.tol:g}")
        return 0
    print(f"FAIL: logits differ by more than {args.tol:g}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
