#!/usr/bin/env python3
"""Side-by-side relay benchmark: smtp-source -> relay on 127.0.0.1 -> smtp-sink on 127.0.0.1.

Started by bench/run, which installs postfix, builds portcullis and bench/loadgen.rs, and exports:
  BENCH_BIN  the portcullis binary      BENCH_LOADGEN  the load generator (bench/loadgen.rs)
  BENCH_TMP  a private temp dir (removed by bench/run)
Knobs (environment): BENCH_MESSAGES (scenario A messages per counted run, default 20000),
BENCH_RUNS (counted runs per relay and scenario, default 3), BENCH_WARMUP (messages in the
warm-up run, default 2000), BENCH_BIG_MESSAGES (scenario B, default 50), BENCH_STRACE_MESSAGES
(default 1000; 0 skips the fsync check), BENCH_SETTLE (pause in seconds before every
run, default 30, 0 with --smoke; see SETTLE_S), BENCH_C_RATE (scenario C rate,
default half of Postfix's scenario A median), BENCH_C_SECONDS (default 15; 0 skips C),
BENCH_D_IDLE (idle sessions held in scenario D, default 10000), BENCH_D_RATE (scenario D's
active load, default half of portcullis's scenario A median), BENCH_D_SECONDS (length of each of
D's two active runs, default 15; 0 skips D), BENCH_E_SECONDS (length of each scenario E run,
default 15; 0 skips E), BENCH_E_CONNS (concurrent STARTTLS clients in E, default 20),
BENCH_OUT (also write the tables to this file), BENCH_BEFORE_BIN (a second portcullis binary,
e.g. a build of the commit before a change, run beside the first in scenario A as
"portcullis-before").
Argument --smoke: scenario A for portcullis only (no Postfix, no scenarios B to E, no strace).
Argument --backlog: the Backlog scenario only (issue 19; also part of the full run, after the
fsync check). For each relay, alternating which goes first, BENCH_BACKLOG_RUNS passes (default
2), each on a fresh instance: the second client's rate on the idle relay; smtp-sink stopped (the
upstream refuses connections); BENCH_BACKLOG messages (default 100000; 0 skips the scenario in the
full run) of 1 KB queued by smtp-source (20 sessions, a new connection per message) and attempted
once by the relay (portcullis: a state file per message; Postfix: all in `deferred`); the relay
stopped (SIGTERM) and started, warm page cache, then again after dropping it: start to first 220,
and portcullis's recovery log lines; `queue list` (and --json) against `postqueue -p`, median of 3
after an untimed one; smtp-sink started, `queue retry --all` against `postqueue -f`, timed to an
empty queue, while a second smtp-source (10 sessions, BENCH_BACKLOG_NEW messages, default 5000,
to new@example.net) sends new mail. Both relays put their second attempt an hour away
(BACKLOG_RETRY_S). BENCH_MAX_LOAD: before each pass, wait up to BENCH_LOAD_WAIT seconds (default
900) until the 1-minute load average is at most this (default 0: do not wait).
Argument --auth: scenario F only (both relays, plus the DKIM signing cost).
Argument --atls: scenario A-TLS only (issue 19; also part of the full run, after the fsync check,
where the plaintext ratio comes from the run's own scenario A), after plaintext scenario A for
the ratio (BENCH_ATLS_PLAIN=0 skips it). A-TLS is scenario A (1 KB, 20 sessions, a new connection
per message) with STARTTLS on both hops: the client is `loadgen send --ca` (smtp-source has no
TLS; one rustls session store for the run, so sessions resume), the upstream of both relays is
`loadgen sink` offering STARTTLS (smtp-sink has none), and a CA and one ECDSA P-256 certificate
made with openssl for the run serve both relays and the sink. portcullis requires TLS on its
STARTTLS listener and `tls = "required"` (verified against the CA) upstream; Postfix has
smtpd_tls_security_level = may, smtp_tls_security_level = verify against the CA, both session
caches (btree) and smtp_tls_connection_reuse = yes (tlsproxy added to master.cf). For each
relay, BENCH_RUNS passes alternating which relay goes first, each on a fresh instance:
BENCH_ATLS_WARMUP messages (default 500), then BENCH_ATLS_MESSAGES (default BENCH_MESSAGES),
msg/s, relay CPU per message and peak RSS; then BENCH_RUNS open-loop passes per relay (loadgen
openloop with STARTTLS, fresh instances) at BENCH_ATLS_RATE msg/s (default half of Postfix's
A-TLS median) for BENCH_ATLS_SECONDS (default BENCH_C_SECONDS; 0 skips them): p99 accept->250.
BENCH_ATLS_MESSAGES=0 leaves A-TLS out of the full run.
Argument --observe: the cost of observability (issue 15): scenario A (new connection per
message) with this build, its admin listener on and scraped every BENCH_SCRAPE_S seconds (default
1: /metrics and /api/status) and its journal written, against BENCH_BEFORE_BIN, a build of the
commit before observability (bench/run builds it), alternating, BENCH_RUNS counted runs each
(default 5 here). The figure that matters is relay CPU ms per message; msg/s drifts too much on
these machines to resolve 5 %.
Argument --cluster: scale-out (issue 17). Scenario A (1 KB, new connection per message) through
HAProxy (TCP mode, send-proxy-v2, round robin, from 127.0.0.2, the nodes' trusted_proxies) to
two portcullis nodes, against one of the nodes used directly, alternating; HAProxy's CPU apart.
Then a node with all four [rate_limits] keys set never to refuse and [cluster] on a local
redis-server, against the same node without [cluster]: scenario A, and open-loop runs at
BENCH_CL_RATE msg/s (default 400) for BENCH_CL_SECONDS (default 15; 0 skips them) for the
accept->250 latency, with Redis's commands per message (INFO commandstats before and after each
run); then the sizes of the keys left in Redis (MEMORY USAGE) and redis-benchmark. Messages per
counted run: BENCH_CL_MESSAGES (default 10000); BENCH_SETTLE defaults to 10 s here;
BENCH_CL_PARTS: "haproxy", "redis" or both (default "haproxy,redis").

Scenario F (issue 14) is scenario A with SPF, DKIM and DMARC verification on: portcullis
(`[spf] verify = "record"`, `[dkim] verify = "record"`, `[dmarc] verify = "enforce"`, `[dns]`
at 127.0.0.1:53) against Postfix with OpenDKIM (verifying), OpenDMARC and
postfix-policyd-spf-python, on the same DKIM-signed message (smtp-source -F), from a client that
is untrusted on both sides. nsd serves the zones on 127.0.0.1:53; OpenDMARC and policyd-spf read
/etc/resolv.conf, which bench/run points at 127.0.0.1 for the run (this script refuses to run F
otherwise). Knobs: BENCH_F_MESSAGES (per counted run, default 5000), BENCH_F_WARMUP (default
500), BENCH_F_RELAYS (default "portcullis,postfix"; "postfix" alone measures only the Postfix
stack), BENCH_SIGN_COUNT (signatures per key type in the signing cost, default 2000; 0 skips it).

Every process started here is recorded in $BENCH_TMP/pids so that bench/run's trap can kill it
by PID even if this script dies; on a normal exit this script stops them itself.
"""

import datetime
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

TMP = os.environ["BENCH_TMP"]
BIN = os.environ["BENCH_BIN"]
LOADGEN = os.environ["BENCH_LOADGEN"]
SMOKE = "--smoke" in sys.argv[1:]
AUTH_ONLY = "--auth" in sys.argv[1:]
OBSERVE_ONLY = "--observe" in sys.argv[1:]
COST_ONLY = "--cost" in sys.argv[1:]
CLUSTER_ONLY = "--cluster" in sys.argv[1:]
BACKLOG_ONLY = "--backlog" in sys.argv[1:]
ATLS_ONLY = "--atls" in sys.argv[1:]
# Backlog (issue 19): messages queued during the outage, runs per relay, the second client's
# messages; 0 messages skips the scenario in the full run.
BACKLOG = int(os.environ.get("BENCH_BACKLOG", "100000"))
BACKLOG_RUNS = int(os.environ.get("BENCH_BACKLOG_RUNS", "2"))
BACKLOG_NEW = int(os.environ.get("BENCH_BACKLOG_NEW", "5000"))
# --backlog only: the relays to run it on (comma-separated; default both), e.g. "portcullis"
# to measure a change of portcullis alone.
BACKLOG_RELAYS = tuple(os.environ.get("BENCH_BACKLOG_RELAYS", "portcullis,postfix").split(","))
# Before each backlog pass, wait (at most LOAD_WAIT_S) until the 1-minute load average is at
# most MAX_LOAD (0: do not wait): the two cores are shared with other jobs.
MAX_LOAD = float(os.environ.get("BENCH_MAX_LOAD", "0"))
LOAD_WAIT_S = float(os.environ.get("BENCH_LOAD_WAIT", "900"))
# --cluster: messages per counted run and the open-loop rate and length of the latency runs.
CL_MESSAGES = int(os.environ.get("BENCH_CL_MESSAGES", "10000"))
CL_RATE = float(os.environ.get("BENCH_CL_RATE", "400"))
CL_SECONDS = float(os.environ.get("BENCH_CL_SECONDS", "15"))
# --cluster: which parts run ("haproxy", "redis" or both, comma-separated).
CL_PARTS = {p.strip() for p in os.environ.get("BENCH_CL_PARTS", "haproxy,redis").split(",")}
# --observe: how often the scraper reads /metrics and /api/status during the counted runs.
SCRAPE_S = float(os.environ.get("BENCH_SCRAPE_S", "1"))
F_MESSAGES = int(os.environ.get("BENCH_F_MESSAGES", "5000"))
F_WARMUP = int(os.environ.get("BENCH_F_WARMUP", "500"))
F_RELAYS = [n.strip() for n in os.environ.get("BENCH_F_RELAYS", "portcullis,postfix").split(",")
            if n.strip()]
SIGN_COUNT = int(os.environ.get("BENCH_SIGN_COUNT", "2000"))
MESSAGES = int(os.environ.get("BENCH_MESSAGES", "20000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
WARMUP = int(os.environ.get("BENCH_WARMUP", str(min(2000, MESSAGES))))
BIG_MESSAGES = int(os.environ.get("BENCH_BIG_MESSAGES", "50"))
STRACE_MESSAGES = int(os.environ.get("BENCH_STRACE_MESSAGES", "1000"))
ATLS_MESSAGES = int(os.environ.get("BENCH_ATLS_MESSAGES", str(MESSAGES)))
ATLS_WARMUP = int(os.environ.get("BENCH_ATLS_WARMUP", str(min(500, ATLS_MESSAGES))))
ATLS_SECONDS = float(os.environ.get("BENCH_ATLS_SECONDS", os.environ.get("BENCH_C_SECONDS", "15")))
ATLS_RATE = float(os.environ.get("BENCH_ATLS_RATE", "0") or 0)
ATLS_PLAIN = os.environ.get("BENCH_ATLS_PLAIN", "1") != "0"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SMALL = 1024
BIG = 10 * 1024 * 1024
# Time allowed for the sink count to move before a run is declared stuck.
STALL_S = float(os.environ.get("BENCH_STALL_S", "30"))
# Pause before every run. Right after a 20,000-message Postfix run portcullis measured 2.5x
# slower (687 vs 1,741 msg/s, 2.0 vs 0.7 ms CPU/msg) than after a 30 s pause: the machine needs to
# settle (cause not yet known), so every run, of either relay, starts after this pause.
# --smoke runs portcullis alone, so it needs no pause by default.
# --cluster: 10 s, as its runs are short and alternate the same relays.
SETTLE_S = float(os.environ.get("BENCH_SETTLE", "0" if SMOKE else "10" if CLUSTER_ONLY or COST_ONLY else "30"))
C_SECONDS = float(os.environ.get("BENCH_C_SECONDS", "15"))
D_IDLE = int(os.environ.get("BENCH_D_IDLE", "10000"))
D_SECONDS = float(os.environ.get("BENCH_D_SECONDS", "15"))
E_SECONDS = float(os.environ.get("BENCH_E_SECONDS", "15"))
E_CONNS = int(os.environ.get("BENCH_E_CONNS", "20"))
# After the sink on the relays' upstream port was replaced (scenario C swaps smtp-sink for
# loadgen's sink and back, and each loadgen run ends its sink), the relays' cached upstream
# connections to the old one are dead. Postfix keeps its cached connections 2 s; portcullis
# notices a dead pooled connection at its RSET, closes the rest of its pool and reconnects
# (tests/delivery.rs, a_restarted_upstream_...). A short pause lets Postfix's cache expire.
SINK_SWAP_PAUSE_S = 3.0
# Scenario D: pause after the idle sessions are open before RSS is read (allocation settles).
D_IDLE_SETTLE_S = 3.0
# Idle sessions held to Postfix to find the size of the smtpd process serving one of them.
POSTFIX_IDLE_SESSIONS = 5


# time.monotonic() when a sink on the upstream port last went away (see SINK_SWAP_PAUSE_S).
sink_gone_at = float("-inf")


def settle():
    """The pause before every run: SETTLE_S, and at least SINK_SWAP_PAUSE_S after a sink went."""
    time.sleep(max(SETTLE_S, sink_gone_at + SINK_SWAP_PAUSE_S - time.monotonic(), 0))


def sink_gone():
    global sink_gone_at
    sink_gone_at = time.monotonic()


def log(*a):
    print("bench:", *a, file=sys.stderr, flush=True)


def record_pid(pid):
    with open(os.path.join(TMP, "pids"), "a") as f:
        f.write(f"{pid}\n")


def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, **kw)
    record_pid(p.pid)
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited ({proc.returncode}) before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(5)
                s.recv(512)  # the banner: the server is really serving, not just listening
                s.sendall(b"QUIT\r\n")
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port} after {timeout}s")


