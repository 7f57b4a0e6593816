#!/usr/bin/env bash
# Time the incident-response queue commands on a big queue with the relay running
# (BENCHMARKS.md, "Queue commands at 100,000 messages"): fill a spool with N queued messages of
# 1 KB (`loadgen queue-fill`, bench/queue_fill.rs; 10 % of them submitted by mallory), start the
# relay on it, then RUNS times in a row: `queue list`, `queue list --json`, `queue hold --user
# mallory`, `queue release --user mallory`, `queue purge --quarantine --user mallory`, `queue
# restore --all`, each with its wall time and peak RSS (GNU time). After hold, release and
# restore it also waits for the relay to record the last of them (its `held:`, `released:` and
# `restored from quarantine:` log lines) and prints how long after the command's start that
# was. Each cycle leaves the queue as it found it.
#
# The relay's one upstream is a loopback listener that accepts and never answers, with
# `max_connections = 1`: one attempt hangs (a 30-minute reply timeout), every other message waits
# its turn, so the relay does nothing but take the commands' requests (an upstream that stopped
# answering, the "outbound mail stopped" incident).
#
#   bench/incident.sh [DIR]    DIR: where the spool goes (default a new temporary directory;
#                              removed at the end unless given)
#
# Knobs: BENCH_PROFILE (cargo profile, default "release"), BENCH_BIN (a portcullis binary to
# time instead of the one built here, e.g. an earlier version's), BENCH_MESSAGES (default
# 100000), BENCH_RUNS (default 3).
set -euo pipefail

cd "$(dirname "$0")/.."
profile=${BENCH_PROFILE:-release}
messages=${BENCH_MESSAGES:-100000}
runs=${BENCH_RUNS:-3}
cargo build --locked --profile "$profile" --bin portcullis --example loadgen >&2
out_dir=$profile
[[ $profile == dev ]] && out_dir=debug
bin=$(realpath "${BENCH_BIN:-target/$out_dir/portcullis}")
fill="target/$out_dir/examples/loadgen"

if [[ $# -gt 0 ]]; then
  dir=$(realpath "$1")
else
  dir=$(mktemp -d)
fi
spool="$dir/spool"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ $# -gt 0 ]] || rm -rf "$dir"
}
if [[ $# -gt 0 ]]; then trap 'cleanup keep' EXIT; else trap cleanup EXIT; fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
upstream_port=$(free_port)
mx_port=$(free_port)

# The upstream that never answers: accepts (the backlog keeps the rest) and stays silent.
python3 -c '
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
held = [s.accept()[0]]
time.sleep(86400)
' "$upstream_port" &
pids+=($!)

cat > "$dir/portcullis.toml" <<EOF
[server]
hostname = "bench.portcullis.test"
spool_dir = "$spool"

[[listeners]]
name = "mx"
bind = "127.0.0.1:$mx_port"
tls = "none"

[relay]
relay_networks = ["127.0.0.0/8"]

[[upstreams]]
name = "stalled"
address = "127.0.0.1:$upstream_port"
tls = "none"
max_connections = 1
timeout = "30m"

[queue]
retry = ["6h"]
bounces = false
EOF

echo "fill: $("$fill" queue-fill --spool "$spool" --messages "$messages" --user mallory --share 10)"
sync

"$bin" run --config "$dir/portcullis.toml" 2> "$dir/relay.log" &
relay=$!
pids+=("$relay")
until grep -qs "delivery scheduler started" "$dir/relay.log"; do
  kill -0 "$relay" || { cat "$dir/relay.log"; exit 1; }
  sleep 0.2
done
echo "relay: $(grep -o 'delivery scheduler started.*' "$dir/relay.log")"

# One command, timed: its wall time (s) and peak RSS (KiB), then its last output line (kept in
# $last_out; its start in $started).
timed() {
  local name=$1
  shift
  started=$(date +%s.%N)
  last_out=$(/usr/bin/time -f "%e %M" -o "$dir/time" "$bin" "$@" --spool "$spool" | grep -v "running relay" | tail -n 1)
  read -r wall rss < "$dir/time"
  printf '%-36s wall %6.2f s  peak RSS %7d KiB  (%s)\n' "$name" "$wall" "$rss" "$last_out"
}

count() { grep -c "$1" "$dir/relay.log" || true; }

# Wait until the relay's log has `want` more lines matching `pattern` than `before` (one fewer
# will do after 3 s: the message whose attempt hangs is recorded when that attempt ends), then
# print the time from the last command's start to the last of them.
recorded() {
  local pattern=$1 before=$2 want=$3 n waited=0
  while n=$(($(count "$pattern") - before)); ((n < want)); do
    if ((n >= want - 1 && waited >= 30)) || ((waited >= 3000)); then break; fi
    sleep 0.1
    waited=$((waited + 1))
  done
  local last
  last=$(grep "$pattern" "$dir/relay.log" | tail -n 1 | cut -d' ' -f1)
  printf '  the relay recording %d of %d: %.2f s after the command started\n' "$n" "$want" \
    "$(echo "$(date -d "$last" +%s.%N) - $started" | bc)"
}

# The number in "… requested for N messages", "quarantined N messages" and the like.
number() { grep -o '[0-9][0-9]*' <<< "$last_out" | head -n 1; }

for run in $(seq 1 "$runs"); do
  echo "run $run"
  timed "list" queue list
  timed "list --json" queue list --json
  before=$(count "held: not delivered")
  timed "hold --user mallory" queue hold --user mallory
  recorded "held: not delivered" "$before" "$(number)"
  before=$(count "released: due now")
  timed "release --user mallory" queue release --user mallory
  recorded "released: due now" "$before" "$(number)"
  before=$(count "removed by an operator")
  timed "purge --quarantine --user mallory" queue purge --quarantine --user mallory
  recorded "removed by an operator" "$before" "$(number)"
  before=$(count "restored from quarantine")
  timed "restore --all" queue restore --all
  recorded "restored from quarantine" "$before" "$(number)"
done
echo "queued afterwards: $(find "$spool/queue" -maxdepth 1 -type f ! -name '*.state' | wc -l)"
echo "control/ afterwards: $(find "$spool/control" -mindepth 1 | wc -l) files"
