#!/usr/bin/env python3
"""Expected wall time of a split `awq quantize` with the defaults (21 scale candidates,
128 x 512 calibration tokens), from the per-layer times measured on the Llama-2-7B-shaped layer
(docs/performance.md: 2 candidates, 16 x 512 tokens, 2 cores: forward 10.0 s, search 51.6 s,
clip 11.4 s, guard 15.5 s). Scaling rules, stated so they can be checked:
- forward and guard scale with tokens (x8); the search with tokens x candidates (x8 x 21/2);
  the clip search works on a fixed 512-token sample (x1);
- a 70B layer has 4.23x the 7B layer's parameters (8192 hidden, 28672 MLP, 8 KV heads);
- C cores run C/2 times as fast as 2 (the matmuls are ~80 % of the time and scale; this is
  optimistic for 32 cores);
- every job first reads the model once to check it and once to hash it (2 x size at 1 GB/s);
  the merge writes the checkpoint (0.6 B/param at 4 bits with f16 scales) and reads the parts.
Balanced ranges as `awq quantize --shard K/N` computes them; the hand-off runs N capture jobs.
"""

FWD, SEARCH, CLIP, GUARD = 10.0, 51.6, 11.4, 15.5
TOKENS, CANDIDATES = 128 / 16, 21 / 2


def layer(scale):
    q = (FWD * TOKENS + SEARCH * TOKENS * CANDIDATES + CLIP + GUARD * TOKENS) * scale
    return q, FWD * TOKENS * scale


def balanced(L, n, q, f):
    """Smallest worst shard time over contiguous ranges (shard.rs's greedy + bisection)."""
    def fits(limit):
        start, worst, shards = 0, 0.0, 0
        while start < L:
            if shards == n:
                return None
            cost, end, last = start * f, start, L - (n - shards - 1)
            while end < last and (end == start or cost + q <= limit):
                cost, end = cost + q, end + 1
            shards, start, worst = shards + 1, end, max(worst, cost)
        return worst if shards == n else None
    lo, hi = 0.0, L * (q + f)
    best = fits(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        got = fits(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    return best


def main():
    models = {"Llama-2-7B": (32, 1.0, 6.7e9, 13.5e9), "Llama-2-70B": (80, 4.23, 69e9, 138e9)}
    print("| model | cores per machine | machines | prefix recomputed | speed-up | handed over | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, (L, scale, params, size) in models.items():
        for cores in (4, 32):
            q, f = layer(scale)
            q, f = q * 2 / cores, f * 2 / cores
            io = 2 * size / 1e9
            merge = io + 2 * 0.6 * params / 1e9
            single = L * q + io
            for n in (1, 8, 32, 80):
                if n > L:
                    continue
                if n == 1:
                    print(f"| {name} | {cores} | 1 | {hours(single)} | 1.0 | | |")
                    continue
                prefix = balanced(L, n, q, f) + io + merge
                per = -(-L // n)
                capture = (L - per) * f / n + io
                handed = capture + per * q + io + merge
                print(f"| {name} | {cores} | {n} | {hours(prefix)} | {single / prefix:.1f} "
                      f"({single / prefix / n:.2f} N) | {hours(handed)} | {single / handed:.1f} "
                      f"({single / handed / n:.2f} N) |")


def hours(s):
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


main()