def kill_pid(pid, sig=signal.SIGTERM):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_proc(p, timeout=10):
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def raise_nofile():
    """preexec_fn for the relay: soft RLIMIT_NOFILE up to the hard limit (scenario D holds
    10,000 sessions; the usual soft limit is 1,024)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def read_json_line(p, timeout, what):
    """The one JSON line a loadgen process prints on stdout, waiting at most `timeout` s."""
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError(f"{what}: no result line (exit status {p.poll()}, see {TMP}/loadgen.err)")
    return json.loads(line)


def loadgen(args, timeout):
    """Run bench/loadgen.rs to completion and return its JSON line."""
    p = spawn([LOADGEN, *args], stdout=subprocess.PIPE,
              stderr=open(os.path.join(TMP, "loadgen.err"), "a"))
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
        raise RuntimeError(f"loadgen {' '.join(args)}: no result after {timeout:.0f} s")
    if p.returncode != 0:
        raise RuntimeError(f"loadgen {' '.join(args)} exited {p.returncode} (see {TMP}/loadgen.err)")
    return json.loads(out.decode().strip().splitlines()[-1])


# ---- /proc accounting -------------------------------------------------------------------

def proc_stat(pid):
    """(ppid, utime+stime+cutime+cstime in ticks) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def tree(root):
    """root and all its live descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st:
                children.setdefault(st[0], []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(root):
    """CPU time of a process tree: each live process's own time plus that of the children it
    has reaped (cutime/cstime). A child that exits moves from the live sum into its parent's
    cutime, so the total only ever grows and nothing is counted twice."""
    total = 0
    for pid in tree(root):
        st = proc_stat(pid)
        if st:
            total += st[1]
    return total


def proxy_ticks(relay):
    """CPU time of the load balancer in front of a relay (HAProxy in --cluster), or 0."""
    root = getattr(relay, "proxy_root", None)
    return cpu_ticks(root) if root else 0


def stack_ticks(relay):
    """CPU time of a relay and its companion processes (Postfix's milters in scenario F)."""
    return sum(cpu_ticks(r) for r in [relay.root, *getattr(relay, "companions", [])])


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def smaps_kb(pid):
    """/proc/PID/smaps_rollup as {field: kB} (empty if the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return out


def pss_kb(pid):
    """Proportional set size: shared pages (libraries, Postfix's shared text) are split among
    the processes that map them, so a sum over many processes does not count them many times."""
    return smaps_kb(pid).get("Pss", 0)


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def socket_inodes(pid):
    """Inodes of the sockets process `pid` holds open."""
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(int(target[8:-1]))
    except OSError:
        pass
    return out


def established_inodes(local_port):
    """Inodes of the established IPv4 TCP sockets whose local port is `local_port` (the server
    side of sessions to that port), from /proc/net/tcp."""
    out = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if int(parts[1].split(":")[1], 16) == local_port and parts[3] == "01":
                out.add(int(parts[9]))
    return out


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# ---- the sink ----------------------------------------------------------------------------

class Sink:
    """smtp-sink -c: its running counters (cumulative 'mesg=N') are read as they are printed;
    the time each new count is seen is the arrival time of that message."""

    def __init__(self, port, dump=None):
        self.port = port
        self.cv = threading.Condition()
        self.proc = None
        self.start(dump)

    def start(self, dump=None):
        """Start smtp-sink on the port; its count starts again from 0. With `dump` (a directory
        writable by nobody) every message is also written there, one file each."""
        self.count = 0
        self.tail = b""
        self.t_last = time.monotonic()
        extra = ["-d", os.path.join(dump, "%H%M%S.")] if dump else []
        self.proc = spawn(["smtp-sink", "-u", "nobody", *extra, "-c", f"127.0.0.1:{self.port}", "1024"],
                          stdout=subprocess.PIPE, stderr=open(os.path.join(TMP, "sink.err"), "a"))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_port(self.port, proc=self.proc)

    def stop(self):
        """Stop smtp-sink and free the port (scenario C puts loadgen's own sink there)."""
        stop_proc(self.proc)
        sink_gone()
        self.reader.join(10)

    def _read(self):
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            now = time.monotonic()
            tail = (tail + chunk)[-256:]
            self.tail = tail
            m = re.findall(rb"mesg=(\d+)", tail)
            if m:
                n = int(m[-1])
                with self.cv:
                    if n != self.count:
                        self.count, self.t_last = n, now
                        self.cv.notify_all()

    def wait_for(self, target, stall=STALL_S):
        """Wait until the count reaches target, or it has not moved for `stall` seconds."""
        with self.cv:
            while self.count < target:
                last = self.count
                self.cv.wait(timeout=stall)
                if self.count == last:
                    break
            return self.count, self.t_last


# ---- the relays --------------------------------------------------------------------------

class Portcullis:
    """portcullis on the bench policy; `binary` and `name` let a second build (BENCH_BEFORE_BIN,
    e.g. the commit before a change) run beside it in scenario A."""

    def __init__(self, sink_port, binary=None, name="portcullis", edit_config=None):
        self.name = name
        binary = binary or BIN
        self.dir = os.path.join(TMP, name + ("-edited" if edit_config else ""))
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port()
        # The STARTTLS listener's certificate (ECDSA P-256), also served by loadgen tls-server.
        self.tls_dir = os.path.join(self.dir, "tls")
        subprocess.run([binary, "gen-cert", "--out", self.tls_dir, "--name", "bench.portcullis.test"],
                       check=True, timeout=60, stdout=subprocess.DEVNULL)
        self.cert = os.path.join(self.tls_dir, "cert.pem")
        self.key = os.path.join(self.tls_dir, "key.pem")
        with open(os.path.join(BENCH_DIR, "portcullis.toml")) as f:
            cfg = f.read()
        cfg = cfg.replace("127.0.0.1:25250", f"127.0.0.1:{self.port}")
        cfg = cfg.replace("127.0.0.1:25251", f"127.0.0.1:{self.tls_port}")
        cfg = cfg.replace("127.0.0.1:25260", f"127.0.0.1:{sink_port}")
        if edit_config:
            cfg = edit_config(cfg)
        self.config = os.path.join(self.dir, "portcullis.toml")
        with open(self.config, "w") as f:
            f.write(cfg)
        self.binary = binary
        self.launch()
        wait_port(self.port, proc=self.proc)

    def launch(self, log_name="log"):
        """Start the relay (its log in DIR/`log_name`) without waiting for it to serve."""
        self.log_path = os.path.join(self.dir, log_name)
        self.proc = spawn([self.binary, "run", "--config", self.config], cwd=self.dir,
                          stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                          preexec_fn=raise_nofile)
        self.root = self.proc.pid

    def queued(self):
        """Messages in the spool's queue, not yet delivered."""
        q = os.path.join(self.dir, "spool", "queue")
        return sum(1 for n in os.listdir(q) if not n.endswith(".state"))

    def stop(self, timeout=10):
        stop_proc(self.proc, timeout)


class Postfix:
    """A private Postfix instance: own config dir, queue and data dir under BENCH_TMP."""
    def __init__(self, sink_port, name="postfix", main_extra="", master_extra="", companions=()):
        self.name = name
        self.companions = list(companions)  # PIDs whose CPU counts towards this relay
        self.dir = os.path.join(TMP, name)
        etc, queue, data = (os.path.join(self.dir, d) for d in ("etc", "queue", "data"))
        for d in (etc, queue, data):
            os.makedirs(d, exist_ok=True)
        self.etc = etc
        self.port = free_port()
        master = "/etc/postfix/master.cf"
        if not os.path.exists(master):
            master = "/etc/postfix/master.cf.proto"
        with open(master) as f:
            mcf = f.read()
        # The smtp listener on our own loopback port instead of *:25.
        mcf, n = re.subn(r"(?m)^smtp(\s+inet\s)", f"127.0.0.1:{self.port}\\1", mcf)
        if n != 1:
            raise RuntimeError(f"{master}: expected one 'smtp inet' line, found {n}")
        with open(os.path.join(etc, "master.cf"), "w") as f:
            f.write(mcf + master_extra)
        main = f"""# written by bench/bench.py
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
myhostname = bench-postfix.localdomain
mydomain = localdomain
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
local_transport = error:no local delivery
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
smtpd_tls_security_level = none
message_size_limit = 52428800
mailbox_size_limit = 0
biff = no
maillog_file = {os.path.join(self.dir, "maillog")}
maillog_file_prefixes = /var, /dev/stdout, {TMP}
"""
        for line in main_extra.strip().splitlines():  # later settings override earlier ones
            key = line.split("=")[0].strip()
            main = re.sub(rf"(?m)^{re.escape(key)} =.*\n", "", main)
        main += main_extra
        with open(os.path.join(etc, "main.cf"), "w") as f:
            f.write(main)
        run = lambda *a: subprocess.run(["postconf", "-c", etc, *a], check=True, timeout=30)
        run("-F", "*/*/chroot = n")  # no chroot: no copies of /etc files in the queue dir
        subprocess.run(["postfix", "-c", etc, "set-permissions"], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["postfix", "-c", etc, "check"], check=True, timeout=60)
        self.queue = queue
        self.launch()
        wait_port(self.port, proc=self.proc)
        self.find_master()

    def launch(self, log_name="log"):
        """`postfix start-fg` (its output in DIR/`log_name`) without waiting for it to serve."""
        self.proc = spawn(["postfix", "-c", self.etc, "start-fg"],
                          stdout=open(os.path.join(self.dir, log_name), "w"),
                          stderr=subprocess.STDOUT)

    def find_master(self):
        """Read the master's PID (the root of the process tree) once it serves."""
        with open(os.path.join(self.queue, "pid", "master.pid")) as f:
            self.root = int(f.read().strip())
        record_pid(self.root)

    def queued(self):
        """Messages anywhere in Postfix's queue (maildrop, incoming, active, deferred, hold)."""
        n = 0
        for d in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(self.queue, d)):
                n += len(files)
        return n

    def stop(self, timeout=10):
        subprocess.run(["postfix", "-c", self.etc, "stop"], timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pid in reversed(tree(self.root)):
            kill_pid(pid)
        stop_proc(self.proc, timeout)


# ---- one run -----------------------------------------------------------------------------

def run_once(relay, sink, messages, sessions, size, reuse, rss=False, source=None, dns_root=None,
             client=None):
    """One counted run. `source` replaces smtp-source's sender, recipient and message
    arguments (scenario F: -F FILE, -M HELO, -f, -t); `dns_root` is a DNS server whose CPU per
    message is reported as dns_cpu_ms; `client` replaces smtp-source altogether (A-TLS:
    loadgen send), its JSON line kept as r["client"]."""
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages)]
    cmd += source or ["-l", str(size), "-f", "bench@example.com", "-t", "rcpt@example.net"]
    if reuse:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{relay.port}")
    client_out = None
    if client:
        cmd = client
        client_out = os.path.join(TMP, "client.out")
    settle()
    base = sink.count
    if rss and isinstance(relay, Portcullis):
        with open(f"/proc/{relay.root}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, so the peak is this run's
    peak_sum = 0
    c0 = stack_ticks(relay)
    d0 = cpu_ticks(dns_root) if dns_root else 0
    p0 = proxy_ticks(relay)
    m0 = relay.sample() if hasattr(relay, "sample") else None
    t0 = time.monotonic()
    src = spawn(cmd, stdout=open(client_out, "w") if client_out else subprocess.DEVNULL,
                stderr=open(os.path.join(TMP, "source.err"), "a"))
    deadline = t0 + max(120, messages * size / 5e6, messages / 50)
    while True:
        pid, status, ru = os.wait4(src.pid, os.WNOHANG)
        if pid:
            src.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            src.kill()
            raise RuntimeError(f"smtp-source timed out: {' '.join(cmd)}")
        if rss:
            peak_sum = max(peak_sum, sum(pss_kb(p) for p in tree(relay.root)))
        time.sleep(0.05 if rss else 0.2)
    got, t_last = sink.wait_for(base + messages)
    time.sleep(0.3)  # let the relay finish bookkeeping for the last message before reading CPU
    c1 = stack_ticks(relay)
    d1 = cpu_ticks(dns_root) if dns_root else 0
    p1 = proxy_ticks(relay)
    m1 = relay.sample() if m0 is not None else None
    delivered = got - base
    if src.returncode != 0:
        log(f"warning: {os.path.basename(cmd[0])} exited {src.returncode} ({relay.name})")
    if delivered < messages:
        log(f"warning: {relay.name}: only {delivered} of {messages} messages reached the sink")
    elapsed = t_last - t0
    r = {
        "relay": relay.name,
        "sent": messages,
        "delivered": delivered,
        "elapsed": elapsed,
        "msgs": delivered / elapsed if elapsed > 0 else 0.0,
        "mbs": delivered * size / 1e6 / elapsed if elapsed > 0 else 0.0,
        "cpu_ms": (c1 - c0) * 1000 / CLK_TCK / max(delivered, 1),
        "gen_cpu_ms": (ru.ru_utime + ru.ru_stime) * 1000 / max(messages, 1),
        "dns_cpu_ms": (d1 - d0) * 1000 / CLK_TCK / max(delivered, 1),
        "proxy_cpu_ms": (p1 - p0) * 1000 / CLK_TCK / max(delivered, 1),
    }
    if m0 is not None:
        r.update(relay.per_message(m0, m1, delivered))
    if client_out:
        with open(client_out) as f:
            lines = f.read().strip().splitlines()
        r["client"] = json.loads(lines[-1]) if lines else {}
    if rss:
        r["rss_mb"] = (status_kb(relay.root, "VmHWM") / 1024 if isinstance(relay, Portcullis)
                       else peak_sum / 1024)
    log(f"{relay.name}: {delivered} msgs in {elapsed:.2f}s = {r['msgs']:.0f} msg/s, "
        f"{r['cpu_ms']:.2f} ms CPU/msg (generator {r['gen_cpu_ms']:.2f})"
        + (f", RSS {r['rss_mb']:.0f} MB" if rss else ""))
    return r


def scenario(title, relays, sink, messages, sessions, size, reuse, warmup, rss=False, **kw):
    log(f"== {title}")
    for relay in relays:
        if warmup:
            log(f"warm-up {relay.name} ({warmup} messages)")
            run_once(relay, sink, warmup, sessions, size, reuse, rss, **kw)
    results = {r.name: [] for r in relays}
    for i in range(RUNS):  # alternate A B A B so drift hits both alike
        for relay in relays:
            results[relay.name].append(run_once(relay, sink, messages, sessions, size, reuse, rss, **kw))
    return title, results


def fmt(values, spec):
    med = statistics.median(values)
    return f"{med:{spec}} ({min(values):{spec}}–{max(values):{spec}})"


def median_ratio(res, key, name="portcullis"):
    """`name`'s median of `key` over Postfix's, as "N.NN×" ("" unless both ran)."""
    if "postfix" not in res or name not in res:
        return ""
    return "%.2f×" % (statistics.median(r[key] for r in res[name]) /
                      statistics.median(r[key] for r in res["postfix"]))


def table_a(rows):
    out = ["| scenario | relay | end-to-end msg/s median (range) | relay CPU ms/msg | "
           "smtp-source CPU ms/msg | ratio portcullis/Postfix msg/s |",
           "|---|---|---|---|---|---|"]
    for title, res in rows:
        for name, rs in res.items():
            ratio = median_ratio(res, "msgs", name) if name != "postfix" else ""
            out.append(f"| {title} | {name} | {fmt([r['msgs'] for r in rs], '.0f')} | "
                       f"{fmt([r['cpu_ms'] for r in rs], '.2f')} | "
                       f"{statistics.median(r['gen_cpu_ms'] for r in rs):.2f} | "
                       f"{ratio} |")
    return out


def table_b(rows):
    out = ["| scenario | relay | MB/s median (range) | msg/s | peak RSS MB median (range) | "
           "relay CPU ms/msg | ratio portcullis/Postfix MB/s |", "|---|---|---|---|---|---|---|"]
    for title, res in rows:
        ratio = median_ratio(res, "mbs")
        for name, rs in res.items():
            out.append(f"| {title} | {name} | {fmt([r['mbs'] for r in rs], '.0f')} | "
                       f"{statistics.median(r['msgs'] for r in rs):.1f} | "
                       f"{fmt([r['rss_mb'] for r in rs], '.0f')} | "
                       f"{fmt([r['cpu_ms'] for r in rs], '.1f')} | "
                       f"{ratio if name == 'portcullis' else ''} |")
    return out


def wait_drained(relays, timeout=STALL_S):
    """Wait until no relay holds a message in its queue, so nothing is in flight when the sink
    on their upstream port is swapped (a refused delivery would mark the destination down)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {r.name: r.queued() for r in relays}
        if not any(left.values()):
            return
        if time.monotonic() > deadline:
            log(f"warning: still queued after {timeout:.0f} s: {left}")
            return
        time.sleep(0.2)


def latency_c(relays, sink, rate, seconds):
    """Scenario C: open-loop load at a fixed rate (loadgen openloop); p50/p99 of accept->250
    and of accept->arrived-at-sink. For the second figure loadgen is itself the relays'
    upstream: smtp-sink is stopped for the scenario and loadgen's sink binds its port."""
    log(f"== C open loop at {rate:.0f} msg/s for {seconds:.0f} s")
    results = {r.name: [] for r in relays}
    wait_drained(relays)
    sink.stop()
    try:
        for i in range(RUNS):
            for relay in relays:
                settle()
                try:
                    r = loadgen(["openloop", "--target", f"127.0.0.1:{relay.port}", "--rate",
                                 str(rate), "--seconds", str(seconds), "--sink",
                                 f"127.0.0.1:{sink.port}"], timeout=seconds + 180)
                finally:
                    sink_gone()  # loadgen's sink ended with it
                log(f"{relay.name}: {r}")
                if r["arrived"] < r["ok"]:
                    log(f"warning: {relay.name}: {r['ok'] - r['arrived']} accepted messages did not "
                        "reach the sink in time")
                    wait_drained(relays)
                results[relay.name].append(r)
    finally:
        sink.start()
    out = [f"Scenario C: open loop (loadgen), a new connection every 1/{rate:.0f} s for "
           f"{seconds:.0f} s, {RUNS} runs per relay, alternating; latency from the scheduled start "
           "to the 250 after the final dot, and to the final dot's arrival at the sink "
           "(loadgen's own sink, the relays' upstream).", "",
           "| scenario | relay | accept→250 p50 ms | accept→250 p99 ms | accept→sink p50 ms | "
           "accept→sink p99 ms | failed | not arrived | ratio p99 portcullis/Postfix (250; sink) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        ratio = ""
        if name == "portcullis" and "postfix" in results:
            pf = results["postfix"]
            ratio = "%.2f×; %.2f×" % (
                statistics.median(r["p99_ms"] for r in rs) / statistics.median(r["p99_ms"] for r in pf),
                statistics.median(r["sink_p99_ms"] for r in rs) /
                statistics.median(r["sink_p99_ms"] for r in pf))
        out.append(f"| C {rate:.0f} msg/s open loop | {name} | "
                   f"{fmt([r['p50_ms'] for r in rs], '.1f')} | {fmt([r['p99_ms'] for r in rs], '.1f')} | "
                   f"{fmt([r['sink_p50_ms'] for r in rs], '.1f')} | "
                   f"{fmt([r['sink_p99_ms'] for r in rs], '.1f')} | "
                   f"{sum(r['failed'] for r in rs)} | {sum(r['ok'] - r['arrived'] for r in rs)} | {ratio} |")
    return out


def active_run(relay, sink, rate, seconds):
    """Scenario D's active load: loadgen openloop through the relay to smtp-sink, drained."""
    settle()
    base = sink.count
    r = loadgen(["openloop", "--target", f"127.0.0.1:{relay.port}", "--rate", str(rate),
                 "--seconds", str(seconds)], timeout=seconds + 180)
    got, _ = sink.wait_for(base + r["ok"])
    if got - base < r["ok"]:
        log(f"warning: {relay.name}: only {got - base} of {r['ok']} messages reached the sink")
    log(f"{relay.name}: {r}")
    return r


def hold_idle(port, count):
    """Start loadgen idle against `port`; return (process, its JSON line) once all are open.
    The sessions are held until close_idle()."""
    p = spawn([LOADGEN, "idle", "--target", f"127.0.0.1:{port}", "--count", str(count)],
              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
              stderr=open(os.path.join(TMP, "loadgen.err"), "a"))
    try:
        return p, read_json_line(p, 120 + count / 50, "loadgen idle")
    except Exception:
        stop_proc(p)
        raise


def close_idle(p):
    p.stdin.close()  # loadgen idle closes its sessions and exits at EOF
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        stop_proc(p)


def postfix_session_size(pf):
    """Postfix runs one smtpd process per session: hold a few idle sessions after EHLO, find
    the smtpd processes whose sockets are those sessions, and return the median of their
    (Pss, Rss, USS) in kB, and how many were found."""
    p, info = hold_idle(pf.port, POSTFIX_IDLE_SESSIONS)
    try:
        time.sleep(1)
        inodes = established_inodes(pf.port)
        sizes = []
        for pid in tree(pf.root):
            if comm(pid) == "smtpd" and socket_inodes(pid) & inodes:
                m = smaps_kb(pid)
                sizes.append((m.get("Pss", 0), m.get("Rss", 0),
                              m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)))
    finally:
        close_idle(p)
    if not sizes:
        raise RuntimeError(f"no smtpd process found serving the idle sessions ({info})")
    return tuple(statistics.median(s[i] for s in sizes) for i in range(3)), len(sizes)


def scenario_d(pc, pf, sink, rate, seconds, count):
    """Scenario D (portcullis; Postfix only for its per-session process size): RUNS active runs
    at `rate` without idle sessions, then `count` sessions opened and held idle after EHLO, RSS
    growth per idle session, and RUNS active runs while they are held."""
    log(f"== D {count} idle sessions, active load {rate:.0f} msg/s for {seconds:.0f} s")
    base = [active_run(pc, sink, rate, seconds) for _ in range(RUNS)]
    time.sleep(2)
    rss0 = status_kb(pc.root, "VmRSS")
    fds0 = open_fds(pc.root)
    idle, info = hold_idle(pc.port, count)
    try:
        log(f"idle: {info}")
        time.sleep(D_IDLE_SETTLE_S)
        rss1 = status_kb(pc.root, "VmRSS")
        fds1 = open_fds(pc.root)
        loaded = [active_run(pc, sink, rate, seconds) for _ in range(RUNS)]
        rss2 = status_kb(pc.root, "VmRSS")
        fds2 = open_fds(pc.root)
    finally:
        close_idle(idle)
    time.sleep(2)
    opened = info["opened"]
    log(f"portcullis VmRSS {rss0} kB before, {rss1} kB with {opened} idle, {rss2} kB after "
        f"the active runs, {status_kb(pc.root, 'VmRSS')} kB after closing them; open fds "
        f"{fds0} / {fds1} / {fds2}")
    if fds2 - fds0 < opened:
        log(f"warning: portcullis holds {fds2 - fds0} more fds than before the idle sessions, "
            f"fewer than the {opened} opened: it closed some during the active runs")
    per_kb = (rss1 - rss0) / opened if opened else float("nan")
    p99 = lambda rs: statistics.median(r["p99_ms"] for r in rs)
    out = [f"Scenario D: {count} sessions opened (loadgen idle) and held idle after EHLO; "
           f"{RUNS} loadgen openloop runs of {seconds:.0f} s at {rate:.0f} msg/s (half of "
           "portcullis's scenario A median, new connections, unless BENCH_D_RATE) before, and "
           f"{RUNS} while they are held. RSS is VmRSS of the portcullis process before and "
           f"{D_IDLE_SETTLE_S:.0f} s after the idle sessions opened; after the loaded runs "
           f"portcullis still held {fds2 - fds0} more fds than before them.", "",
           "| relay | idle sessions opened | refused | RSS before → with idle MB | "
           "KB per idle session | active p99 ms without idle | with idle | "
           "ratio p99 with/without | active p50 ms without / with | active failed |",
           "|---|---|---|---|---|---|---|---|---|---|",
           f"| portcullis | {opened} | {info['refused']} | {rss0 / 1024:.1f} → {rss1 / 1024:.1f} | "
           f"{per_kb:.1f} | {fmt([r['p99_ms'] for r in base], '.1f')} | "
           f"{fmt([r['p99_ms'] for r in loaded], '.1f')} | {p99(loaded) / p99(base):.2f}× | "
           f"{statistics.median(r['p50_ms'] for r in base):.1f} / "
           f"{statistics.median(r['p50_ms'] for r in loaded):.1f} | "
           f"{sum(r['failed'] for r in base)} / {sum(r['failed'] for r in loaded)} |"]
    if pf is not None:
        (pss, rss, uss), n = postfix_session_size(pf)
        out.append(f"| postfix: one smtpd process per session | | | | {pss:.0f} Pss, {rss:.0f} RSS, "
                   f"{uss:.0f} private (median of {n} idle smtpd) | | | | | |")
    return out


def scenario_e(pc, seconds, conns):
    """Scenario E: STARTTLS handshakes per second (loadgen tls), portcullis's STARTTLS listener
    against loadgen tls-server (bare tokio-rustls, same certificate and rustls settings)."""
    log(f"== E STARTTLS handshakes, {conns} clients, {seconds:.0f} s per run")
    port = free_port()
    srv = spawn([LOADGEN, "tls-server", "--listen", f"127.0.0.1:{port}", "--cert", pc.cert,
                 "--key", pc.key], stdout=subprocess.PIPE,
                stderr=open(os.path.join(TMP, "loadgen.err"), "a"))
    targets = [("portcullis", pc.tls_port), ("bare tokio-rustls", port)]
    results = {name: [] for name, _ in targets}
    try:
        wait_port(port, proc=srv)

        def once(name, target, secs):
            time.sleep(SETTLE_S)
            r = loadgen(["tls", "--target", f"127.0.0.1:{target}", "--conns", str(conns),
                         "--seconds", str(secs), "--cert", pc.cert], timeout=secs + 120)
            log(f"{name}: {r}")
            return r

        for name, target in targets:
            log(f"warm-up {name}")
            once(name, target, max(1.0, seconds / 3))
        for i in range(RUNS):
            for name, target in targets:
                results[name].append(once(name, target, seconds))
    finally:
        srv.terminate()
        try:
            srv_out = read_json_line(srv, 10, "loadgen tls-server")
            log(f"tls-server: {srv_out}")
        except Exception as e:
            log(f"tls-server: {e}")
        stop_proc(srv)
    neg = next((r["negotiated"] for rs in results.values() for r in rs if r.get("negotiated")), {})
    pc_med = statistics.median(r["per_sec"] for r in results["portcullis"])
    bare_med = statistics.median(r["per_sec"] for r in results["bare tokio-rustls"])
    return [f"Scenario E: STARTTLS (banner, EHLO, STARTTLS, full handshake without resumption, "
            f"QUIT over TLS, 221) from {conns} concurrent loadgen tls clients, {seconds:.0f} s per run, "
            f"{RUNS} runs each after a warm-up, alternating; ECDSA P-256 certificate from "
            f"`portcullis gen-cert`; negotiated {neg.get('version')} {neg.get('suite')} "
            f"{neg.get('kx')}.", "",
            "| scenario | server | handshakes/s median (range) | failed | ratio portcullis/bare |",
            "|---|---|---|---|---|"] + [
        f"| E STARTTLS, {conns} clients | {name} | {fmt([r['per_sec'] for r in rs], '.0f')} | "
        f"{sum(r['failed'] for r in rs)} | "
        f"{'%.2f×' % (pc_med / bare_med) if name == 'portcullis' else ''} |"
        for name, rs in results.items()]


def strace_pass(relay, sink, messages):
    """Attach strace to the running relay (all processes and threads) for one short pass of
    scenario A, and return the fsync-family calls per message."""
    out = os.path.join(TMP, f"strace-{relay.name}.txt")
    cmd = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,sync_file_range,syncfs", "-o", out]
    for pid in tree(relay.root):
        cmd += ["-p", str(pid)]
    st = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # attach
    r = run_once(relay, sink, messages, 20, SMALL, False)
    time.sleep(0.5)
    st.send_signal(signal.SIGINT)
    st.wait(30)
    counts = {}
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync", "sync_file_range", "syncfs"):
                counts[parts[-1]] = int(parts[3])
    per = {k: v / max(r["delivered"], 1) for k, v in counts.items()}
    log(f"strace {relay.name}: {counts} over {r['delivered']} messages")
    return relay.name, r["delivered"], counts, per


# ---- Backlog: a queue built up during an outage (issue 19) ----------------------------------

# Both relays wait this long before their second attempt of a deferred message (portcullis
# `[queue] retry`, Postfix `minimal_backoff_time`), so that between the first attempt of the
# backlog and `queue retry --all` / `postqueue -f` neither relay retries anything on its own:
# the restarts and listings are measured on a queue that sits still, as in the middle of a long
# outage. Postfix also keeps a dead destination dead this long (its throttle lasts
# minimal_backoff_time), portcullis keeps its circuit breaker open up to 16 × 30 s.
BACKLOG_RETRY_S = 3600
# How long the relay's peak RSS is watched after the cold restart: until the drain starts.
# Postfix's tree is sampled this often (each sample reads /proc of every process).
PSS_SAMPLE_S = 0.25
# The second client starts once the sink has counted this many of the backlog (the drain is
# under way, not just asked for).
BACKLOG_NEW_AFTER = 1000


def backlog_portcullis_config(cfg):
    """The bench policy with a first retry an hour away (BACKLOG_RETRY_S)."""
    cfg, n = re.subn(r"(?m)^retry = .*$", f'retry = ["{BACKLOG_RETRY_S}s"]', cfg)
    if n != 1:
        raise RuntimeError("bench/portcullis.toml: expected one `retry =` line in [queue]")
    return cfg


def backlog_relay(kind, sink, run):
    """A fresh relay of `kind` ("portcullis" or "postfix") with its own empty queue. Postfix
    logs to a file (maillog_file, through postlogd, as every instance here does), which tells
    when each new message was delivered."""
    if kind == "portcullis":
        return Portcullis(sink.port, name=f"portcullis-backlog-{run}",
                          edit_config=backlog_portcullis_config)
    name = f"postfix-backlog-{run}"
    return Postfix(sink.port, name=name,
                   main_extra=f"minimal_backoff_time = {BACKLOG_RETRY_S}s\n")


def relay_log(relay):
    """The file the relay logs to now: portcullis's output, Postfix's maillog_file."""
    return relay.log_path if isinstance(relay, Portcullis) else os.path.join(relay.dir, "maillog")


def log_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


PC_QUEUED = re.compile(r"^(\S+)Z .*: queued queue_id=(\w+)")
PC_FINISHED = re.compile(r"^(\S+)Z .*: removed from queue: finished queue_id=(\w+)")
PF_NEW_SENT = re.compile(r"to=<new@example\.net>,.* delay=([0-9.]+),.* status=sent")


def log_epoch(stamp):
    """A portcullis log timestamp (RFC 3339, UTC, without the Z) in Unix seconds."""
    at = datetime.datetime.strptime(stamp[:26], "%Y-%m-%dT%H:%M:%S.%f")
    return at.replace(tzinfo=datetime.timezone.utc).timestamp()


def new_mail_delays(relay, offset):
    """Seconds from acceptance to delivery of each message sent to new@example.net, from the
    relay's log after byte `offset`: portcullis's "queued" and "removed from queue: finished"
    lines of the same queue id (every message queued after `offset` is new mail), Postfix's
    `delay=` of its status=sent lines to that recipient."""
    with open(relay_log(relay), errors="replace") as f:
        f.seek(offset)
        lines = f.readlines()
    if not isinstance(relay, Portcullis):
        return [float(m.group(1)) for m in map(PF_NEW_SENT.search, lines) if m]
    queued, delays = {}, []
    for line in lines:
        m = PC_QUEUED.match(line)
        if m:
            queued[m.group(2)] = log_epoch(m.group(1))
            continue
        m = PC_FINISHED.match(line)
        if m and m.group(2) in queued:
            delays.append(log_epoch(m.group(1)) - queued[m.group(2)])
    return delays


def wait_for_quiet_machine():
    """Wait (at most BENCH_LOAD_WAIT seconds) until the 1-minute load average is at most
    BENCH_MAX_LOAD, when set: other jobs on the two cores. Returns the load average then."""
    if MAX_LOAD > 0:
        deadline = time.monotonic() + LOAD_WAIT_S
        while os.getloadavg()[0] > MAX_LOAD and time.monotonic() < deadline:
            time.sleep(5)
        if os.getloadavg()[0] > MAX_LOAD:
            log(f"warning: load average {os.getloadavg()[0]:.2f} still above {MAX_LOAD} "
                f"after {LOAD_WAIT_S:.0f} s; going on")
    return os.getloadavg()[0]


def machine_busy_ticks():
    """CPU time the whole machine has been busy (all CPUs: user, nice, system, irq, softirq,
    steal), in clock ticks, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


class OtherCpu:
    """The CPU the rest of the machine used over a stretch of time, as a share of all its
    cores: the machine's busy time less that of this script's process tree (the relays,
    clients, sink and commands it started, reaped ones included). That is other jobs on the
    shared cores, and kernel threads (writeback among them, partly on the relays' behalf)."""

    def __init__(self):
        self.t0, self.busy0, self.ours0 = time.monotonic(), machine_busy_ticks(), cpu_ticks(os.getpid())

    def share(self):
        wall = time.monotonic() - self.t0
        others = (machine_busy_ticks() - self.busy0) - (cpu_ticks(os.getpid()) - self.ours0)
        return max(others, 0) / CLK_TCK / (wall * (os.cpu_count() or 1))


def smtp_source(port, messages, sessions, rcpt):
    """smtp-source with 1 KB messages to `rcpt`, a new connection per message, run to its end:
    its wall time in seconds (every message accepted by then, or it fails)."""
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(SMALL),
           "-f", "bench@example.com", "-t", rcpt, f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    src = spawn(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(TMP, "source.err"), "a"))
    try:
        rc = src.wait(timeout=max(120, messages / 50))
    except subprocess.TimeoutExpired:
        src.kill()
        src.wait(5)
        raise RuntimeError(f"smtp-source timed out: {' '.join(cmd)}")
    if rc != 0:
        raise RuntimeError(f"smtp-source exited {rc} (see {TMP}/source.err): {' '.join(cmd)}")
    return time.monotonic() - t0


def new_mail(relay, sink, messages):
    """The second client of the backlog scenario on a relay whose upstream is up: 10 sessions,
    `messages` to new@example.net. Returns its accepted msg/s and waits until the sink has
    them all."""
    base = sink.count
    wall = smtp_source(relay.port, messages, 10, "new@example.net")
    got, _ = sink.wait_for(base + messages)
    if got - base < messages:
        raise RuntimeError(f"{relay.name}: only {got - base} of {messages} new messages arrived")
    return messages / wall


def attempted(relay):
    """Messages the relay has attempted and deferred: portcullis's state files in queue/ (one
    per message after its first attempt), or the files in Postfix's deferred queue."""
    if isinstance(relay, Portcullis):
        return sum(1 for n in os.listdir(os.path.join(relay.dir, "spool", "queue"))
                   if n.endswith(".state"))
    return sum(len(files) for _, _, files in os.walk(os.path.join(relay.queue, "deferred")))


def wait_attempted(relay, n, stall=60.0):
    """Wait until the relay has attempted all `n` messages; fails when the count stops moving."""
    last, moved = -1, time.monotonic()
    while True:
        k = attempted(relay)
        now = time.monotonic()
        if k >= n:
            return now
        if k != last:
            last, moved = k, now
        elif now - moved > stall:
            raise RuntimeError(f"{relay.name}: {k} of {n} messages attempted, no progress in {stall:.0f} s")
        time.sleep(0.5)


def alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return False
    return s[s.rindex(")") + 2] != "Z"


def wait_gone(pids, timeout=60.0):
    """Wait until none of `pids` is alive (a stopped relay's whole process tree)."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes still alive {timeout:.0f} s after the stop: "
                               f"{[p for p in pids if alive(p)]}")
        time.sleep(0.05)


def first_220(port, t0, proc, timeout=300.0):
    """Seconds from `t0` (time.monotonic()) until a connection to `port` is greeted with a 220
    line: connect every 5 ms until one is accepted, then wait for its first line."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before its first 220")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(timeout)
                line = s.makefile("rb").readline()
                t = time.monotonic()
                if line.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return t - t0
                log(f"greeting on port {port}: {line!r}; trying again")
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"no 220 on 127.0.0.1:{port} within {timeout:.0f} s of the start")
        time.sleep(0.005)


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")


