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

Every process started here is recorded in $BENCH_TMP/pids so that bench/run's trap can kill it
by PID even if this script dies; on a normal exit this script stops them itself.
"""

import json
import os
import re
import resource
import select
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
MESSAGES = int(os.environ.get("BENCH_MESSAGES", "20000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
WARMUP = int(os.environ.get("BENCH_WARMUP", str(min(2000, MESSAGES))))
BIG_MESSAGES = int(os.environ.get("BENCH_BIG_MESSAGES", "50"))
STRACE_MESSAGES = int(os.environ.get("BENCH_STRACE_MESSAGES", "1000"))
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
SETTLE_S = float(os.environ.get("BENCH_SETTLE", "0" if SMOKE else "30"))
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

    def __init__(self, port):
        self.port = port
        self.cv = threading.Condition()
        self.proc = None
        self.start()

    def start(self):
        """Start smtp-sink on the port; its count starts again from 0."""
        self.count = 0
        self.t_last = time.monotonic()
        self.proc = spawn(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1024"],
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

    def __init__(self, sink_port, binary=None, name="portcullis"):
        self.name = name
        binary = binary or BIN
        self.dir = os.path.join(TMP, name)
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
        self.config = os.path.join(self.dir, "portcullis.toml")
        with open(self.config, "w") as f:
            f.write(cfg)
        self.proc = spawn([binary, "run", "--config", self.config], cwd=self.dir,
                          stdout=open(os.path.join(self.dir, "log"), "w"), stderr=subprocess.STDOUT,
                          preexec_fn=raise_nofile)
        wait_port(self.port, proc=self.proc)
        self.root = self.proc.pid

    def queued(self):
        """Messages in the spool's queue, not yet delivered."""
        q = os.path.join(self.dir, "spool", "queue")
        return sum(1 for n in os.listdir(q) if not n.endswith(".state"))

    def stop(self):
        stop_proc(self.proc)


class Postfix:
    """A private Postfix instance: own config dir, queue and data dir under BENCH_TMP."""
    name = "postfix"

    def __init__(self, sink_port):
        self.dir = os.path.join(TMP, "postfix")
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
            f.write(mcf)
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
"""
        with open(os.path.join(etc, "main.cf"), "w") as f:
            f.write(main)
        run = lambda *a: subprocess.run(["postconf", "-c", etc, *a], check=True, timeout=30)
        run("-F", "*/*/chroot = n")  # no chroot: no copies of /etc files in the queue dir
        subprocess.run(["postfix", "-c", etc, "set-permissions"], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["postfix", "-c", etc, "check"], check=True, timeout=60)
        self.proc = spawn(["postfix", "-c", etc, "start-fg"],
                          stdout=open(os.path.join(self.dir, "log"), "w"), stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc)
        with open(os.path.join(queue, "pid", "master.pid")) as f:
            self.root = int(f.read().strip())
        record_pid(self.root)
        self.queue = queue

    def queued(self):
        """Messages anywhere in Postfix's queue (maildrop, incoming, active, deferred, hold)."""
        n = 0
        for d in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(self.queue, d)):
                n += len(files)
        return n

    def stop(self):
        subprocess.run(["postfix", "-c", self.etc, "stop"], timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pid in reversed(tree(self.root)):
            kill_pid(pid)
        stop_proc(self.proc)


# ---- one run -----------------------------------------------------------------------------

def run_once(relay, sink, messages, sessions, size, reuse, rss=False):
    cmd = ["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(messages),
           "-f", "bench@example.com", "-t", "rcpt@example.net"]
    if reuse:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{relay.port}")
    settle()
    base = sink.count
    if rss and relay.name == "portcullis":
        with open(f"/proc/{relay.root}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, so the peak is this run's
    peak_sum = 0
    c0 = cpu_ticks(relay.root)
    t0 = time.monotonic()
    src = spawn(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(TMP, "source.err"), "a"))
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
    c1 = cpu_ticks(relay.root)
    delivered = got - base
    if src.returncode != 0:
        log(f"warning: smtp-source exited {src.returncode} ({relay.name})")
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
    }
    if rss:
        r["rss_mb"] = (status_kb(relay.root, "VmHWM") / 1024 if relay.name == "portcullis"
                       else peak_sum / 1024)
    log(f"{relay.name}: {delivered} msgs in {elapsed:.2f}s = {r['msgs']:.0f} msg/s, "
        f"{r['cpu_ms']:.2f} ms CPU/msg (generator {r['gen_cpu_ms']:.2f})"
        + (f", RSS {r['rss_mb']:.0f} MB" if rss else ""))
    return r


def scenario(title, relays, sink, messages, sessions, size, reuse, warmup, rss=False):
    log(f"== {title}")
    for relay in relays:
        if warmup:
            log(f"warm-up {relay.name} ({warmup} messages)")
            run_once(relay, sink, warmup, sessions, size, reuse, rss)
    results = {r.name: [] for r in relays}
    for i in range(RUNS):  # alternate A B A B so drift hits both alike
        for relay in relays:
            results[relay.name].append(run_once(relay, sink, messages, sessions, size, reuse, rss))
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


def main():
    started = time.monotonic()
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
        lines += ["", f"Total wall time of the measurements: {time.monotonic() - started:.0f} s."]
        text = "\n".join(lines)
        print(text, flush=True)
        if os.environ.get("BENCH_OUT"):
            with open(os.environ["BENCH_OUT"], "w") as f:
                f.write(text + "\n")
        # A run that lost messages measured nothing: fail (this is what the CI smoke pass checks).
        short = [f"{r['relay']} delivered {r['delivered']} of {r['sent']}"
                 for _, res in a for rs in res.values() for r in rs if r["delivered"] < r["sent"]]
        if short:
            log("FAILED: messages missing at the sink: " + "; ".join(short))
            sys.exit(1)
    finally:
        for r in relays:
            try:
                r.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {r.name}: {e}")
        stop_proc(sink.proc)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
