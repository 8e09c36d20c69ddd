"""Prints bench/results/e2e-<date>.json as a markdown table (one row per model × dtype) for RESULTS.md.
Usage: python3 scripts/e2e_table.py bench/results/e2e-2026-11-27.json"""
import json, sys
rows = json.load(open(sys.argv[1]))
by = {}
for r in rows:
    by.setdefault((r["model"], r["dtype"]), {})[r["metric"]] = r
cols = ["train_tok_s", "fwd_ms", "adapter_overhead", "peak_gib", "decode_tok_s", "ttft_ms"]
card = rows[0].get("card", "?") if rows else "?"
print(f"card: {card}; each cell: ours / PEFT (ratio, >1 = ours better)\n")
print("| model | dtype | " + " | ".join(cols) + " |")
print("| --- | --- | " + " | ".join("---" for _ in cols) + " |")
def fmt(x):
    if x is None: return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
for (m, d), v in by.items():
    cells = []
    for c in cols:
        r = v.get(c)
        cells.append("—" if r is None else f"{fmt(r.get('ours'))} / {fmt(r.get('peft'))} ({fmt(r.get('ratio'))})")
    print(f"| {m} | {d} | " + " | ".join(cells) + " |")