def portcullis_recovery(path, started, timeout=600.0):
    """Wait for portcullis's log lines "spool recovered; loading the queue for delivery" and
    "delivery scheduler started" in the log at `path`; return the seconds from `started`
    (time.time() at the start) to each, by their own timestamps, and the recovery's `secs=`
    field."""
    want = {"recovered": "spool recovered; loading the queue for delivery",
            "loaded": "delivery scheduler started"}
    found = {}
    deadline = time.monotonic() + timeout
    with open(path) as f:
        while not all(key in found for key in want):
            line = f.readline()
            if not line.endswith("\n"):  # nothing new yet, or half a line: read it again
                f.seek(f.tell() - len(line))
                if time.monotonic() > deadline:
                    missing = [want[k] for k in want if k not in found]
                    raise RuntimeError(f"{path}: no line {missing} within {timeout:.0f} s")
                time.sleep(0.05)
                continue
            for key, text in want.items():
                if text in line and key not in found:
                    found[key] = log_epoch(LOG_TIME.match(line).group(1)) - started
                    secs = re.search(r"\bsecs=([0-9.]+)", line)
                    if secs:
                        found["recovered_secs"] = float(secs.group(1))
    return found


class PeakRss:
    """A relay's peak RSS over a stretch of time, in MB. portcullis: VmHWM of its process
    (since its start, or since this object when `reset`: clear_refs). Postfix: the largest sum
    of Pss over its process tree, sampled every PSS_SAMPLE_S by a thread (Pss splits shared
    pages among the processes that map them, so they are not counted once per process)."""

    def __init__(self, relay, reset):
        self.relay, self.peak_kb = relay, 0
        self.done = threading.Event()
        if isinstance(relay, Portcullis):
            if reset:
                with open(f"/proc/{relay.root}/clear_refs", "w") as f:
                    f.write("5")
            self.thread = None
        else:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self):
        while not self.done.is_set():
            self.peak_kb = max(self.peak_kb, sum(pss_kb(p) for p in tree(self.relay.root)))
            self.done.wait(PSS_SAMPLE_S)

    def stop(self):
        if self.thread is None:
            return status_kb(self.relay.root, "VmHWM") / 1024
        self.done.set()
        self.thread.join(10)
        return self.peak_kb / 1024


