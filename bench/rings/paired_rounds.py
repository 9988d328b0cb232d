#!/usr/bin/env python3
"""Runs bench_rings in short rounds and compares each benchmark with a reference measured in the
same round.

The development VM moves its two vCPUs between a near and a far placement every few seconds, so a
long run mixes two machines. Each round here is one short invocation of the benchmark binary that
runs every selected benchmark once (in random order), so the reference (by default the raw
cache-line ping-pong) and the others share a placement. Rounds are classified by the reference's
value (near when below --split), and the script prints, per mode, the median of each benchmark
and the median of its per-round ratio to the reference.

  bench/rings/paired_rounds.py build/rings/bench/rings/bench_rings --rounds 30 \\
      --filter 'PingPong_rtt/(raw_cache_line|two_cache_lines|myelin)' \\
      --reference PingPong_rtt/raw_cache_line --split 200

--baseline OTHER_BINARY runs a second build in every round as well (alternating which goes
first), so that old and new builds are compared within a placement too.

Run it with the process group at high priority on a shared machine
(sh -c 'echo -20 > /proc/self/autogroup; exec bench/rings/paired_rounds.py ...').
Values are the benchmark's real time per iteration in ns, or items/s (--items) for throughput.
"""
import argparse
import json
import statistics
import subprocess
import sys


def run_round(binary, filt, min_time, extra):
    cmd = [binary, f"--benchmark_filter={filt}", f"--benchmark_min_time={min_time}",
           "--benchmark_enable_random_interleaving=true", "--benchmark_format=json"] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["benchmarks"]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--filter", required=True)
    ap.add_argument("--reference", default="PingPong_rtt/raw_cache_line")
    ap.add_argument("--reference-filter", default=None,
                    help="run the reference in the same round although --filter excludes it")
    ap.add_argument("--split", type=float, default=200.0,
                    help="reference ns per round trip below which a round counts as near")
    ap.add_argument("--discard-above", type=float, default=None,
                    help="drop rounds whose reference real time (ns) exceeds this: on a shared "
                    "machine they were preempted, not placed far (they are counted and reported)")
    ap.add_argument("--min-time", default="0.05")
    ap.add_argument("--items", action="store_true", help="compare items/s instead of ns")
    ap.add_argument("--json", help="write every round's values here")
    ap.add_argument("--ratio", action="append", default=[],
                    help="A=B -- also print the median over rounds of value(A) / value(B) per mode "
                    "(names as printed, e.g. SPSC_throughput/myelin=SPSC_throughput/boost_spsc_queue)")
    ap.add_argument("--baseline", help="another bench_rings binary (e.g. the previous build) run in "
                    "every round too, in alternating order; its results are prefixed 'baseline:'")
    args = ap.parse_args()

    filt = args.filter
    if args.reference_filter:
        filt = f"({filt})|({args.reference_filter})"
    rounds = []
    for i in range(args.rounds):
        values = {}
        runs = [(args.binary, "")]
        if args.baseline:
            runs.append((args.baseline, "baseline:"))
            if i % 2:
                runs.reverse()
        for binary, prefix in runs:
            for b in run_round(binary, filt, args.min_time, []):
                if b.get("error_occurred"):
                    sys.exit(f"{b['name']}: {b.get('error_message')}")
                name = prefix + b["name"].removesuffix("/real_time")
                values[name] = (b["items_per_second"] if args.items else b["real_time"],
                                b["real_time"])
        rounds.append(values)
        print(f"round {i}: " + "  ".join(f"{k.split('/', 1)[-1]}={v[0]:.4g}"
                                         for k, v in sorted(values.items())), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounds, f, indent=1)

    ref_key = args.reference.removesuffix("/real_time")
    if args.discard_above is not None:
        kept = [r for r in rounds if ref_key in r and r[ref_key][1] <= args.discard_above]
        print(f"\ndiscarded {len(rounds) - len(kept)} of {len(rounds)} rounds whose reference "
              f"exceeded {args.discard_above:g} ns")
        rounds = kept
    for mode, pick in (("near", lambda r: r[ref_key][1] < args.split),
                       ("far", lambda r: r[ref_key][1] >= args.split)):
        sel = [r for r in rounds if ref_key in r and pick(r)]
        if not sel:
            continue
        print(f"\n{mode} placement ({args.reference} real time {'<' if mode == 'near' else '>='} "
              f"{args.split:g} ns): {len(sel)} rounds")
        names = sorted({k for r in sel for k in r})
        for name in names:
            vals = [r[name][0] for r in sel if name in r]
            ratios = [r[name][0] / r[ref_key][0] for r in sel if name in r]
            print(f"  {name:60s} median {statistics.median(vals):10.4g}   "
                  f"ratio to reference: median {statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
        for spec in args.ratio:
            a, b = spec.split("=")
            rs = [r[a][0] / r[b][0] for r in sel if a in r and b in r]
            if rs:
                print(f"  ratio {a} / {b}: median {statistics.median(rs):.3f} over {len(rs)} rounds "
                      f"(min {min(rs):.2f}, max {max(rs):.2f})")


if __name__ == "__main__":
    main()
