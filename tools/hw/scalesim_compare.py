#!/usr/bin/env python3
"""Compare kiln-hw's systolic-array compute cycles with SCALE-Sim's on a suite of GEMMs.

Setup (SCALE-Sim 3.0.0 calls int() on one-element arrays, which numpy 2 refuses, so pin numpy):

    python3 -m venv /tmp/venv-scalesim
    /tmp/venv-scalesim/bin/pip install scalesim "numpy<2"
    /tmp/venv-scalesim/bin/python tools/hw/scalesim_compare.py [--out table.md] [--quick]

kiln's predictions come from `cargo run -p kiln-hw --example gemm_cycles` (the same
`kiln_hw::systolic::fold_cycles` that `kiln map` uses). SCALE-Sim runs with ample SRAM and
interface bandwidth so that its "Total Cycles" are compute cycles (its stall column is checked
to be 0). The script exits 1 when any case differs by more than 10%.
"""

import argparse
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import tempfile

CFG = """[general]
run_name = kiln

[architecture_presets]
ArrayHeight:    {rows}
ArrayWidth:     {cols}
IfmapSramSzkB:    65536
FilterSramSzkB:   65536
OfmapSramSzkB:    65536
IfmapOffset:    0
FilterOffset:   100000000
OfmapOffset:    200000000
Bandwidth : 4096
Dataflow : {df}
ReadRequestBuffer: 32
WriteRequestBuffer: 32

[layout]
IfmapCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 10
IfmapSRAMBankPort: 2
FilterCustomLayout: False
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 10
FilterSRAMBankPort: 2

[sparsity]
SparsitySupport : false
SparseRep : ellpack_block
OptimizedMapping : false
BlockSize : 8
RandomNumberGeneratorSeed : 40

[run_presets]
InterfaceBandwidth: USER
UseRamulatorTrace: False
"""

# (M, N, K): decoder shapes at gpt-s / GPT-2 widths (decode rows, prefill rows, attention) plus
# awkward sizes that leave partial folds.
SHAPES = [
    (1, 384, 384),
    (4, 1152, 384),
    (64, 384, 384),
    (128, 128, 64),
    (128, 64, 128),
    (100, 30, 50),
    (17, 33, 129),
    (256, 96, 200),
]
# SCALE-Sim's run time grows with cycles × array width (about a minute per 200k-cycle case on
# the 2-core development machine), so the suite keeps to arrays of 16 and more.
ARRAYS = [(16, 16), (32, 32), (16, 64), (64, 16)]
DATAFLOWS = ["ws", "os", "is"]


def scalesim_cycles(m, n, k, rows, cols, df):
    from scalesim.scale_sim import scalesim

    d = tempfile.mkdtemp(prefix="kiln-scalesim-")
    with open(f"{d}/s.cfg", "w") as f:
        f.write(CFG.format(rows=rows, cols=cols, df=df))
    with open(f"{d}/t.csv", "w") as f:
        f.write(f"Layer, M, N, K,\ng0, {m}, {n}, {k},\n")
    # A layout file is parsed even for GEMM inputs; its values are unused without custom layouts.
    with open(f"{d}/l.csv", "w") as f:
        f.write("Layer name," + ",".join(f" c{i}" for i in range(20)) + ",\n")
        f.write("g0, " + ", ".join(["1"] * 20) + ",\n")
    with contextlib.redirect_stdout(io.StringIO()):
        s = scalesim(save_disk_space=True, verbose=False, config=f"{d}/s.cfg", topology=f"{d}/t.csv",
                     layout=f"{d}/l.csv", input_type_gemm=True)
        s.run_scale(top_path=d)
    with open(f"{d}/kiln/COMPUTE_REPORT.csv") as f:
        rows_ = list(csv.reader(f))
    header = [h.strip() for h in rows_[0]]
    vals = [v.strip() for v in rows_[1]]
    rec = dict(zip(header, vals))
    stalls = int(rec["Stall Cycles"])
    if stalls != 0:
        raise RuntimeError(f"SCALE-Sim stalled {stalls} cycles for {(m, n, k, rows, cols, df)}: not compute-only")
    return int(rec["Total Cycles"])


def kiln_cycles(cases, repo):
    args = [f"{m},{n},{k},{r},{c},{df}" for (m, n, k, r, c, df) in cases]
    out = subprocess.run(["cargo", "run", "-q", "-p", "kiln-hw", "--example", "gemm_cycles", "--", *args],
                         cwd=repo, check=True, capture_output=True, text=True).stdout
    return [row["cycles"] for row in json.loads(out)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the Markdown table here as well")
    ap.add_argument("--quick", action="store_true", help="first three shapes and two arrays only")
    a = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shapes, arrays = (SHAPES[:3], ARRAYS[:2]) if a.quick else (SHAPES, ARRAYS)
    cases = [(m, n, k, r, c, df) for (m, n, k) in shapes for (r, c) in arrays for df in DATAFLOWS]
    ours = kiln_cycles(cases, repo)
    lines = ["| M×N×K | array | dataflow | SCALE-Sim cycles | kiln cycles | difference |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    worst = 0.0
    for case, kc in zip(cases, ours):
        m, n, k, r, c, df = case
        sc = scalesim_cycles(*case)
        diff = (kc - sc) / sc
        worst = max(worst, abs(diff))
        lines.append(f"| {m}×{n}×{k} | {r}×{c} | {df} | {sc:,} | {kc:,} | {diff * 100:+.3f}% |")
        print(lines[-1], flush=True)
    summary = f"{len(cases)} cases; largest difference {worst * 100:.3f}% (goal: within 10%)"
    print(summary)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n\n" + summary + "\n")
    sys.exit(0 if worst <= 0.10 else 1)


if __name__ == "__main__":
    main()
