#!/usr/bin/env bash
# Time `queue purge --quarantine` on a big queue (BENCHMARKS.md, "Quarantine at 100,000 queued
# messages"): fill a spool with N queued messages of 1 KB (`loadgen queue-fill`, bench/queue_fill.rs;
# 10 % of them authenticated as mallory, sender mallory@example.com), then time, each with its wall time and
# peak RSS (GNU time): the purge with --dry-run, the purge, `queue list --quarantined`, `queue
# restore --all --dry-run` and `queue restore --all`. No relay runs: the commands do the work.
#
#   bench/quarantine.sh [DIR]     DIR: where the spool goes (default a new temporary directory;
#                                 removed at the end unless given)
#
# Knobs: BENCH_PROFILE (cargo profile, default "bench-smoke"; "release" = fat LTO),
# BENCH_MESSAGES (default 100000), BENCH_FILTER (the purge's filter, default "--user mallory";
# "--from mallory@example.com" selects the same messages).
set -euo pipefail

cd "$(dirname "$0")/.."
profile=${BENCH_PROFILE:-bench-smoke}
messages=${BENCH_MESSAGES:-100000}
read -r -a filter <<< "${BENCH_FILTER:---user mallory}"
cargo build --locked --profile "$profile" --bin portcullis --example loadgen >&2
out_dir=$profile
[[ $profile == dev ]] && out_dir=debug
bin="target/$out_dir/portcullis"
fill="target/$out_dir/examples/loadgen"

if [[ $# -gt 0 ]]; then
  dir=$1
else
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
fi
spool="$dir/spool"

echo "fill: $("$fill" queue-fill --spool "$spool" --messages "$messages" --user mallory --share 10)"
sync

# One command, timed: its wall time (s) and peak RSS (KiB), then its last output line.
timed() {
  local name=$1
  shift
  local out
  out=$(/usr/bin/time -f "%e %M" -o "$dir/time" "$bin" "$@" --spool "$spool" | grep -v "running relay" | tail -n 1)
  read -r wall rss < "$dir/time"
  printf '%-40s wall %6.2f s  peak RSS %7d KiB  (%s)\n' "$name" "$wall" "$rss" "$out"
}

timed "purge ${filter[*]} --quarantine --dry-run" queue purge "${filter[@]}" --quarantine --dry-run
timed "purge ${filter[*]} --quarantine" queue purge "${filter[@]}" --quarantine
timed "list --quarantined" queue list --quarantined
timed "restore --all --dry-run" queue restore --all --dry-run
timed "restore --all" queue restore --all
echo "queued afterwards: $(find "$spool/queue" -maxdepth 1 -type f ! -name '*.state' | wc -l)"
