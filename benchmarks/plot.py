"""Plot a benchmark CSV written by ``benchmarks/bench.py``: time and peak memory per provider.

    python benchmarks/plot.py benchmarks/results/cpu.csv benchmarks/results/cpu.png

One panel pair per (op, mode): bars grouped by size (M, V, dtype), one bar per provider; the
left panel is the median time (whiskers p20-p80), the right the peak memory above the inputs.
The LM-head operations share a panel: fused (``linear_ce_ntl``) against materialised. The copy of
the logits (the bandwidth floor measured in the same run) is drawn as a bar in every forward +
backward panel of the logits operations, and each time bar is labelled with its DRAM bytes by
design as a multiple of the floor's (the ``traffic_x_floor`` column; absent in older files).
Only the newest run of each (op, provider, mode, size) in the file is drawn.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROVIDER_ORDER = ["copy (floor)", "triton", "cpp", "reference", "reference-compiled", "ntloss", "liger-ce+ntloss",
                  "torch-ce", "liger-ce"]
# the LM-head operations share one panel: fused against materialised, per backend
LM_HEAD = {"linear_ce_ntl": "fused", "matmul_ce_ntl": "materialised"}


def panel_and_label(row):
    if row["op"] in LM_HEAD:
        return "LM head + ce_ntl", f"{LM_HEAD[row['op']]} ({row['provider']})"
    return row["op"], row["provider"]


def load(path):
    newest = OrderedDict()
    with open(path) as handle:
        for row in csv.DictReader(handle):
            key = (row["op"], row["provider"], row["mode"], row["M"], row["V"], row["dtype"])
            newest[key] = row  # later rows (newer runs) replace earlier ones
    return list(newest.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("png")
    args = parser.parse_args(argv)
    rows = load(args.csv)
    copies = [r for r in rows if r["op"] == "copy"]
    rows = [r for r in rows if r["op"] != "copy"]
    for op in sorted({r["op"] for r in rows if r["op"] not in LM_HEAD and r["mode"] == "full"}):
        rows += [dict(r, op=op, provider="copy (floor)") for r in copies]
    for row in rows:
        row["op"], row["provider"] = panel_and_label(row)
    panels = sorted({(r["op"], r["mode"]) for r in rows})
    figure, axes = plt.subplots(len(panels), 2, figsize=(13, 3.6 * len(panels)), squeeze=False)
    for (op, mode), (time_axis, memory_axis) in zip(panels, axes):
        subset = [r for r in rows if r["op"] == op and r["mode"] == mode]
        sizes = sorted({(int(r["M"]), int(r["V"]), r["dtype"]) for r in subset})
        present = sorted({r["provider"] for r in subset})
        providers = [p for p in PROVIDER_ORDER if p in present] + [p for p in present if p not in PROVIDER_ORDER]
        width = 0.8 / max(1, len(providers))
        for index, provider in enumerate(providers):
            xs, medians, lows, highs, memory, traffic = [], [], [], [], [], []
            for position, (M, V, dtype) in enumerate(sizes):
                match = [r for r in subset
                         if r["provider"] == provider and (int(r["M"]), int(r["V"]), r["dtype"]) == (M, V, dtype)]
                if not match:
                    continue
                row = match[-1]
                median = float(row["median_ms"])
                xs.append(position + (index - (len(providers) - 1) / 2) * width)
                medians.append(median)
                lows.append(median - float(row["p20_ms"]))
                highs.append(float(row["p80_ms"]) - median)
                peak = float(row["peak_mib"])
                memory.append(peak if not math.isnan(peak) else 0.0)
                traffic.append(row.get("traffic_x_floor") or "")
            time_axis.bar(xs, medians, width, yerr=[lows, highs], label=provider, capsize=2)
            for x, median, moved in zip(xs, medians, traffic):
                if moved:
                    time_axis.annotate(f"{float(moved):.2g}x", (x, median), ha="center", va="bottom", fontsize=6,
                                       xytext=(0, 2), textcoords="offset points")
            memory_axis.bar(xs, memory, width, label=provider)
        labels = [f"M={M}\nV={V}\n{dtype}" for M, V, dtype in sizes]
        for axis, title in ((time_axis, "median time (ms); labels: bytes / floor's bytes"),
                            (memory_axis, "peak memory above inputs (MiB)")):
            axis.set_xticks(range(len(sizes)))
            axis.set_xticklabels(labels, fontsize=8)
            axis.set_title(f"{op} {mode}: {title}", fontsize=10)
            axis.set_yscale("log")
            axis.grid(axis="y", alpha=0.3)
        time_axis.legend(fontsize=8)
    device = rows[0]["device"] if rows else ""
    figure.suptitle(f"ntl_fast benchmarks on {device} (commit {rows[0]['commit'] if rows else ''})", fontsize=11)
    figure.tight_layout()
    figure.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