def restart(relay, cold):
    """Stop the relay (SIGTERM; for Postfix `postfix stop`, then SIGTERM to what is left) and
    start it again, after dropping the page cache if `cold`. Returns the seconds the stop took,
    from the start to the first 220 and, for portcullis, to its recovery log lines, and a
    PeakRss that runs from this start (portcullis) or from the first 220 (Postfix)."""
    old = tree(relay.root)
    t = time.monotonic()
    relay.stop(timeout=120)
    wait_gone(old)
    r = {"stop_s": time.monotonic() - t}
    if cold:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    which = "cold" if cold else "warm"
    started, t0 = time.time(), time.monotonic()
    relay.launch(f"log.{which}")
    r[f"{which}_220"] = first_220(relay.port, t0, relay.proc)
    if isinstance(relay, Portcullis):
        rec = portcullis_recovery(relay.log_path, started)
        r[f"{which}_recovered"] = rec["recovered"]
        r[f"{which}_recovered_secs"] = rec.get("recovered_secs")
        r[f"{which}_loaded"] = rec["loaded"]
    else:
        relay.find_master()
    log(f"{relay.name}: {which} restart: {r}")
    return r, PeakRss(relay, reset=False)


def timed_command(cmd, cwd=None):
    """Run `cmd` to its end, its stdout read into memory as a pipe reader would: (wall s,
    CPU s, peak RSS MB, stdout)."""
    t0 = time.monotonic()
    p = spawn(cmd, cwd=cwd, stdout=subprocess.PIPE,
              stderr=open(os.path.join(TMP, "commands.err"), "a"))
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: p.stdout.read(1 << 20), b"")))
    reader.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    p.stdout.close()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode} (see {TMP}/commands.err)")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, b"".join(chunks)


# The first line of each entry of `postqueue -p`: queue id (with * when active, ! when held),
# size, arrival time, sender.
POSTQUEUE_ENTRY = re.compile(rb"(?m)^[0-9A-Za-z]{6,}[*!]?\s+\d+\s")


def list_queue(relay, json_out=False):
    """List the queue once: portcullis `queue list [--json] --config CFG` (its lines: a header
    and one per message, or one JSON object per message), Postfix `postqueue -c DIR -p` (its
    entries). Returns (wall s, CPU s, peak RSS MB of the command, messages listed). The CPU is
    the command's plus the relay's during it: postqueue only copies what Postfix's showq
    daemon reads from the queue (portcullis's relay has no part in a listing)."""
    c0 = cpu_ticks(relay.root)
    if isinstance(relay, Portcullis):
        cmd = [relay.binary, "queue", "list", "--config", relay.config]
        wall, cpu, rss, out = timed_command(cmd + (["--json"] if json_out else []), cwd=relay.dir)
        lines = out.count(b"\n")
        count = lines if json_out else lines - 1
    else:
        wall, cpu, rss, out = timed_command(["postqueue", "-c", relay.etc, "-p"])
        count = len(POSTQUEUE_ENTRY.findall(out))
    return wall, cpu + (cpu_ticks(relay.root) - c0) / CLK_TCK, rss, count


def listing(relay, n, json_out=False):
    """One untimed listing (so the cache is warm), then three timed: the medians of wall, CPU
    and peak RSS. Fails if a listing did not show the `n` messages."""
    runs = [list_queue(relay, json_out) for _ in range(4)][1:]
    for wall, _, _, count in runs:
        if count != n:
            raise RuntimeError(f"{relay.name}: the listing shows {count} messages, not {n}")
    return tuple(statistics.median(r[i] for r in runs) for i in range(3))


