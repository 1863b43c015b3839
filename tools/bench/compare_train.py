#!/usr/bin/env python3
"""Compare kiln's training throughput with eager PyTorch on the same GPT-2 config.

Runs, alternately for R rounds (so slow drift of the machine hits both alike):
  $KILN bench train --preset gpt-s --batch B --seq T --vocab V --threads N --json
  python tools/bench/pytorch_train_step.py --batch B --seq T --vocab V --threads N ...
Each prints one JSON object; this script takes the last JSON line of each run's stdout.
Prints a table of every round, the median tokens/s of each, the ratio kiln/pytorch, and a
final JSON summary line.

KILN defaults to target/release/kiln (relative to the repository root) or $KILN.
Uses only the Python standard library; --python picks the interpreter with torch installed
(default: this one).

Example:
  /work/venv/bin/python tools/bench/compare_train.py --rounds 3
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def run_json(cmd):
    """Run cmd, return the last stdout line that parses as a JSON object."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")
    for line in reversed(proc.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise SystemExit(f"no JSON object in the output of: {shlex.join(cmd)}\n{proc.stdout}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--kiln", default=os.environ.get("KILN", os.path.join(ROOT, "target", "release", "kiln")),
                    help="kiln binary (default $KILN or target/release/kiln)")
    ap.add_argument("--python", default=sys.executable, help="python with torch (default: this one)")
    ap.add_argument("--preset", default="gpt-s")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                    help="passed to the PyTorch script; kiln gets --precision only if not f32")
    ap.add_argument("--pytorch-only", action="store_true", help="skip kiln (test the PyTorch half)")
    ap.add_argument("--pytorch-args", default="", help="extra args for pytorch_train_step.py, e.g. '--steps 5'")
    ap.add_argument("--kiln-args", default="", help="extra args for kiln bench train")
    args = ap.parse_args()

    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
              "--threads", str(args.threads)]
    kiln_cmd = [args.kiln, "bench", "train", "--preset", args.preset, *common, "--json"]
    if args.precision != "f32":
        kiln_cmd += ["--precision", args.precision]
    kiln_cmd += shlex.split(args.kiln_args)
    torch_cmd = [args.python, os.path.join(HERE, "pytorch_train_step.py"), *common,
                 "--precision", args.precision, *shlex.split(args.pytorch_args)]
    if args.preset != "gpt-s":
        print(f"note: the PyTorch script always runs the gpt-s shape; kiln runs --preset {args.preset}",
              file=sys.stderr)

    impls = [] if args.pytorch_only else [("kiln", kiln_cmd)]
    impls.append(("pytorch", torch_cmd))
    for name, cmd in impls:
        print(f"# {name}: {shlex.join(cmd)}", file=sys.stderr)

    rows = []
    print(f"{'round':>5}  {'impl':<8} {'tokens/s':>10} {'step_ms':>10} {'gflops':>8} {'peak_rss_mb':>11}")
    for r in range(args.rounds):
        for name, cmd in impls:
            res = run_json(cmd)
            rows.append((r, name, res))
            print(f"{r:>5}  {name:<8} {res['tokens_per_s']:>10.1f} {res['step_ms']:>10.1f} "
                  f"{res.get('gflops', float('nan')):>8.2f} {res.get('peak_rss_mb', float('nan')):>11.1f}",
                  flush=True)

    summary = {"rounds": args.rounds, "preset": args.preset, "batch": args.batch, "seq": args.seq,
               "vocab": args.vocab, "threads": args.threads, "precision": args.precision}
    for name, _ in impls:
        mine = [res for _, n, res in rows if n == name]
        summary[f"{name}_tokens_per_s_median"] = statistics.median(x["tokens_per_s"] for x in mine)
        summary[f"{name}_step_ms_median"] = statistics.median(x["step_ms"] for x in mine)
        summary[f"{name}_peak_rss_mb_max"] = max(x.get("peak_rss_mb", 0.0) for x in mine)
    torch_version = next(res.get("torch_version") for _, n, res in rows if n == "pytorch")
    summary["torch_version"] = torch_version
    print()
    for name, _ in impls:
        print(f"median {name:<8} {summary[name + '_tokens_per_s_median']:>10.1f} tokens/s")
    if not args.pytorch_only:
        ratio = summary["kiln_tokens_per_s_median"] / summary["pytorch_tokens_per_s_median"]
        summary["ratio_kiln_over_pytorch"] = round(ratio, 4)
        print(f"ratio kiln/pytorch: {ratio:.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
