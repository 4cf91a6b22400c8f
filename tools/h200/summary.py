"""The H200 run against issue 9's targets: tf_bf16's fused updates (the harness's JSON)
against the PyTorch peers timed in the same run, and against the first H200 run.

    python3 tools/h200/summary.py HARNESS_JSON [TORCH_PEERS_JSON] [BASELINE_JSON]

Targets (issue 9 item 5): every dense update at least 95% of the copy's effective
bandwidth on its bytes; stochastic rounding 1.00-1.02x the nearest update; pure-bf16
Adam near 0.9 ms with SR and 1.2 ms with Kahan at 2^28 parameters. A file that is
missing or unreadable is reported and skipped. Standard library only.
"""

import json
import sys

HEADLINE = ["sgd_momentum bf16/bf16 nearest", "sgd_momentum bf16/bf16 stochastic",
            "sgd_momentum bf16/bf16 kahan", "adam bf16/bf16 nearest",
            "adam bf16/bf16 stochastic", "adam bf16/bf16 kahan",
            "adamw_amsgrad bf16/bf16 stochastic", "adamw_amsgrad bf16/bf16 kahan"]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"summary: {path}: {e}")
        return None


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    harness = load(argv[1])
    peers = load(argv[2]) if len(argv) > 2 else None
    baseline = load(argv[3]) if len(argv) > 3 else None
    if not harness:
        return 1
    if harness.get("mode") != "gpu":
        print(f"summary: {argv[1]} is a {harness.get('mode')}-mode run: bits only, no times")
        return 0
    cases = {c["name"]: c for c in harness["cases"]}
    before = {c["name"]: c for c in baseline["cases"]} if baseline else {}
    print(f"\nsummary ({harness['n']} elements, medians of {harness['reps']}):")
    print(f"  {'tf_bf16 update':44s} {'ms':>8s} {'%copy':>7s} {'then ms':>8s} {'best sweep':>24s}")
    for name in HEADLINE:
        c = cases.get(name)
        if not c:
            continue
        sweep = c.get("sweep_ms") or {}
        best = min(sweep.items(), key=lambda kv: kv[1]) if sweep else None
        then = before.get(name, {}).get("ms")
        print(f"  {name:44s} {c['ms']:8.4f} {100 * c['tbps'] / c['copy_tbps']:6.1f}% "
              f"{then if then else float('nan'):8.4f} "
              f"{f'{best[0]} {best[1]:.4f}' if best else '-':>24s}")
    dense = [c for c in harness["cases"] if "sparse" not in c["name"]]
    below = [c["name"] for c in dense if c["tbps"] < 0.95 * c["copy_tbps"]]
    lowest = sorted(dense, key=lambda c: c["tbps"] / c["copy_tbps"])[:5]
    print(f"  dense updates at >= 95% of the copy: {len(dense) - len(below)} of {len(dense)}; "
          "lowest: " + ", ".join(f"{c['name']} {100 * c['tbps'] / c['copy_tbps']:.1f}%"
                                 for c in lowest))
    ratios = []
    for c in harness["cases"]:
        if " stochastic" in c["name"] and "(big)" not in c["name"]:
            nearest = cases.get(c["name"].replace(" stochastic", " nearest"))
            if nearest:
                ratios.append((c["name"].replace(" stochastic", ""), c["ms"] / nearest["ms"]))
    if ratios:
        worst = max(ratios, key=lambda r: r[1])
        print(f"  SR / nearest: {min(r[1] for r in ratios):.3f} to {worst[1]:.3f} "
              f"(worst {worst[0]}; target 1.00-1.02)")
    if peers:
        print(f"\n  PyTorch peers, same run ({peers.get('torch')}, {peers.get('device')}):")
        for row in peers["rows"]:
            print(f"    {row['name']:62s} {row['ms']:8.4f} ms")
        adam_sr = cases.get("adam bf16/bf16 stochastic")
        adam_kahan = cases.get("adam bf16/bf16 kahan")
        for label, c in (("tf_bf16 Adam SR (target ~0.9 ms)", adam_sr),
                         ("tf_bf16 Adam Kahan (target ~1.2 ms)", adam_kahan)):
            if c:
                print(f"    {label:62s} {c['ms']:8.4f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
