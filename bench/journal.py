#!/usr/bin/env python3
"""How fast `portcullis trace` answers on a large message journal (BENCHMARKS.md, "Message
journal and trace").

1. `loadgen journal-fill` writes the journal of N synthetic messages (default 10,000,000)
   received over the last 7 days into a temporary spool, through the relay's own journal
   writer (same segments, rotation and sidecars).
2. `portcullis trace --spool DIR QUERY` is timed for a queue id and a Message-ID of an old and
   of a recent message, a sender address, a recipient address and a client IP: the median of
   --runs runs with a warm page cache, and of --runs runs with a cold one (every journal file
   dropped from the page cache with posix_fadvise(DONTNEED) after a sync before each run; the
   binary itself stays cached).
3. The size on disk (segments and sidecars) is reported, and the spool deleted (unless --keep).

Before writing it checks the free space: when N messages do not fit (with 20 % to spare) it
writes as many as fit and says so, so the figures can be extrapolated honestly.

Usage: bench/journal.py [--messages N] [--runs R] [--profile bench-smoke] [--dir BASE] [--keep]
Prints one JSON object (also written to target/journal-bench.json).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Journal octets per synthetic message (measured: about 4.1 events of ~190 octets, plus the
# sidecars); used only to decide whether N messages fit.
BYTES_PER_MESSAGE = 900


def build(profile):
    subprocess.run(
        ["cargo", "build", "--profile", profile, "--bin", "portcullis", "--example", "loadgen"],
        cwd=ROOT, check=True)
    out = ROOT / "target" / profile
    return out / "portcullis", out / "examples" / "loadgen"


def fitting(messages, base):
    free = shutil.disk_usage(base).free
    fit = int(free / 1.2 / BYTES_PER_MESSAGE)
    return min(messages, fit), free


def drop_cache(journal):
    os.sync()
    for path in journal.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(portcullis, spool, query):
    start = time.perf_counter()
    out = subprocess.run([str(portcullis), "trace", "--spool", str(spool), query],
                         capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    messages = sum(1 for line in out.stdout.splitlines() if line.startswith("message "))
    return elapsed, out.returncode, messages


def measure(portcullis, spool, query, runs):
    journal = spool / "journal"
    cold, warm = [], []
    found = None
    for _ in range(runs):
        drop_cache(journal)
        elapsed, code, messages = timed(portcullis, spool, query)
        cold.append(elapsed)
        found = (code, messages)
    timed(portcullis, spool, query)
    for _ in range(runs):
        elapsed, code, messages = timed(portcullis, spool, query)
        warm.append(elapsed)
    return {
        "query": query,
        "exit": found[0],
        "messages": found[1],
        "cold_median_s": round(statistics.median(cold), 3),
        "warm_median_s": round(statistics.median(warm), 3),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", default="bench-smoke")
    ap.add_argument("--dir", default=str(ROOT / "target"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    portcullis, loadgen = build(args.profile)
    messages, free = fitting(args.messages, args.dir)
    if messages < args.messages:
        print(f"only {messages} of {args.messages} messages fit in {free} free octets",
              file=sys.stderr)
    spool = Path(tempfile.mkdtemp(prefix="journal-bench-", dir=args.dir))
    try:
        fill = subprocess.run([str(loadgen), "journal-fill", "--spool", str(spool),
                               "--messages", str(messages)],
                              capture_output=True, text=True, check=True)
        filled = json.loads(fill.stdout)
        journal = spool / "journal"
        sidecars = sum(p.stat().st_size for p in journal.glob("*.idx"))
        results = [measure(portcullis, spool, q, args.runs)
                   for q in filled["queries"].values()]
        report = {
            "requested_messages": args.messages,
            "fill": filled,
            "sidecar_bytes": sidecars,
            "nproc": os.cpu_count(),
            "queries": dict(zip(filled["queries"].keys(), results)),
        }
    finally:
        if not args.keep:
            shutil.rmtree(spool, ignore_errors=True)
    text = json.dumps(report, indent=2)
    (ROOT / "target" / "journal-bench.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