def drain(relay, sink, n, new):
    """Start the sink, ask the relay to deliver its backlog now (portcullis `queue retry --all`,
    Postfix `postqueue -f`) and time it from the command to an empty queue with every message at
    the sink. Once the sink has counted BACKLOG_NEW_AFTER of the backlog, `new` new messages
    are sent meanwhile (10 sessions, to new@example.net): their accepted msg/s, and from the
    relay's log how long each waited from its acceptance to its delivery."""
    sink.start()  # its count starts again from 0
    offset = log_size(relay_log(relay))
    peak = PeakRss(relay, reset=True)
    others = OtherCpu()
    c0 = cpu_ticks(relay.root)
    t0 = time.monotonic()
    if isinstance(relay, Portcullis):
        cmd, cwd = [relay.binary, "queue", "retry", "--all", "--config", relay.config], relay.dir
    else:
        cmd, cwd = ["postqueue", "-c", relay.etc, "-f"], None
    command_s, command_cpu, _, _ = timed_command(cmd, cwd)
    second = {}

    def client():
        try:
            with sink.cv:
                second["waited"] = sink.cv.wait_for(
                    lambda: sink.count >= min(BACKLOG_NEW_AFTER, n // 10), timeout=STALL_S * 4)
            second["start"] = time.monotonic()
            second["wall"] = smtp_source(relay.port, new, 10, "new@example.net")
            second["end"] = time.monotonic()
        except Exception as e:  # reported after the drain
            second["error"] = e

    th = threading.Thread(target=client, daemon=True)
    th.start()
    got, t_sink = sink.wait_for(n + new)
    t_end = t_sink  # unless the queue is found empty only later
    while relay.queued() and time.monotonic() - t_sink < STALL_S:
        time.sleep(0.05)
        t_end = time.monotonic()
    left = relay.queued()
    c1 = cpu_ticks(relay.root)
    others_share = others.share()
    th.join(STALL_S)
    if "error" in second:
        raise second["error"]
    if got < n + new or left:
        raise RuntimeError(f"{relay.name}: drain incomplete: {got} of {n} + {new} at the sink, "
                           f"{left} still queued")
    elapsed = t_end - t0
    delays = sorted(new_mail_delays(relay, offset))
    if len(delays) != new:
        log(f"warning: {relay.name}: the log shows {len(delays)} of the {new} new messages delivered")
    r = {"retry_cmd_s": command_s, "drain_s": elapsed, "drain_rate": n / elapsed,
         "drain_cpu_ms": ((c1 - c0) / CLK_TCK + command_cpu) * 1000 / (n + new),
         "rss_drain": peak.stop(), "others_drain": 100 * others_share,
         "new_drain": new / second["wall"], "new_at": second["start"] - t0,
         "new_end": second["end"] - t0,
         # The second client measured the relay while it drained only if it started once the
         # drain had (the sink counting the backlog) and ended before the last message arrived.
         "new_in_drain": bool(second.get("waited")) and second["end"] < t_sink,
         "new_delay_p50": statistics.median(delays) if delays else None,
         "new_delay_max": delays[-1] if delays else None}
    log(f"{relay.name}: drain {r}")
    return r


def backlog_run(kind, sink, n, new, run):
    """One pass of the Backlog scenario for one relay, on a fresh instance: the second client's
    rate on the idle relay; the upstream down (smtp-sink stopped); `n` messages queued through
    smtp-source (20 sessions, a new connection per message) and attempted once; a warm and a cold
    restart; the listings; the drain with the second client sending meanwhile."""
    relay = backlog_relay(kind, sink, run)
    r = {"relay": kind}
    try:
        settle()
        r["load"] = wait_for_quiet_machine()
        others = OtherCpu()
        r["new_idle"] = new_mail(relay, sink, new)
        wait_drained([relay])
        sink.stop()
        settle()
        t0 = time.monotonic()
        wall = smtp_source(relay.port, n, 20, "rcpt@example.net")
        r["fill_rate"] = n / wall
        r["attempted_s"] = wait_attempted(relay, n) - t0
        log(f"{relay.name}: {n} queued at {r['fill_rate']:.0f} msg/s, all attempted after "
            f"{r['attempted_s']:.1f} s")
        warm, peak = restart(relay, cold=False)
        peak.stop()
        cold, peak = restart(relay, cold=True)
        r.update(warm)
        r.update(cold)
        r["stop_s"] = warm["stop_s"]
        r["list_s"], r["list_cpu"], rss = listing(relay, n)
        if isinstance(relay, Portcullis):  # postqueue's own RSS says nothing (showq does the work)
            r["list_rss"] = rss
            r["json_s"], r["json_cpu"], r["json_rss"] = listing(relay, n, json_out=True)
        r["rss_restart"] = peak.stop()
        r.update(drain(relay, sink, n, new))
        r["new_ratio"] = r["new_drain"] / r["new_idle"]
        r["others_pass"] = 100 * others.share()
        return r
    finally:
        if sink.proc.poll() is not None:
            sink.start()
        try:
            relay.stop(timeout=120)
        finally:
            shutil.rmtree(relay.dir, ignore_errors=True)


# The rows of the Backlog tables: (label, key, format, whether the ratio portcullis/Postfix
# means something); a key missing for a relay is "—".
BACKLOG_ROWS = [
    ("load average (1 min) at the start", "load", ".2f", False),
    ("CPU used outside the benchmark during the pass, % of all cores", "others_pass", ".0f", False),
    ("… during the drain", "others_drain", ".0f", False),
    ("queued during the outage: smtp-source accept rate, msg/s", "fill_rate", ".0f", True),
    ("… every message attempted once, s after the first", "attempted_s", ".1f", True),
    ("stop (SIGTERM to exited), s", "stop_s", ".2f", True),
    ("start → first 220, warm cache, s", "warm_220", ".3f", True),
    ("start → \"spool recovered\", warm, s", "warm_recovered", ".2f", True),
    ("… its `secs=`, warm", "warm_recovered_secs", ".2f", True),
    ("start → \"delivery scheduler started\", warm, s", "warm_loaded", ".2f", True),
    ("start → first 220, cold cache, s", "cold_220", ".3f", True),
    ("start → \"spool recovered\", cold, s", "cold_recovered", ".2f", True),
    ("… its `secs=`, cold", "cold_recovered_secs", ".2f", True),
    ("start → \"delivery scheduler started\", cold, s", "cold_loaded", ".2f", True),
    ("peak RSS from the cold start to the drain, MB", "rss_restart", ".0f", True),
    ("list the queue (`queue list` / `postqueue -p`), s", "list_s", ".2f", True),
    ("… its CPU (with the relay's during it: showq), s", "list_cpu", ".2f", True),
    ("… its peak RSS, MB", "list_rss", ".0f", True),
    ("`queue list --json`, s", "json_s", ".2f", True),
    ("… its peak RSS, MB", "json_rss", ".0f", True),
    ("`queue retry --all` / `postqueue -f` returned after, s", "retry_cmd_s", ".3f", False),
    ("drain: command → queue empty, every message at the sink, s", "drain_s", ".1f", True),
    ("drain rate (backlog ÷ drain time), msg/s", "drain_rate", ".0f", True),
    ("relay CPU during the drain ÷ messages delivered (backlog + new), ms", "drain_cpu_ms", ".2f", True),
    ("peak RSS during the drain, MB", "rss_drain", ".0f", True),
    ("new mail on the idle relay, msg/s", "new_idle", ".0f", True),
    ("new mail during the drain, msg/s", "new_drain", ".0f", True),
    ("… during ÷ idle", "new_ratio", ".2f", True),
    ("… started, s after the drain command", "new_at", ".1f", False),
    ("… ended (smtp-source exited), s after the drain command", "new_end", ".1f", False),
    ("… from its acceptance to its delivery, median, s", "new_delay_p50", ".2f", True),
    ("… the same, longest, s", "new_delay_max", ".2f", True),
]


def backlog_table(per_relay, cell):
    """One Markdown table, both relays side by side: `per_relay` maps a relay to its list of
    results, `cell` formats a list of values. The ratio is of the medians."""
    out = ["| figure | portcullis | Postfix | portcullis/Postfix |", "|---|---:|---:|---:|"]
    for label, key, spec, ratio_means in BACKLOG_ROWS:
        vals = {k: [r[key] for r in rs if r.get(key) is not None] for k, rs in per_relay.items()}
        cells = [cell(vals.get(k, []), spec) for k in ("portcullis", "postfix")]
        ratio = ""
        if ratio_means and vals.get("portcullis") and vals.get("postfix"):
            pf = statistics.median(vals["postfix"])
            if pf:
                ratio = "%.2f×" % (statistics.median(vals["portcullis"]) / pf)
        out.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
    return out


def backlog_goals(res):
    """The goals of issue 19, on the medians: (goal, measured, met)."""
    med = lambda k, rel="portcullis": statistics.median(r[k] for r in res[rel])
    out = [("start → first 220 ≤ 2 s, warm cache", f"{med('warm_220'):.3f} s", med("warm_220") <= 2),
           ("start → first 220 ≤ 2 s, cold cache", f"{med('cold_220'):.3f} s", med("cold_220") <= 2),
           ("`queue list` ≤ 1 s", f"{med('list_s'):.3f} s", med("list_s") <= 1),
           ("new mail during the drain ≥ 50 % of the idle rate",
            f"{100 * med('new_ratio'):.0f} %",
            med("new_ratio") >= 0.5 if all(r.get("new_in_drain") for r in res["portcullis"])
            else "not measured (the new mail did not fall inside the drain)")]
    if res.get("postfix"):
        ratio = med("drain_rate") / med("drain_rate", "postfix")
        out.insert(3, ("drain ≥ 2× Postfix's rate",
                       f"{ratio:.2f}× ({med('drain_rate'):.0f} vs "
                       f"{med('drain_rate', 'postfix'):.0f} msg/s)", ratio >= 2))
    else:  # a ratio against another run's Postfix is not this run's to judge
        out.insert(3, ("drain ≥ 2× Postfix's rate", "Postfix not run", "not measured"))
    return out


def scenario_backlog(sink, n, runs, new, relays=("portcullis", "postfix")):
    """The Backlog scenario: `runs` passes per relay, alternating which relay goes first."""
    log(f"== Backlog: {n} messages queued during an outage, {runs} runs per relay")
    res = {k: [] for k in relays}
    lines = [f"Backlog (issue 19): {n} messages of 1 KB queued by smtp-source (20 sessions, a new "
             "connection per message) while nothing listens on the upstream port, each attempted "
             "once; the relay restarted with a warm, then a cold page cache; the queue listed; "
             f"then the sink started and the drain asked for, while a second smtp-source (10 "
             f"sessions, {new} messages) sends new mail. Second attempt an hour away on both "
             f"relays. {runs} runs per relay, alternating the order; a fresh instance each.", ""]
    for i in range(runs):
        order = list(relays) if i % 2 == 0 else list(reversed(relays))
        for kind in order:
            res[kind].append(backlog_run(kind, sink, n, new, i + 1))
        lines += [f"Run {i + 1} ({', then '.join(order)}):", ""] + backlog_table(
            {k: [res[k][-1]] for k in relays}, lambda v, spec: f"{v[0]:{spec}}" if v else "—")
        lines.append("")
        print("\n".join(lines[-len(BACKLOG_ROWS) - 5:]), file=sys.stderr, flush=True)
    lines += [f"Backlog, median (range) of {runs} runs:", ""]
    lines += backlog_table(res, lambda v, spec: (fmt(v, spec) if len(v) > 1 else f"{v[0]:{spec}}")
                           if v else "—")
    lines += ["", "| goal (issue 19) | measured (median) | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {ok if isinstance(ok, str) else 'yes' if ok else 'no'} |"
              for g, m, ok in backlog_goals(res)]
    return lines


# ---- A-TLS: scenario A with STARTTLS on both hops (issue 19) -------------------------------

# The names in the benchmark's certificate: the relays present it (both, the same one), and so
# does the sink; each client verifies it against the run's own CA for the name it expects.
RELAY_TLS_NAME = "bench.portcullis.test"
SINK_TLS_NAME = "sink.bench.test"
# Messages sent through a fresh instance before its A-TLS latency run (not counted).
ATLS_LATENCY_WARMUP = 200


class BenchCA:
    """A CA made with openssl for this run, and one ECDSA P-256 server certificate it signed
    for RELAY_TLS_NAME and SINK_TLS_NAME: both relays and the sink present it."""

    def __init__(self):
        self.dir = os.path.join(TMP, "atls-ca")
        os.makedirs(self.dir, exist_ok=True)
        self.ca, self.cert, self.key = (os.path.join(self.dir, n) for n in ("ca.pem", "cert.pem", "key.pem"))
        ca_key, csr, ext = (os.path.join(self.dir, n) for n in ("ca.key", "cert.csr", "cert.ext"))
        with open(ext, "w") as f:
            f.write(f"subjectAltName = DNS:{RELAY_TLS_NAME}, DNS:{SINK_TLS_NAME}\n"
                    "basicConstraints = critical, CA:FALSE\n"
                    "keyUsage = critical, digitalSignature\n"
                    "extendedKeyUsage = serverAuth\n")
        for cmd in (
                ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", ca_key],
                ["req", "-x509", "-new", "-key", ca_key, "-sha256", "-days", "2",
                 "-subj", "/CN=portcullis bench CA", "-out", self.ca],
                ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", self.key],
                ["req", "-new", "-key", self.key, "-subj", f"/CN={RELAY_TLS_NAME}", "-out", csr],
                ["x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", ca_key, "-CAcreateserial",
                 "-days", "2", "-sha256", "-extfile", ext, "-out", self.cert]):
            subprocess.run(["openssl", *cmd], check=True, timeout=60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.chmod(self.key, 0o600)


class TlsSink(Sink):
    """The one upstream of A-TLS for both relays: `loadgen sink` offering STARTTLS with the
    bench certificate (smtp-sink has no TLS). It prints smtp-sink's `mesg=N` field, so the
    Sink machinery counts it alike, and `tls=M`, the messages that came over TLS."""

    def __init__(self, port, ca):
        self.ca = ca
        super().__init__(port)

    def start(self, dump=None):
        self.count = 0
        self.tail = b""
        self.t_last = time.monotonic()
        self.proc = spawn([LOADGEN, "sink", "--listen", f"127.0.0.1:{self.port}",
                           "--cert", self.ca.cert, "--key", self.ca.key],
                          stdout=subprocess.PIPE, stderr=open(os.path.join(TMP, "loadgen.err"), "a"))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_port(self.port, proc=self.proc)

    def field(self, name):
        """A counter of the sink's last line: "tls" (messages received over TLS so far),
        "sessions" (connections accepted)."""
        m = re.findall(rb"\b" + name.encode() + rb"=(\d+)", self.tail)
        return int(m[-1]) if m else 0


def atls_portcullis_config(ca):
    """The bench policy for A-TLS: the bench certificate; the STARTTLS listener requires TLS
    (MAIL before it → 530); the upstream requires STARTTLS and verifies the sink's certificate
    against the bench CA for SINK_TLS_NAME."""
    def edit(cfg):
        edits = [('cert = "./tls/cert.pem"', f'cert = "{ca.cert}"'),
                 ('key = "./tls/key.pem"', f'key = "{ca.key}"'),
                 ('name = "bench-tls"\n', 'name = "bench-tls"\nrequire_tls = true\n'),
                 ('tls = "none"\nmax_connections = 20\n',
                  f'tls = "required"\nca = "{ca.ca}"\ntls_name = "{SINK_TLS_NAME}"\n'
                  'max_connections = 20\n')]
        for old, new in edits:
            if cfg.count(old) != 1:
                raise RuntimeError(f"bench/portcullis.toml: expected one {old.strip()!r}")
            cfg = cfg.replace(old, new)
        return cfg
    return edit


def atls_relay(kind, ca, sink, run):
    """A fresh relay of `kind` set up for A-TLS; `atls_port` is where its STARTTLS is."""
    if kind == "portcullis":
        relay = Portcullis(sink.port, name=f"portcullis-atls-{run}", edit_config=atls_portcullis_config(ca))
        relay.atls_port = relay.tls_port
        return relay
    name = f"postfix-atls-{run}"
    data = os.path.join(TMP, name, "data")
    relay = Postfix(sink.port, name=name, main_extra=f"""smtpd_tls_cert_file = {ca.cert}
smtpd_tls_key_file = {ca.key}
smtpd_tls_security_level = may
smtpd_tls_session_cache_database = btree:{data}/smtpd_scache
smtp_tls_security_level = verify
smtp_tls_CAfile = {ca.ca}
smtp_tls_verify_cert_match = {SINK_TLS_NAME}
smtp_tls_session_cache_database = btree:{data}/smtp_scache
smtp_tls_connection_reuse = yes
""", master_extra="tlsproxy  unix  -       -       n       -       0       tlsproxy\n")
    relay.atls_port = relay.port
    return relay


def atls_send(relay, ca, messages):
    """loadgen send: 20 sessions, a new connection per 1 KB message, STARTTLS in each."""
    return [LOADGEN, "send", "--target", f"127.0.0.1:{relay.atls_port}", "--sessions", "20",
            "--messages", str(messages), "--ca", ca.ca, "--name", RELAY_TLS_NAME]


def drop_relay(relay):
    try:
        relay.stop(timeout=60)
    finally:
        shutil.rmtree(relay.dir, ignore_errors=True)


def atls_throughput(ca, sink, kind, run, messages, warmup):
    """One A-TLS pass on a fresh instance: a warm-up, then a counted run with peak RSS."""
    relay = atls_relay(kind, ca, sink, run)
    try:
        if warmup:
            log(f"warm-up {relay.name} ({warmup} messages)")
            run_once(relay, sink, warmup, 20, SMALL, False, client=atls_send(relay, ca, warmup))
        tls0, conns0 = sink.field("tls"), sink.field("sessions")
        r = run_once(relay, sink, messages, 20, SMALL, False, rss=True,
                     client=atls_send(relay, ca, messages))
        r["relay"] = kind
        r["upstream_tls"] = sink.field("tls") - tls0
        r["upstream_conns"] = sink.field("sessions") - conns0
        c = r.get("client", {})
        log(f"{relay.name}: client {c}; {r['upstream_tls']} of {r['delivered']} over TLS upstream, "
            f"{r['upstream_conns']} new connections to the sink")
        return r
    finally:
        drop_relay(relay)


def atls_latency(ca, sink, kind, run, rate, seconds):
    """One open-loop A-TLS run at `rate` on a fresh instance (after a short warm-up)."""
    relay = atls_relay(kind, ca, sink, run)
    try:
        base = sink.count
        loadgen(atls_send(relay, ca, ATLS_LATENCY_WARMUP)[1:], timeout=120)
        sink.wait_for(base + ATLS_LATENCY_WARMUP)
        settle()
        base = sink.count
        r = loadgen(["openloop", "--target", f"127.0.0.1:{relay.atls_port}", "--rate", str(rate),
                     "--seconds", str(seconds), "--ca", ca.ca, "--name", RELAY_TLS_NAME],
                    timeout=seconds + 180)
        got, _ = sink.wait_for(base + r["ok"])
        r["relay"] = kind
        r["arrived"] = got - base
        log(f"{relay.name}: {r}")
        return r
    finally:
        drop_relay(relay)


def scenario_atls(ca, sink, messages, runs, warmup, seconds, plain=None):
    """A-TLS: `runs` throughput passes per relay and `runs` open-loop passes at half of
    Postfix's A-TLS median (or BENCH_ATLS_RATE), alternating which relay goes first, a fresh
    instance for each pass. `plain` is scenario A (plaintext) of the same run, for its ratio.
    Returns (report lines, short deliveries)."""
    kinds = ("portcullis", "postfix")
    log(f"== A-TLS: {messages} messages per counted run, {runs} runs per relay")
    res = {k: [] for k in kinds}
    for i in range(runs):
        for kind in (kinds if i % 2 == 0 else kinds[::-1]):
            res[kind].append(atls_throughput(ca, sink, kind, i + 1, messages, warmup))
    med = lambda k, rel: statistics.median(r[k] for r in res[rel])
    c = lambda r: r.get("client", {})
    resumed = lambda rs: 100 * sum(c(r).get("tls_resumed", 0) for r in rs) / max(
        sum(c(r).get("tls_resumed", 0) + c(r).get("tls_full", 0) for r in rs), 1)
    neg = {k: next((c(r)["negotiated"] for r in rs if c(r).get("negotiated")), {}) for k, rs in res.items()}
    ratio = med("msgs", "portcullis") / med("msgs", "postfix")
    lines = [f"A-TLS: scenario A (1 KB, 20 sessions, a new connection per message) with STARTTLS "
             f"from the client (loadgen send, one rustls session store for the run, so sessions "
             f"resume) and STARTTLS to the upstream (loadgen sink, verified against the run's "
             f"own CA on both relays); ECDSA P-256 certificate, the same for both relays and "
             f"the sink. {messages} messages per counted run after a {warmup}-message warm-up, "
             f"{runs} runs per relay alternating which goes first, a fresh instance each. Peak "
             "RSS: VmHWM of portcullis; for Postfix the largest sum of Pss over its processes, "
             "sampled every 50 ms.", "",
             "| relay | msg/s median (range) | relay CPU ms/msg | peak RSS MB | loadgen CPU ms/msg | "
             "client handshakes resumed | over TLS to the sink | new connections to the sink | "
             "negotiated (client leg) | ratio portcullis/Postfix msg/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, rs in res.items():
        n = neg.get(k) or {}
        lines.append(f"| {k} | {fmt([r['msgs'] for r in rs], '.0f')} | "
                     f"{fmt([r['cpu_ms'] for r in rs], '.2f')} | {fmt([r['rss_mb'] for r in rs], '.0f')} | "
                     f"{statistics.median(r['gen_cpu_ms'] for r in rs):.2f} | {resumed(rs):.0f} % | "
                     f"{sum(r['upstream_tls'] for r in rs)} of {sum(r['delivered'] for r in rs)} | "
                     f"{sum(r['upstream_conns'] for r in rs)} | {n.get('version')} {n.get('kx')} | {'%.2f×' % ratio if k == 'portcullis' else ''} |")
    lines += ["", f"Relay CPU per message, portcullis/Postfix: "
              f"{med('cpu_ms', 'portcullis') / med('cpu_ms', 'postfix'):.2f}×."]
    goals = []
    if plain and "postfix" in plain and "portcullis" in plain:
        p_ratio = (statistics.median(r["msgs"] for r in plain["portcullis"]) /
                   statistics.median(r["msgs"] for r in plain["postfix"]))
        lines.append(f"Plaintext scenario A of the same run (smtp-source, new connection per "
                     f"message): portcullis/Postfix {p_ratio:.2f}×.")
        goals.append(("A-TLS msg/s ratio ≥ the plaintext A ratio of the same run",
                      f"{ratio:.2f}× vs {p_ratio:.2f}×", ratio >= p_ratio))
    lat = {k: [] for k in kinds}
    rate = 0
    if seconds > 0:
        rate = ATLS_RATE or 0.5 * med("msgs", "postfix")
        why = "BENCH_ATLS_RATE" if ATLS_RATE else "half of Postfix's A-TLS median"
        log(f"== A-TLS open loop at {rate:.0f} msg/s for {seconds:.0f} s")
        for i in range(runs):
            for kind in (kinds if i % 2 == 0 else kinds[::-1]):
                lat[kind].append(atls_latency(ca, sink, kind, i + 1, rate, seconds))
        p99 = {k: statistics.median(r["p99_ms"] for r in rs) for k, rs in lat.items()}
        lines += ["", f"A-TLS open loop (loadgen openloop with STARTTLS): a new connection every "
                  f"1/{rate:.0f} s ({why}) "
                  f"for {seconds:.0f} s, {runs} runs per relay alternating, a fresh instance each "
                  f"after {ATLS_LATENCY_WARMUP} messages; latency from the scheduled start to the "
                  "250 after the final dot.", "",
                  "| relay | accept→250 p50 ms | accept→250 p99 ms | max ms | failed | not arrived | "
                  "resumed | ratio p99 portcullis/Postfix |", "|---|---|---|---|---|---|---|---|"]
        for k, rs in lat.items():
            lines.append(f"| {k} | {fmt([r['p50_ms'] for r in rs], '.1f')} | "
                         f"{fmt([r['p99_ms'] for r in rs], '.1f')} | "
                         f"{max(r['max_ms'] or 0 for r in rs):.0f} | {sum(r['failed'] for r in rs)} | "
                         f"{sum(r['ok'] - r['arrived'] for r in rs)} | {resumed([{'client': r} for r in rs]):.0f} % | "
                         f"{'%.2f×' % (p99['portcullis'] / p99['postfix']) if k == 'portcullis' else ''} |")
        goals.append(("A-TLS accept→250 p99 at half of Postfix's capacity ≤ ½ of Postfix's",
                      f"{p99['portcullis']:.1f} vs {p99['postfix']:.1f} ms "
                      f"({p99['portcullis'] / p99['postfix']:.2f}×)", p99["portcullis"] <= 0.5 * p99["postfix"]))
    if goals:
        lines += ["", "| goal (issue 19) | measured (medians) | met |", "|---|---|---|"]
        lines += [f"| {g} | {m} | {'yes' if ok else 'no'} |" for g, m, ok in goals]
    short = [f"A-TLS {r['relay']} delivered {r['delivered']} of {r['sent']}"
             for rs in res.values() for r in rs if r["delivered"] < r["sent"]]
    short += [f"A-TLS {r['relay']}: {r['delivered'] - r['upstream_tls']} delivered without TLS"
              for rs in res.values() for r in rs if r["upstream_tls"] < r["delivered"]]
    short += [f"A-TLS open loop {r['relay']}: {r['failed']} failed, {r['ok'] - r['arrived']} not arrived"
              for rs in lat.values() for r in rs if r["failed"] or r["arrived"] < r["ok"]]
    return lines, short


def main_atls():
    """--atls: plaintext scenario A (unless BENCH_ATLS_PLAIN=0), then A-TLS."""
    started = time.monotonic()
    ca = BenchCA()
    lines, short, plain = [], [], None
    if ATLS_PLAIN:
        sink = Sink(free_port())
        relays = []
        try:
            relays = [Portcullis(sink.port), Postfix(sink.port)]
            a = [scenario("A 1 KB, 20 sessions, new connection per message", relays, sink,
                          ATLS_MESSAGES, 20, SMALL, False, WARMUP)]
            plain = a[0][1]
            lines += [f"Scenario A (plaintext, for the ratio): {ATLS_MESSAGES} messages per counted "
                      f"run, {RUNS} counted runs per relay after a {WARMUP}-message warm-up, "
                      "alternating.", ""] + table_a(a) + [""]
            short += short_runs([(None, plain)])
        finally:
            stop_all(relays, sink)
    tls_sink = TlsSink(free_port(), ca)
    try:
        a_lines, a_short = scenario_atls(ca, tls_sink, ATLS_MESSAGES, RUNS, ATLS_WARMUP,
                                         ATLS_SECONDS, plain)
    finally:
        tls_sink.stop()
    publish(lines + a_lines, started)
    fail_if_short(short + a_short)


# ---- scenario F: SPF + DKIM + DMARC verification (issue 14) --------------------------------

# SPF, DKIM key and DMARC p=reject, all served by nsd. Not under "test.": Debian's opendkim
# resolves with libunbound, whose built-in local zones answer NXDOMAIN for "test." (RFC 6761).
SENDER_DOMAIN = "sender.example"
SELECTOR = "bench"
HELO_NAME = f"helo.{SENDER_DOMAIN}"
F_SENDER = f"bench@{SENDER_DOMAIN}"
F_RCPT = "rcpt@example.net"        # an accepted (relay) domain of both relays, routed to the sink
AUTHSERV_PORTCULLIS = "bench.portcullis.test"
AUTHSERV_POSTFIX = "bench-postfix.localdomain"
# The load generator connects from 127.0.0.1; both relays trust only this other address, so
# the client is a stranger to both and every check applies.
TRUSTED_NET = "127.0.0.2/32"
# TTL of every record: portcullis caches answers within it; the milters query nsd each time.
ZONE_TTL = 3600
DKIM_SIGN_PY = r'''
import sys, dkim
key, msg_in, msg_out, sel, dom = sys.argv[1:6]
msg = open(msg_in, "rb").read()
hdrs = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type"]
sig = dkim.sign(msg, sel.encode(), dom.encode(), open(key, "rb").read(), include_headers=hdrs,
                canonicalize=(b"relaxed", b"relaxed"))
open(msg_out, "wb").write(sig + msg)
'''


def resolv_is_loopback():
    """True when /etc/resolv.conf names 127.0.0.1 as its only nameserver: the milters and
    policyd-spf use it, and a query for the test zones must never leave the machine."""
    with open("/etc/resolv.conf") as f:
        ns = [l.split()[1] for l in f if l.split()[:1] == ["nameserver"] and len(l.split()) > 1]
    return ns == ["127.0.0.1"]


def dns_query_ok(name, port=53, qtype=6, timeout=1.0):
    """One UDP query to 127.0.0.1:port; True when the answer is authoritative with NOERROR."""
    q = b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    q += qtype.to_bytes(2, "big") + b"\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(q, ("127.0.0.1", port))
            r = s.recv(4096)
        except OSError:
            return False
    return len(r) >= 4 and r[:2] == b"\x12\x34" and r[2] & 0x04 and (r[3] & 0x0F) == 0


def txt_strings(value, n=200):
    """A TXT value as quoted strings of at most `n` bytes (one string holds at most 255)."""
    return " ".join(f'"{value[i:i + n]}"' for i in range(0, len(value), n))


class AuthStack:
    """What scenario F shares: the DKIM key, the signed message, nsd on 127.0.0.1:53."""

    def __init__(self):
        self.dir = os.path.join(TMP, "auth")
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)  # policyd-spf runs as nobody and reads its config here
        self.key = os.path.join(self.dir, "dkim.pem")
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                        "rsa_keygen_bits:2048", "-out", self.key], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pub = subprocess.run(["openssl", "pkey", "-in", self.key, "-pubout", "-outform", "DER"],
                             check=True, timeout=30, capture_output=True).stdout
        import base64
        self.pub_b64 = base64.b64encode(pub).decode()
        self.message = self.sign_template()
        self.nsd = self.start_nsd()

    def sign_template(self):
        """Sign a ~1 KB message once with dkimpy (Debian's python3-dkim, rsa-sha256,
        relaxed/relaxed); returns the path of its LF form for smtp-source -F, which sends each
        line with CRLF, i.e. exactly the signed bytes."""
        body = "".join(f"Line {i:02d} of the scenario F message, the same bytes for both relays.\r\n"
                       for i in range(9))
        msg = (f"From: Bench Sender <{F_SENDER}>\r\nTo: <{F_RCPT}>\r\n"
               "Subject: scenario F\r\nDate: Tue, 01 Dec 2026 00:00:00 +0000\r\n"
               f"Message-ID: <scenario-f@{SENDER_DOMAIN}>\r\nMIME-Version: 1.0\r\n"
               "Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body)
        raw, signed = os.path.join(self.dir, "message.eml"), os.path.join(self.dir, "signed.eml")
        with open(raw, "w", newline="") as f:
            f.write(msg)
        # Debian's module is importable only from the system interpreter.
        subprocess.run(["/usr/bin/python3", "-c", DKIM_SIGN_PY, self.key, raw, signed, SELECTOR,
                        SENDER_DOMAIN], check=True, timeout=60)
        with open(signed, "rb") as f:
            data = f.read()
        self.size = len(data)
        out = os.path.join(self.dir, "signed.lf")
        with open(out, "wb") as f:
            f.write(data.replace(b"\r\n", b"\n"))
        return out

    def start_nsd(self):
        soa = f"@ IN SOA ns1.{SENDER_DOMAIN}. hostmaster.{SENDER_DOMAIN}. 1 3600 600 86400 300\n@ IN NS ns1.{SENDER_DOMAIN}.\n"
        zones = {
            SENDER_DOMAIN: soa + "ns1 IN A 127.0.0.1\n"
            '@ IN TXT "v=spf1 ip4:127.0.0.1 -all"\n'
            f"helo IN A 127.0.0.1\n"
            'helo IN TXT "v=spf1 a -all"\n'
            "client IN A 127.0.0.1\n"
            f"{SELECTOR}._domainkey IN TXT ( {txt_strings('v=DKIM1; k=rsa; p=' + self.pub_b64)} )\n"
            '_dmarc IN TXT "v=DMARC1; p=reject"\n',
            # iprev of the client: 127.0.0.1 → client.SENDER_DOMAIN → 127.0.0.1
            "0.0.127.in-addr.arpa": soa + f"1 IN PTR client.{SENDER_DOMAIN}.\n",
            # The parent zone too, so that a lookup above the sender's domain (DMARC's
            # organizational domain) gets NXDOMAIN, not nsd's REFUSED for a zone it lacks.
            "example": f"@ IN SOA ns1.{SENDER_DOMAIN}. hostmaster.{SENDER_DOMAIN}. 1 3600 600 86400 300\n"
                       f"@ IN NS ns1.{SENDER_DOMAIN}.\n",
        }
        conf = [f"""server:
    ip-address: 127.0.0.1
    port: 53
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{self.dir}"
    database: ""
    pidfile: "{self.dir}/nsd.pid"
    zonelistfile: "{self.dir}/zone.list"
    xfrdfile: "{self.dir}/xfrd.state"
    xfrdir: "{self.dir}"
    logfile: "{self.dir}/nsd.log"
    verbosity: 1
    server-count: 1
remote-control:
    control-enable: no
"""]
        for name, body in zones.items():
            with open(os.path.join(self.dir, f"{name}.zone"), "w") as f:
                f.write(f"$ORIGIN {name}.\n$TTL {ZONE_TTL}\n{body}")
            conf.append(f'zone:\n    name: "{name}"\n    zonefile: "{name}.zone"\n')
        path = os.path.join(self.dir, "nsd.conf")
        with open(path, "w") as f:
            f.write("".join(conf))
        subprocess.run(["nsd-checkconf", path], check=True, timeout=30)
        if dns_query_ok(SENDER_DOMAIN):
            raise RuntimeError(f"something already answers for {SENDER_DOMAIN} on 127.0.0.1:53")
        p = spawn(["nsd", "-d", "-c", path], stdout=subprocess.DEVNULL,
                  stderr=open(os.path.join(self.dir, "nsd.err"), "w"))
        deadline = time.monotonic() + 30
        while not dns_query_ok(SENDER_DOMAIN):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nsd did not serve {SENDER_DOMAIN} on 127.0.0.1:53 "
                                   f"(see {self.dir}/nsd.err, nsd.log)")
            time.sleep(0.1)
        return p

    def source_args(self):
        return ["-F", self.message, "-M", HELO_NAME, "-f", F_SENDER, "-t", F_RCPT]

    def stop(self):
        stop_proc(self.nsd)


def portcullis_auth_config(cfg):
    """The bench policy with verification on and 127.0.0.1 a stranger (mail for example.net
    accepted as an MX would, routed to the sink by the default route)."""
    cfg = cfg.replace('relay_networks = ["127.0.0.0/8"]',
                      f'relay_networks = ["{TRUSTED_NET}"]     # the load generator is a stranger\n'
                      'accepted_domains = ["example.net"]')
    cfg = cfg.replace('spool_dir = "./spool"',
                      f'spool_dir = "./spool"\nauthserv_id = "{AUTHSERV_PORTCULLIS}"')
    return cfg + """
[dns]
nameservers = ["127.0.0.1:53"]
timeout = "5s"

[spf]
verify = "record"

[dkim]
verify = "record"

[dmarc]
verify = "enforce"
"""


def start_milters(d):
    """OpenDKIM (verifying) and OpenDMARC as inet milters on loopback; returns their
    processes and the smtpd_milters value. Debian's opendkim resolves with libunbound, which
    ignores /etc/resolv.conf and would recurse from the root servers: `Nameservers` sends its
    queries to nsd. (Its `ResolverConfiguration`, an unbound.conf, is read again for each
    message from concurrent threads, and libunbound's parser then crashed opendkim here.)"""
    with open(os.path.join(d, "internal"), "w") as f:
        f.write("127.0.0.2\n")  # neither milter treats the load generator as one of ours
    dkim_port, dmarc_port = free_port(), free_port()
    with open(os.path.join(d, "opendkim.conf"), "w") as f:
        f.write(f"""Mode v
Socket inet:{dkim_port}@127.0.0.1
PidFile {d}/opendkim.pid
Syslog no
Background no
AuthservID {AUTHSERV_POSTFIX}
InternalHosts {d}/internal
UMask 022
Nameservers 127.0.0.1
""")
    with open(os.path.join(d, "opendmarc.conf"), "w") as f:
        f.write(f"""Socket inet:{dmarc_port}@127.0.0.1
PidFile {d}/opendmarc.pid
Syslog false
Background false
AuthservID {AUTHSERV_POSTFIX}
TrustedAuthservIDs {AUTHSERV_POSTFIX}
IgnoreHosts {d}/internal
IgnoreAuthenticatedClients true
RejectFailures true
SPFIgnoreResults false
SPFSelfValidate false
""")
    dkim = spawn(["opendkim", "-f", "-x", os.path.join(d, "opendkim.conf")],
                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "opendkim.err"), "w"))
    dmarc = spawn(["opendmarc", "-f", "-c", os.path.join(d, "opendmarc.conf")],
                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "opendmarc.err"), "w"))
    for p, port in ((dkim, dkim_port), (dmarc, dmarc_port)):
        deadline = time.monotonic() + 30
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited ({p.returncode}): see {d}/{p.args[0]}.err")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{p.args[0]} does not listen on 127.0.0.1:{port}")
                time.sleep(0.1)
    return [dkim, dmarc], f"inet:127.0.0.1:{dkim_port}, inet:127.0.0.1:{dmarc_port}"


