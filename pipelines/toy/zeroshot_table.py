"""The table of pipelines/toy/ZEROSHOT.md from a zeroshot_grid.sh folder (issue 27).

    python pipelines/toy/zeroshot_table.py [--prefix P] GRID_OUT [GRID_OUT ...]

Reads every GRID_OUT/eval_*<pair>.json (written by zeroshot_grid.sh; a newer file wins a cell both
hold); with several folders a cell is taken from the first that has it. Prints seen / unseen / hIoU
(mean ± half the seed range, every seed). ``--prefix P``: the zegclip cells of a grid run with
PREFIX=P (P_<pair>_<steps>_sN, Pfull_..., Pt_...) instead of z_, zfull_, t_.
"""
import glob
import json
import os
import sys

args = sys.argv[1:]
prefix = None
if args[:1] == ["--prefix"]:
    prefix, args = args[1], args[2:]
bases = args or sys.exit("usage: zeroshot_table.py [--prefix P] GRID_OUT [GRID_OUT ...]")
zp, fp, tp = (prefix, prefix + "full", prefix + "t") if prefix else ("z", "zfull", "t")
pairs = ["ball,boat", "star,flower", "ring,kite"]
def z(stages, name):
    s = stages.get(name)
    if not s: return None
    q = s["zero_shot"]; return (100*q["seen"], 100*q["unseen"], 100*q["hiou"])
def row(label, vals):
    vals = [v for v in vals if v]
    if not vals: return f"{label:26s} (not run)"
    m = [sum(v[i] for v in vals)/len(vals) for i in range(3)]
    h = [(max(v[i] for v in vals)-min(v[i] for v in vals))/2 for i in range(3)]
    per = " ; ".join("/".join(f"{x:.1f}" for x in v) for v in vals)
    return f"{label:26s} " + " | ".join(f"{a:.1f} ± {b:.1f}" for a, b in zip(m, h)) + f"   n={len(vals)} per seed S/U/H: {per}"
for p in pairs:
    st = {}
    for base in reversed(bases):
        for path in sorted(glob.glob(f"{base}/eval_*{p.replace(',', '_')}.json"), key=os.path.getmtime):
            with open(path) as f:
                st.update(json.load(f)["stages"])
    t = p.replace(",", "_")
    print("== unseen", p)
    for steps in (200, 1000, 2000):
        print(row(f"zegclip inductive {steps}", [z(st, f"{zp}_{t}_{steps}_s{s}") for s in (0, 1)]))
    for steps in (200, 1000, 2000):
        print(row(f"zegclip full {steps}", [z(st, f"{fp}_{steps}_s{s}") for s in (0, 1)]))
    print(row("zegclip transductive 2000", [z(st, f"{tp}_{t}_s{s}") for s in (0, 1)]))
    print(row("fusion seen-only 2000", [z(st, f"f_{t}_s{s}") for s in (0, 1)]))
    print(row("fusion full 2000", [z(st, f"ffull_s{s}") for s in (0, 1)]))
    print(row("clip training-free", [z(st, "clipv")]))
    if "clipv2" in st:  # clipes train --arch clip --name clipv2 --input-scale 2: zegclip's toy resolution
        print(row("clip training-free, x2", [z(st, "clipv2")]))
