#!/usr/bin/env python3
"""Draws docs/benchmarks.png from docs/benchmarks.json (written by `cargo bench --bench sessions`).

Usage: python3 scripts/plot_benchmarks.py [JSON] [PNG]   (needs matplotlib: pip install matplotlib)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks.json"
dst = sys.argv[2] if len(sys.argv) > 2 else "docs/benchmarks.png"
doc = json.load(open(src))
sizes = sorted(doc["results"], key=int)
proxies = [
    "direct",
    "tcp-relay",
    "vncgate",
    "vncgate-public",
    "websockify-per-process",
    "websockify-one-process",
    "tls-relay",
    "vncgate-tls",
    "websockify-tls",
]
styles = {
    "direct": ("tab:gray", "--", "o"),
    "tcp-relay": ("tab:blue", "-", "o"),
    "vncgate": ("tab:green", "-", "o"),
    "vncgate-public": ("tab:olive", "--", "^"),
    "websockify-per-process": ("tab:orange", ":", "o"),
    "websockify-one-process": ("tab:red", ":", "o"),
    "tls-relay": ("tab:blue", "-.", "s"),
    "vncgate-tls": ("tab:green", "-.", "s"),
    "websockify-tls": ("tab:red", "-.", "s"),
}

fig, (ax_tp, ax_rtt) = plt.subplots(1, 2, figsize=(11, 4.2))
for name in proxies:
    xs, tp, rtt = [], [], []
    for n in sizes:
        p = doc["results"][n]["proxies"].get(name)
        if p is None:
            continue
        xs.append(int(n))
        tp.append(p["mb_s"])
        rtt.append(p["rtt_p99_ms"])
    if not xs:
        continue
    color, line, marker = styles[name]
    ax_tp.plot(xs, tp, marker=marker, color=color, linestyle=line, label=name)
    ax_rtt.plot(xs, rtt, marker=marker, color=color, linestyle=line, label=name)

for ax in (ax_tp, ax_rtt):
    ax.set_xscale("log")
    ax.set_xticks([int(n) for n in sizes])
    ax.set_xticklabels(sizes)
    ax.set_xlabel("concurrent sessions (N)")
    ax.grid(True, alpha=0.3)
ax_tp.set_ylabel("aggregate server-to-client MB/s")
ax_tp.set_title("Throughput (median of rounds)")
ax_rtt.set_yscale("log")
ax_rtt.set_ylabel("round trip p99, ms (log)")
ax_rtt.set_title("8-byte messages at 20/s per session")
ax_tp.legend(fontsize=7)
fig.suptitle(f"vncgate sessions benchmark, {doc['machine']['cpus']} cores")
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