def postfix_auth(sink_port):
    """Postfix with the usual companions: policyd-spf (spawned by master, checked at RCPT
    before any permit), OpenDKIM then OpenDMARC as milters; mynetworks leaves 127.0.0.1 out."""
    d = os.path.join(TMP, "postfix-auth-milters")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    spf_conf = os.path.join(d, "policyd-spf.conf")
    with open(spf_conf, "w") as f:
        # HELO is not checked (portcullis checks it only for a null reverse-path);
        # skip_addresses would otherwise exempt 127.0.0.0/8, our client.
        f.write("debugLevel = 0\nTestOnly = 1\nHELO_reject = No_Check\nMail_From_reject = Fail\n"
                "PermError_reject = False\nTempError_Defer = False\nskip_addresses = 127.0.0.2/32\n")
    os.chmod(spf_conf, 0o644)
    milters, smtpd_milters = start_milters(d)
    main = f"""mynetworks = {TRUSTED_NET}
relay_domains = example.net
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = check_policy_service unix:private/policyd-spf, permit
policyd-spf_time_limit = 3600
smtpd_milters = {smtpd_milters}
non_smtpd_milters =
milter_default_action = tempfail
"""
    master = ("policyd-spf unix - n n - 0 spawn\n"
              f"  user=nobody argv=/usr/bin/policyd-spf {spf_conf}\n")
    try:
        return Postfix(sink_port, "postfix-auth", main, master, [m.pid for m in milters]), milters
    except Exception:
        for m in milters:
            stop_proc(m)
        raise


def header_fields(msg):
    """The unfolded header fields of a dumped message, as (name lower-case, value)."""
    head = msg.split(b"\n\n", 1)[0].decode("utf-8", "replace").replace("\r", "")
    fields = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + " " + line.strip())
        elif ":" in line:
            k, v = line.split(":", 1)
            fields.append((k.strip().lower(), v.strip()))
    return fields


def check_auth_results(relays, stack, port):
    """Send one signed message through each relay to a dumping sink and require spf=pass,
    dkim=pass and dmarc=pass in the header fields the relay added (Postfix: policyd-spf's Received-SPF,
    OpenDKIM's and OpenDMARC's Authentication-Results). Returns {relay: [result fields]}."""
    dump = os.path.join(stack.dir, "dump")
    os.makedirs(dump, exist_ok=True)
    os.chmod(dump, 0o777)
    sink = Sink(port, dump)
    seen = {}
    try:
        for relay in relays:
            before = set(os.listdir(dump))
            subprocess.run(["smtp-source", "-m", "1", *stack.source_args(), f"127.0.0.1:{relay.port}"],
                           check=True, timeout=60)
            got, _ = sink.wait_for(sink.count + 1, stall=20)
            new = sorted(set(os.listdir(dump)) - before)
            if not new:
                raise RuntimeError(f"F check: the message through {relay.name} did not reach the sink")
            time.sleep(0.2)
            with open(os.path.join(dump, new[-1]), "rb") as f:
                fields = header_fields(f.read())
            res = [f"{k}: {v}" for k, v in fields
                   if k in ("authentication-results", "received-spf")]
            text = " ".join(res).lower()
            missing = [w for w in ("spf=pass" if "postfix" not in relay.name else "received-spf: pass",
                                   "dkim=pass", "dmarc=pass") if w not in text]
            log(f"F check {relay.name}: " + " | ".join(res))
            if missing:
                raise RuntimeError(f"F check: {relay.name} did not record {missing}: {res}")
            seen[relay.name] = res
    finally:
        sink.stop()
    return seen


