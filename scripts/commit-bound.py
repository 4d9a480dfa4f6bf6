#!/usr/bin/env python3
"""How fast could an open be, given the state commits the daemon made?

Reads the stderr of a bench run made with the daemon's commit log on:

    VNCGATE_BENCH_DAEMON_LOG=warn,vncgate::state=debug VNCGATE_BENCH_OPENS_ONLY=1 \
        VNCGATE_BENCH_N=800 cargo bench --bench sessions 2> run.log
    python3 scripts/commit-bound.py run.log

For each 16-at-once open phase (between the bench's "opens16" marks) it takes the daemon's
commits (duration, calls answered) and prints what an open would take with no API cost at all:
a call answered by commit i was queued while commit i-1 was being written, so it waited for the
rest of commit i-1 and then for commit i. "worst" assumes it arrived as i-1 began
(d[i-1] + d[i]); "mid" as i-1 was half done (d[i-1] / 2 + d[i]). Each call counts once, so the
percentiles are over opens, as the bench's are. The issue's target is 2 x mean commit + 0.5 ms.
"""

import re
import sys

COMMIT = re.compile(r"state commit us=(\d+) calls=(\d+)")


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, round((len(v) - 1) * p))]


def phases(lines):
    inside, commits = False, []
    for line in lines:
        if "bench: opens16 begin" in line:
            inside, commits = True, []
        elif "bench: opens16 end" in line:
            inside = False
            yield commits
        elif inside and (m := COMMIT.search(line)):
            commits.append((int(m[1]) / 1000, int(m[2])))


def main(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        found = list(phases(f))
    if not found:
        sys.exit(f"{path}: no opens16 phase with commit lines (see the usage at the top)")
    for k, commits in enumerate(found):
        if not commits:
            print(f"phase {k}: no commit lines (was the log level warn,vncgate::state=debug?)")
            continue
        durations = [d for d, _ in commits]
        mean = sum(durations) / len(durations)
        target = 2 * mean + 0.5
        worst, mid = [], []
        for i, (d, calls) in enumerate(commits):
            before = commits[i - 1][0] if i else 0.0
            worst += [before + d] * calls
            mid += [before / 2 + d] * calls
        over = sum(1 for b in mid if b > target) / len(mid)
        print(
            f"phase {k}: {len(commits)} commits for {len(mid)} calls; commit ms mean {mean:.2f} "
            f"p50 {pct(durations, .5):.2f} p90 {pct(durations, .9):.2f} "
            f"p99 {pct(durations, .99):.2f}; target {target:.2f} ms; open with no API cost: "
            f"mid p50 {pct(mid, .5):.2f} p99 {pct(mid, .99):.2f}, "
            f"worst p50 {pct(worst, .5):.2f} p99 {pct(worst, .99):.2f} ms; "
            f"{over:.1%} of opens over the target at mid"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: commit-bound.py BENCH_STDERR_LOG")
    main(sys.argv[1])