def dkim_sign_cost(key):
    """loadgen dkim-sign: CPU per signature of a 10 KB message through portcullis's own signing,
    RSA-2048 (`key`) and Ed25519 (made here)."""
    ed_key = os.path.join(os.path.dirname(key), "dkim-ed25519.pem")
    subprocess.run(["openssl", "genpkey", "-algorithm", "ED25519", "-out", ed_key], check=True,
                   timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return loadgen(["dkim-sign", "--rsa-key", key, "--ed25519-key", ed_key,
                    "--count", str(SIGN_COUNT)], timeout=600)


def scenario_f():
    """Scenario F: returns the report lines."""
    if not resolv_is_loopback():
        raise RuntimeError("scenario F: /etc/resolv.conf must name only 127.0.0.1 (bench/run "
                           "points it there for the run); refusing to let the milters query elsewhere")
    stack = AuthStack()
    port = free_port()
    relays, milters, sink = [], [], None

    def start_relays():
        if "portcullis" in F_RELAYS:
            relays.append(Portcullis(port, name="portcullis", edit_config=portcullis_auth_config))
        if "postfix" in F_RELAYS:
            pf, ms = postfix_auth(port)
            relays.append(pf)
            milters.extend(ms)
        log("F relays up: " + ", ".join(f"{r.name} on 127.0.0.1:{r.port}" for r in relays))

    def stop_relays():
        for r in relays:
            try:
                r.stop()
            except Exception as e:
                log(f"stopping {r.name}: {e}")
        for m in milters:
            stop_proc(m)
        relays.clear()
        milters.clear()

    try:
        # The check runs against a dumping sink; the relays are then started afresh against
        # the plain one, so no connection they pooled to the first sink is left to fail.
        start_relays()
        seen = check_auth_results(relays, stack, port)
        stop_relays()
        sink = Sink(port)
        start_relays()
        title, res = scenario("F 1 KB DKIM-signed, SPF+DKIM+DMARC, 20 sessions, new connection per message",
                              relays, sink, F_MESSAGES, 20, stack.size, False, F_WARMUP,
                              source=stack.source_args(), dns_root=stack.nsd.pid)
    finally:
        stop_relays()
        if sink is not None:
            stop_proc(sink.proc)
        stack.stop()
    out = [f"Scenario F: scenario A (new connection per message) with SPF, DKIM and DMARC "
           f"verification, {F_MESSAGES} messages per counted run, {RUNS} counted runs per relay after "
           f"a {F_WARMUP}-message warm-up, alternating; the same {stack.size}-byte DKIM-signed "
           "message (rsa-sha256, relaxed/relaxed, dkimpy) from 127.0.0.1, a stranger to both relays; "
           "zones served by nsd on 127.0.0.1:53. Relay CPU: portcullis's process; Postfix's master "
           "tree (smtpd, cleanup, qmgr, smtp, policyd-spf, …) plus opendkim and opendmarc. nsd's CPU "
           "is counted apart.", "",
           "| scenario | relay | end-to-end msg/s median (range) | stack CPU ms/msg | "
           "nsd CPU ms/msg | smtp-source CPU ms/msg | ratio portcullis/Postfix msg/s |",
           "|---|---|---|---|---|---|---|"]
    pf_name = "postfix-auth"
    for name, rs in res.items():
        ratio = ""
        if name == "portcullis" and pf_name in res:
            ratio = "%.2f×" % (statistics.median(r["msgs"] for r in rs) /
                               statistics.median(r["msgs"] for r in res[pf_name]))
        label = ("Postfix + OpenDKIM + OpenDMARC + policyd-spf" if name == pf_name else name)
        out.append(f"| F SPF+DKIM+DMARC | {label} | {fmt([r['msgs'] for r in rs], '.0f')} | "
                   f"{fmt([r['cpu_ms'] for r in rs], '.2f')} | "
                   f"{statistics.median(r['dns_cpu_ms'] for r in rs):.3f} | "
                   f"{statistics.median(r['gen_cpu_ms'] for r in rs):.2f} | {ratio} |")
    for name in ("portcullis", pf_name):
        if name not in res:
            out.append(f"| F SPF+DKIM+DMARC | {name} | not measured (BENCH_F_RELAYS) | | | | |")
    out += ["", "What each relay recorded for one message (checked before the runs):", ""]
    for name, fields in seen.items():
        out += [f"- {name}:"] + [f"  - `{f}`" for f in fields]
    if SIGN_COUNT > 0:
        sc = dkim_sign_cost(stack.key)
        out += ["", f"DKIM signing cost (loadgen dkim-sign, portcullis::dns::sign (mail-auth, aws-lc-rs), relaxed/relaxed, "
                f"one thread, {sc['count']} signatures per key after a warm-up) of a "
                f"{sc['message_bytes']}-byte message:", "",
                "| key | CPU ms per signature | wall ms per signature |", "|---|---|---|",
                f"| RSA-2048 | {sc['rsa2048']['cpu_ms']:.3f} | {sc['rsa2048']['wall_ms']:.3f} |",
                f"| Ed25519 | {sc['ed25519']['cpu_ms']:.3f} | {sc['ed25519']['wall_ms']:.3f} |"]
    short = [f"{r['relay']} delivered {r['delivered']} of {r['sent']}"
             for rs in res.values() for r in rs if r["delivered"] < r["sent"]]
    return out, short


def publish(lines, started):
    """Print the report (with the total wall time since `started`) and write it to $BENCH_OUT."""
    lines += ["", f"Total wall time of the measurements: {time.monotonic() - started:.0f} s."]
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("BENCH_OUT"):
        with open(os.environ["BENCH_OUT"], "w") as f:
            f.write(text + "\n")


def short_runs(scenarios):
    """Each run of `scenarios` ((title, {relay: [run]}) pairs) that lost messages, as a line."""
    return [f"{r['relay']} delivered {r['delivered']} of {r['sent']}"
            for _, res in scenarios for rs in res.values() for r in rs if r["delivered"] < r["sent"]]


def stop_all(procs, sink):
    """Stop each relay (or companion) of `procs`, newest first, logging what fails without
    stopping the others, then the sink."""
    for p in reversed(procs):
        try:
            p.stop()
        except Exception as e:  # keep stopping the others
            log(f"stopping {getattr(p, 'name', p)}: {e}")
    stop_proc(sink.proc)


def fail_if_short(short):
    """A run that lost messages measured nothing: fail (what the CI smoke pass checks)."""
    if short:
        log("FAILED: messages missing at the sink: " + "; ".join(short))
        sys.exit(1)


def main_auth():
    """--auth: scenario F alone."""
    started = time.monotonic()
    lines, short = scenario_f()
    publish(lines, started)
    fail_if_short(short)


def admin_config(port):
    """Edit the bench policy: the admin listener on 127.0.0.1:`port` (the journal is always on)."""
    return lambda cfg: cfg + f'\n[admin]\nbind = "127.0.0.1:{port}"\n'


class Scraper:
    """GETs /metrics and /api/status of a relay's admin listener every SCRAPE_S seconds, as a
    monitoring system would (Prometheus scrapes every 15 s by default: this is harsher)."""

    def __init__(self, port):
        self.port, self.stop_flag, self.scrapes, self.errors = port, threading.Event(), 0, 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def get(self, path):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise OSError(f"{path}: {data[:40]!r}")

    def run(self):
        while not self.stop_flag.wait(SCRAPE_S):
            try:
                self.get("/metrics")
                self.get("/api/status")
                self.scrapes += 1
            except OSError as e:
                self.errors += 1
                log(f"scrape failed: {e}")

    def stop(self):
        self.stop_flag.set()
        self.thread.join()


def a_against_before(relays, sink, scrapers):
    """Scenario A (1 KB, 20 sessions, a new connection per message) over `relays`, alternating
    "portcullis" (this build) and "portcullis-before"; stops `scrapers` when it ends. Returns
    the scenario's rows and each build's relay CPU per message, run by run (ms)."""
    a = [scenario("A 1 KB, 20 sessions, new connection per message", relays, sink,
                  MESSAGES, 20, SMALL, False, WARMUP)]
    for sc in scrapers:
        sc.stop()
    res = a[0][1]
    now, old = ([r["cpu_ms"] for r in res[n]] for n in ("portcullis", "portcullis-before"))
    return a, now, old


def scraped(scrapers):
    """How often `scrapers` scraped, for a report: "scraped every S s (N scrapes, M failed)"."""
    return (f"scraped every {SCRAPE_S:g} s ({sum(sc.scrapes for sc in scrapers)} scrapes, "
            f"{sum(sc.errors for sc in scrapers)} failed)")


def a_report(title, per, setup, a, now, old):
    """The lines of an --observe or --cost report: `title`, what was run (`per` relay or
    build), `setup`, the table, and the change of the median relay CPU per message with its
    change run by run. Returns the lines and that change (a fraction, negative when lower)."""
    change = statistics.median(now) / statistics.median(old) - 1
    pairs = ", ".join(f"{(x / y - 1) * 100:+.0f} %" for x, y in zip(now, old))
    runs = f"{RUNS} counted run{'s' if RUNS != 1 else ''}"
    return [f"{title}: scenario A, {MESSAGES} messages per counted run, {runs} per {per} after "
            f"a {WARMUP}-message warm-up, alternating. {setup}", ""] + table_a(a) + [
            "", f"Relay CPU per message, medians: {statistics.median(now):.3f} against "
            f"{statistics.median(old):.3f} ms = **{change * 100:+.1f} %** (run by run: {pairs})."
            ], change


def main_observe():
    """--observe: scenario A, admin listener scraped and journal on, against the build before."""
    started = time.monotonic()
    before = os.environ.get("BENCH_BEFORE_BIN")
    if not before:
        sys.exit("bench: --observe needs BENCH_BEFORE_BIN (bench/run builds it)")
    sink = Sink(free_port())
    admin_port = free_port()
    relays = []
    scraper = None
    try:
        relays.append(Portcullis(sink.port, name="portcullis", edit_config=admin_config(admin_port)))
        relays.append(Portcullis(sink.port, before, "portcullis-before"))
        scraper = Scraper(admin_port)
        a, now, old = a_against_before(relays, sink, [scraper])
        journal = os.path.join(relays[0].dir, "spool", "journal")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(journal) for f in fs) \
            if os.path.isdir(journal) else 0
        lines, _ = a_report(
            "Observability cost", "relay",
            f"\"portcullis\": admin listener on, /metrics and /api/status {scraped([scraper])}, "
            f"journal on ({size / 1e6:.1f} MB written); \"portcullis-before\": the build "
            "before observability.", a, now, old)
        publish(lines, started)
        fail_if_short(short_runs(a))
    finally:
        if scraper:
            scraper.stop_flag.set()
        stop_all(relays, sink)


def main_cost():
    """--cost: the cost per message (issue 19), scenario A with a new connection per message,
    this build against BENCH_BEFORE_BIN, both as deployed: admin listener on and scraped,
    journal on. Alternating runs; the change of the median relay CPU per message, its change
    run by run (each run against the other build's run beside it), and the goal (-20 %)."""
    started = time.monotonic()
    before = os.environ.get("BENCH_BEFORE_BIN")
    if not before:
        sys.exit("bench: --cost needs BENCH_BEFORE_BIN (the build to compare with)")
    sink = Sink(free_port())
    relays, scrapers = [], []
    try:
        for name, binary in (("portcullis", None), ("portcullis-before", before)):
            port = free_port()
            relays.append(Portcullis(sink.port, binary, name, edit_config=admin_config(port)))
            scrapers.append(Scraper(port))
        a, now, old = a_against_before(relays, sink, scrapers)
        lines, change = a_report(
            "Cost per message", "build",
            f"Both builds with the admin listener on and {scraped(scrapers)} and the journal "
            "on. \"portcullis-before\": BENCH_BEFORE_BIN.", a, now, old)
        lines += ["", "| goal | measured | met |", "|---|---|---|",
                 f"| relay CPU per message at least 20 % below the build before | "
                 f"{change * 100:+.1f} % | {'yes' if change <= -0.20 else 'no'} |"]
        publish(lines, started)
        fail_if_short(short_runs(a))
    finally:
        for sc in scrapers:
            sc.stop_flag.set()
        stop_all(relays, sink)


# ---- --cluster: scale-out (issue 17) ------------------------------------------------------

# The address HAProxy connects to the nodes from (`source`): the nodes' trusted_proxies. The
# load generator and wait_port connect from 127.0.0.1, so each node still serves them directly.
PROXY_SOURCE = "127.0.0.2"
# Every [rate_limits] key, so high that no run is ever refused (smtp-source and loadgen send
# everything from 127.0.0.1): the cost of counting, never of refusing.
NEVER_REFUSE = "1000000000/hour"


def node_config(node, redis_port=None):
    """Edit the bench policy for --cluster: the plain listener trusts PROXY_SOURCE; the node's
    name; with `redis_port`, the four rate limits (NEVER_REFUSE) and, if `redis_port` is not
    0, [cluster] on that Redis."""
    def edit(cfg):
        cfg = cfg.replace('name = "bench"\n',
                          f'name = "bench"\ntrusted_proxies = ["{PROXY_SOURCE}/32"]\n', 1)
        if redis_port is not None:
            cfg += "\n[rate_limits]\n" + "".join(
                f'{k} = "{NEVER_REFUSE}"\n' for k in
                ("connections_per_ip", "messages_per_ip", "messages_per_user", "recipients_per_ip"))
        cfg += f'\n[cluster]\nnode = "{node}"\n'
        if redis_port:
            cfg += f'redis = "redis://127.0.0.1:{redis_port}/0"\n'
        return cfg
    return edit


def http_ok(port, path):
    """Whether GET http://127.0.0.1:PORT/PATH answers 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            return s.recv(64).startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    except OSError:
        return False


class HAProxy:
    """HAProxy in TCP mode in front of `nodes`: round robin, send-proxy-v2, a TCP health check
    (which sends a v2 LOCAL header), option redispatch. As a relay for run_once: its port is the
    frontend, its CPU is the nodes' together, and HAProxy's own CPU is reported apart."""

    def __init__(self, nodes, name):
        self.name, self.nodes = name, nodes
        self.dir = os.path.join(TMP, "haproxy")
        os.makedirs(self.dir, exist_ok=True)
        self.port, monitor = free_port(), free_port()
        servers = "".join(f"    server {n.name} 127.0.0.1:{n.port} send-proxy-v2 check inter 2s\n"
                          for n in nodes)
        cfg = f"""# written by bench/bench.py --cluster
global
    maxconn 8000
    log stderr format raw local0 notice
defaults
    mode tcp
    log global
    option redispatch
    retries 2
    timeout connect 5s
    timeout client 11m
    timeout server 11m
    timeout check 3s
frontend ready
    mode http
    bind 127.0.0.1:{monitor}
    monitor-uri /ready
frontend smtp
    bind 127.0.0.1:{self.port}
    default_backend relays
backend relays
    balance roundrobin
    source {PROXY_SOURCE}
{servers}"""
        self.config = os.path.join(self.dir, "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(cfg)
        subprocess.run(["haproxy", "-c", "-q", "-f", self.config], check=True, timeout=30)
        self.proc = spawn(["haproxy", "-db", "-f", self.config],
                          stdout=open(os.path.join(self.dir, "log"), "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not http_ok(monitor, "/ready"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start (see {self.dir}/log)")
            time.sleep(0.1)
        self.proxy_root = self.proc.pid
        self.root = nodes[0].root
        self.companions = [n.root for n in nodes[1:]]
        wait_port(self.port, proc=self.proc)  # a session through HAProxy: both sides serve

    def stop(self):
        stop_proc(self.proc)


class Direct:
    """One node of an HAProxy pool, used directly (the baseline of the two-node figure)."""

    def __init__(self, node, name):
        self.name, self.port, self.root, self.node = name, node.port, node.root, node

    def stop(self):
        pass


class Redis:
    """redis-server on 127.0.0.1 as docs/deploy-cluster.md sets it up: maxmemory-policy
    noeviction, append-only file fsynced every second, no RDB snapshots."""

    def __init__(self):
        self.dir = os.path.join(TMP, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.proc = spawn(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                           "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                           "--maxmemory", "256mb", "--maxmemory-policy", "noeviction",
                           "--dir", self.dir, "--daemonize", "no",
                           "--logfile", os.path.join(self.dir, "log")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.root = self.proc.pid
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.cli("PING").strip() == "PONG":
                    break
            except subprocess.CalledProcessError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.dir}/log)")
            time.sleep(0.1)

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=60, check=True).stdout

    def commands(self):
        """{command: calls} from INFO commandstats, without INFO (our own reading)."""
        out = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
            if m and m.group(1) != "info":
                out[m.group(1)] = int(m.group(2))
        return out

    def key_sizes(self):
        """{key pattern: (keys, median bytes of MEMORY USAGE)} over every portcullis: key; a
        pattern is the key with each part that holds a digit (an address, a time) as '*'."""
        keys = [k for k in self.cli("--scan", "--pattern", "portcullis:*").splitlines() if k]
        groups = {}
        for k in keys:
            pattern = ":".join("*" if re.search(r"\d", part) else part for part in k.split(":"))
            groups.setdefault(pattern, []).append(int(self.cli("MEMORY", "USAGE", k).strip() or 0))
        return {p: (len(v), statistics.median(v)) for p, v in sorted(groups.items())}

    def stop(self):
        stop_proc(self.proc)


def meter(relay, redis):
    """Make run_once (and cluster_latency) count `redis`'s commands and CPU around each run of
    `relay`: per message, redis_ops (script calls: round trips), redis_cmds_total (every
    command, those run inside the scripts included), redis_cmds ({command: calls}) and
    redis_cpu_ms."""
    relay.sample = lambda: (redis.commands(), cpu_ticks(redis.root))

    def per_message(m0, m1, n):
        n = max(n, 1)
        cmds = {k: (v - m0[0].get(k, 0)) / n for k, v in m1[0].items() if v > m0[0].get(k, 0)}
        # A script call is one round trip; commandstats also counts each command the script
        # runs inside Redis (GET, SET, TIME …), so both are reported.
        calls = sum(v for k, v in cmds.items() if k.startswith(("eval", "fcall")))
        return {"redis_ops": calls, "redis_cmds_total": sum(cmds.values()), "redis_cmds": cmds,
                "redis_cpu_ms": (m1[1] - m0[1]) * 1000 / CLK_TCK / n}
    relay.per_message = per_message


def cluster_latency(relays, sink, rate, seconds):
    """Open-loop runs (loadgen, as scenario D's active load) alternating over `relays`: p50/p99
    of accept->250, and Redis operations per message for a metered relay."""
    log(f"== open loop at {rate:.0f} msg/s for {seconds:.0f} s")
    results = {r.name: [] for r in relays}
    for _ in range(RUNS):
        for relay in relays:
            m0 = relay.sample() if hasattr(relay, "sample") else None
            r = active_run(relay, sink, rate, seconds)
            if m0 is not None:
                r.update(relay.per_message(m0, relay.sample(), r["ok"]))
            results[relay.name].append(r)
    return results


def redis_benchmark(redis, requests=200000):
    """redis-benchmark against the bench's Redis (50 clients): SET, GET, INCR and an EVAL of a
    small counting script on random keys, without pipelining, and the EVAL again with 16
    requests in flight per client (as a node's one multiplexed connection pipelines its
    sessions' operations); requests/s each."""
    base = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(redis.port), "-q", "-n", str(requests),
            "-r", "100000"]
    script = ("local n = redis.call('INCR', KEYS[1]) "
              "if n == 1 then redis.call('PEXPIRE', KEYS[1], 60000) end return n")
    out = []
    evalsha = ["EVAL", script, "1", "portcullis:bench:__rand_int__"]
    for args in (["-t", "set,get,incr"], evalsha, ["-P", "16", *evalsha]):
        text = subprocess.run(base + args, capture_output=True, text=True, timeout=300,
                              check=True).stdout
        for line in re.split(r"[\r\n]+", text):
            m = re.match(r"\s*(.*?):\s*([\d.]+) requests per second", line)
            if m:
                name = "EVAL (INCR + PEXPIRE script)" if "EVAL" in args else m.group(1)
                out.append((name + (f", pipeline {args[1]}" if args[0] == "-P" else ""),
                            float(m.group(2))))
    redis.cli("EVAL", "for _, k in ipairs(redis.call('KEYS', 'portcullis:bench:*')) do "
              "redis.call('DEL', k) end return 0", "0")
    return out


def table_cluster(rows, base):
    """Scenario A rows with the relays' CPU, HAProxy's and Redis's, against relay `base`."""
    out = ["| scenario | path | end-to-end msg/s median (range) | relay CPU ms/msg (all nodes) | "
           "HAProxy CPU ms/msg | Redis scripts/msg (commands in all) | Redis CPU ms/msg | "
           "smtp-source CPU ms/msg | "
           f"msg/s vs {base} |", "|---|---|---|---|---|---|---|---|---|"]
    for title, res in rows:
        ref = statistics.median(r["msgs"] for r in res[base]) if base in res else None
        for name, rs in res.items():
            med = statistics.median(r["msgs"] for r in rs)
            proxy = fmt([r["proxy_cpu_ms"] for r in rs], ".2f") if rs[0]["proxy_cpu_ms"] else ""
            ops = (fmt([r["redis_ops"] for r in rs], ".2f") + " (%.2f)" % statistics.median(
                r["redis_cmds_total"] for r in rs)) if "redis_ops" in rs[0] else ""
            rcpu = fmt([r["redis_cpu_ms"] for r in rs], ".3f") if "redis_ops" in rs[0] else ""
            out.append(f"| {title} | {name} | {fmt([r['msgs'] for r in rs], '.0f')} | "
                       f"{fmt([r['cpu_ms'] for r in rs], '.2f')} | {proxy} | {ops} | {rcpu} | "
                       f"{statistics.median(r['gen_cpu_ms'] for r in rs):.2f} | "
                       f"{'%.2f×' % (med / ref) if ref and name != base else ''} |")
    return out


def commands_line(rs):
    """Redis commands per message, medians over the runs, e.g. "EVALSHA 3.00, …"."""
    names = sorted({k for r in rs for k in r.get("redis_cmds", {})})
    if not names:
        return "none"
    return ", ".join(f"{k.upper()} {statistics.median(r['redis_cmds'].get(k, 0) for r in rs):.2f}"
                     for k in names)


def cluster_haproxy(sink, procs):
    """--cluster, part "haproxy": scenario A through HAProxy to two nodes vs one node direct.
    Returns (report lines, runs)."""
    n1 = Portcullis(sink.port, name="node-1", edit_config=node_config("node-1"))
    procs.append(n1)
    n2 = Portcullis(sink.port, name="node-2", edit_config=node_config("node-2"))
    procs.append(n2)
    front = HAProxy([n1, n2], "HAProxy → 2 nodes")
    procs.append(front)
    direct = Direct(n1, "1 node direct")
    log(f"HAProxy on 127.0.0.1:{front.port} (pid {front.proxy_root}) → "
        f"{n1.port} (pid {n1.root}), {n2.port} (pid {n2.root})")
    a = [scenario("A 1 KB, 20 sessions, new connection per message", [front, direct], sink,
                  CL_MESSAGES, 20, SMALL, False, WARMUP)]
    for p in (front, n1, n2):
        p.stop()
        procs.remove(p)
    lines = [f"Scale-out, HAProxy 2.6 (TCP mode, send-proxy-v2, round robin, TCP checks every "
             f"2 s) in front of two portcullis nodes on this machine, against one of the "
             f"nodes used directly: {CL_MESSAGES} messages per counted run, {RUNS} counted "
             f"runs per path after a {WARMUP}-message warm-up, alternating, {SETTLE_S:g} s "
             "settle before each.", ""] + table_cluster(a, "1 node direct")
    return lines, a


def cluster_redis(sink, procs):
    """--cluster, part "redis": shared rate limits through Redis vs the same limits kept
    locally; Redis's key sizes and redis-benchmark. Returns (report lines, runs, open-loop
    runs)."""
    redis = Redis()
    procs.append(redis)
    shared = Portcullis(sink.port, name="cluster-on",
                        edit_config=node_config("cluster-on", redis.port))
    procs.append(shared)
    local = Portcullis(sink.port, name="cluster-off", edit_config=node_config("cluster-off", 0))
    procs.append(local)
    meter(shared, redis)
    c = [scenario("A 1 KB, 20 sessions, new connection per message", [shared, local], sink,
                  CL_MESSAGES, 20, SMALL, False, WARMUP)]
    lat = cluster_latency([shared, local], sink, CL_RATE, CL_SECONDS) if CL_SECONDS > 0 else {}
    sizes = redis.key_sizes()
    used = re.search(r"used_memory:(\d+)", redis.cli("INFO", "memory"))
    bench = redis_benchmark(redis)
    lines = ["Shared limits: node \"cluster-on\" with the four [rate_limits] keys at "
             f"{NEVER_REFUSE} (never refusing) and [cluster] on a local Redis 7.0 "
             "(noeviction, appendonly yes, appendfsync everysec); node \"cluster-off\" with "
             "the same limits and no [cluster]. No AUTH in this load, so messages_per_user, "
             "the lockout and spraying counters are not exercised. Scenario A "
             f"({CL_MESSAGES} messages per counted run, {RUNS} counted runs per node after a "
             f"{WARMUP}-message warm-up), alternating; Redis ops/msg from INFO commandstats "
             "before and after each run (INFO itself left out): a script call is one round trip, "
             "and commandstats also counts each command it runs inside Redis.", ""] + \
        table_cluster(c, "cluster-off")
    lines += ["", "Redis commands per message (cluster-on, scenario A, medians): "
              + commands_line(c[0][1]["cluster-on"]) + "."]
    if lat:
        lines += ["", f"Open loop (loadgen, a new connection every 1/{CL_RATE:.0f} s for "
                  f"{CL_SECONDS:.0f} s, {RUNS} runs per node, alternating): latency from "
                  "the scheduled start to the 250 after the final dot.", "",
                  "| node | accept→250 p50 ms | accept→250 p99 ms | failed | Redis scripts/msg | "
                  "added p50 / p99 ms (medians) |", "|---|---|---|---|---|---|"]
        off = lat["cluster-off"]
        for name, rs in lat.items():
            added = ""
            if name == "cluster-on":
                added = "%+.2f / %+.2f" % (
                    statistics.median(r["p50_ms"] for r in rs) -
                    statistics.median(r["p50_ms"] for r in off),
                    statistics.median(r["p99_ms"] for r in rs) -
                    statistics.median(r["p99_ms"] for r in off))
            ops = fmt([r["redis_ops"] for r in rs], ".2f") if "redis_ops" in rs[0] else ""
            lines.append(f"| {name} | {fmt([r['p50_ms'] for r in rs], '.2f')} | "
                         f"{fmt([r['p99_ms'] for r in rs], '.2f')} | "
                         f"{sum(r['failed'] for r in rs)} | {ops} | {added} |")
    lines += ["", "Keys in Redis after the runs (MEMORY USAGE, bytes): " + (
        "; ".join(f"{p}: {n} keys, median {b:.0f} B" for p, (n, b) in sizes.items())
        or "none") + (f"; used_memory {int(used.group(1)) / 1e6:.1f} MB." if used else "."),
        "", "redis-benchmark on this machine (50 clients, 200000 requests each, random "
        "keys; no pipelining unless said): " +
        ", ".join(f"{n} {v:,.0f}/s" for n, v in bench) + "."]
    for p in (shared, local, redis):
        p.stop()
        procs.remove(p)
    return lines, c, lat


def main_cluster():
    """--cluster: the parts of BENCH_CL_PARTS (cluster_haproxy, cluster_redis)."""
    started = time.monotonic()
    sink = Sink(free_port())
    procs = []
    try:
        lines, runs, lat = [], [], {}
        if "haproxy" in CL_PARTS:
            part, a = cluster_haproxy(sink, procs)
            lines, runs = lines + part, runs + a
        if "redis" in CL_PARTS:
            part, c, lat = cluster_redis(sink, procs)
            lines, runs = lines + ([""] if lines else []) + part, runs + c
        publish(lines, started)
        short = [f"{r['relay']} delivered {r['delivered']} of {r['sent']}"
                 for _, res in runs for rs in res.values() for r in rs
                 if r["delivered"] < r["sent"]]
        short += [f"{name}: {r['failed']} open-loop sessions failed"
                  for name, rs in lat.items() for r in rs if r["failed"]]
        fail_if_short(short)
    finally:
        stop_all(procs, sink)


def main_backlog():
    """--backlog: the Backlog scenario alone."""
    started = time.monotonic()
    sink = Sink(free_port())
    try:
        publish(scenario_backlog(sink, BACKLOG, BACKLOG_RUNS, BACKLOG_NEW, BACKLOG_RELAYS),
                started)
    finally:
        stop_proc(sink.proc)


def main():
    if AUTH_ONLY:
        return main_auth()
    if BACKLOG_ONLY:
        return main_backlog()
    if ATLS_ONLY:
        return main_atls()
    if OBSERVE_ONLY:
        return main_observe()
    if COST_ONLY:
        return main_cost()
    if CLUSTER_ONLY:
        return main_cluster()
    started = time.monotonic()
    f_short, atls_short, b = [], [], []
    sink = Sink(free_port())
    relays = []
    try:
        relays.append(Portcullis(sink.port))
        if not SMOKE:
            relays.append(Postfix(sink.port))
        a_relays = list(relays)
        if os.environ.get("BENCH_BEFORE_BIN"):
            a_relays.append(Portcullis(sink.port, os.environ["BENCH_BEFORE_BIN"],
                                       "portcullis-before"))
        log("relays up: " + ", ".join(f"{r.name} on 127.0.0.1:{r.port} (pid {r.root})"
                                      for r in a_relays))
        a = [scenario("A 1 KB, 20 sessions, new connection per message", a_relays, sink,
                      MESSAGES, 20, SMALL, False, WARMUP),
             scenario("A 1 KB, 20 sessions, connection reuse (-d)", a_relays, sink,
                      MESSAGES, 20, SMALL, True, WARMUP)]
        for extra in a_relays[len(relays):]:
            extra.stop()
        lines = [f"Scenario A: {MESSAGES} messages per counted run, {RUNS} counted runs per relay "
                 f"after a {WARMUP}-message warm-up, alternating.", ""] + table_a(a)
        if not SMOKE:
            b = [scenario("B 10 MiB × %d, 5 sessions" % BIG_MESSAGES, relays, sink,
                          BIG_MESSAGES, 5, BIG, False, 5, rss=True)]
            lines += ["", "Scenario B: peak RSS is VmHWM of the portcullis process (reset before "
                      "each run); for Postfix the largest sum of Pss over its processes, sampled every 50 ms.",
                      ""] + table_b(b)
            c_rate = float(os.environ.get("BENCH_C_RATE", "0") or 0) or 0.5 * statistics.median(
                r["msgs"] for r in a[0][1]["postfix"])
            if C_SECONDS > 0:
                lines += [""] + latency_c(relays, sink, c_rate, C_SECONDS)
            if D_SECONDS > 0 and D_IDLE > 0:
                d_rate = float(os.environ.get("BENCH_D_RATE", "0") or 0) or 0.5 * statistics.median(
                    r["msgs"] for r in a[0][1]["portcullis"])
                lines += [""] + scenario_d(relays[0], relays[1], sink, d_rate, D_SECONDS, D_IDLE)
            if E_SECONDS > 0:
                lines += [""] + scenario_e(relays[0], E_SECONDS, E_CONNS)
            if STRACE_MESSAGES:
                lines += ["", "fsync check (strace -f -c attached to the whole relay during "
                          f"{STRACE_MESSAGES} messages of scenario A, new connections):", "",
                          "| relay | messages | syscalls | per message |", "|---|---|---|---|"]
                for relay in relays:
                    name, n, counts, per = strace_pass(relay, sink, STRACE_MESSAGES)
                    lines.append(f"| {name} | {n} | " +
                                 ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + " | " +
                                 ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items())) + " |")
        if not SMOKE and ATLS_MESSAGES > 0:
            tls_sink = TlsSink(free_port(), BenchCA())
            try:
                atls_lines, atls_short = scenario_atls(tls_sink.ca, tls_sink, ATLS_MESSAGES, RUNS,
                                                       ATLS_WARMUP, ATLS_SECONDS, a[0][1])
            finally:
                tls_sink.stop()
            lines += [""] + atls_lines
        if not SMOKE and BACKLOG > 0:
            lines += [""] + scenario_backlog(sink, BACKLOG, BACKLOG_RUNS, BACKLOG_NEW)
        if not SMOKE:
            f_lines, f_short = scenario_f()
            lines += [""] + f_lines
        publish(lines, started)
        # A run that lost messages measured nothing: fail (this is what the CI smoke pass checks).
        fail_if_short(short_runs(a + b) + f_short + atls_short)
    finally:
        stop_all(relays, sink)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
