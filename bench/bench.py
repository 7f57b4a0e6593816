#!/usr/bin/env python3
"""Side-by-side relay benchmark: smtp-source -> relay on 127.0.0.1 -> smtp-sink on 127.0.0.1.

Started by bench/run, which installs postfix, builds portcullis and exports:
  BENCH_BIN  the portcullis binary      BENCH_TMP  a private temp dir (removed by bench/run)
Knobs (environment): BENCH_MESSAGES (scenario A messages per counted run, default 20000),
BENCH_RUNS (counted runs per relay and scenario, default 3), BENCH_WARMUP (messages in the
warm-up run, default 2000), BENCH_BIG_MESSAGES (scenario B, default 50), BENCH_STRACE_MESSAGES
(default 1000; 0 skips the fsync check), BENCH_SETTLE (pause in seconds before every
run, default 30, 0 with --smoke; see SETTLE_S), BENCH_C_RATE (scenario C rate,
default half of Postfix's scenario A median), BENCH_C_SECONDS (default 15; 0 skips C), BENCH_OUT (also write the table to this file).
Argument --smoke: scenario A for portcullis only (no Postfix, no scenario B, no strace).

Every process started here is recorded in $BENCH_TMP/pids so that bench/run's trap can kill it
by PID even if this script dies; on a normal exit this script stops them itself.
"""

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

TMP = os.environ["BENCH_TMP"]
BIN = os.environ["BENCH_BIN"]
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


def pss_kb(pid):
    """Proportional set size: shared pages (libraries, Postfix's shared text) are split among
    the processes that map them, so a sum over many processes does not count them many times."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- the sink ----------------------------------------------------------------------------

class Sink:
    """smtp-sink -c: its running counters (cumulative 'mesg=N') are read as they are printed;
    the time each new count is seen is the arrival time of that message."""

    def __init__(self, port):
        self.port = port
        self.count = 0
        self.t_last = time.monotonic()
        self.cv = threading.Condition()
        self.proc = spawn(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{port}", "1024"],
                          stdout=subprocess.PIPE, stderr=open(os.path.join(TMP, "sink.err"), "w"))
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(port, proc=self.proc)

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
    name = "portcullis"

    def __init__(self, sink_port):
        self.dir = os.path.join(TMP, "portcullis")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        with open(os.path.join(BENCH_DIR, "portcullis.toml")) as f:
            cfg = f.read()
        cfg = cfg.replace("127.0.0.1:25250", f"127.0.0.1:{self.port}")
        cfg = cfg.replace("127.0.0.1:25260", f"127.0.0.1:{sink_port}")
        self.config = os.path.join(self.dir, "portcullis.toml")
        with open(self.config, "w") as f:
            f.write(cfg)
        self.proc = spawn([BIN, "run", "--config", self.config], cwd=self.dir,
                          stdout=open(os.path.join(self.dir, "log"), "w"), stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc)
        self.root = self.proc.pid

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
    if SETTLE_S > 0:
        time.sleep(SETTLE_S)
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


def table_a(rows):
    out = ["| scenario | relay | end-to-end msg/s median (range) | relay CPU ms/msg | "
           "smtp-source CPU ms/msg | ratio portcullis/Postfix msg/s |",
           "|---|---|---|---|---|---|"]
    for title, res in rows:
        ratio = ""
        if "postfix" in res and "portcullis" in res:
            ratio = "%.2f×" % (statistics.median(r["msgs"] for r in res["portcullis"]) /
                               statistics.median(r["msgs"] for r in res["postfix"]))
        for name, rs in res.items():
            out.append(f"| {title} | {name} | {fmt([r['msgs'] for r in rs], '.0f')} | "
                       f"{fmt([r['cpu_ms'] for r in rs], '.2f')} | "
                       f"{statistics.median(r['gen_cpu_ms'] for r in rs):.2f} | "
                       f"{ratio if name == 'portcullis' else ''} |")
    return out


def table_b(rows):
    out = ["| scenario | relay | MB/s median (range) | msg/s | peak RSS MB median (range) | "
           "relay CPU ms/msg | ratio portcullis/Postfix MB/s |", "|---|---|---|---|---|---|---|"]
    for title, res in rows:
        ratio = ""
        if "postfix" in res and "portcullis" in res:
            ratio = "%.2f×" % (statistics.median(r["mbs"] for r in res["portcullis"]) /
                               statistics.median(r["mbs"] for r in res["postfix"]))
        for name, rs in res.items():
            out.append(f"| {title} | {name} | {fmt([r['mbs'] for r in rs], '.0f')} | "
                       f"{statistics.median(r['msgs'] for r in rs):.1f} | "
                       f"{fmt([r['rss_mb'] for r in rs], '.0f')} | "
                       f"{fmt([r['cpu_ms'] for r in rs], '.1f')} | "
                       f"{ratio if name == 'portcullis' else ''} |")
    return out


def latency_c(relays, sink, rate, seconds):
    """Scenario C: open-loop load at a fixed rate (bench/openloop.py); p50/p99 accept->250."""
    log(f"== C open loop at {rate:.0f} msg/s for {seconds:.0f} s")
    results = {r.name: [] for r in relays}
    for i in range(RUNS):
        for relay in relays:
            time.sleep(SETTLE_S)
            base = sink.count
            out = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "openloop.py"),
                                  str(relay.port), str(rate), str(seconds)],
                                 capture_output=True, text=True, timeout=seconds + 120, check=True)
            r = json.loads(out.stdout)
            sink.wait_for(base + r["ok"])  # drain, so the next run starts on an empty queue
            log(f"{relay.name}: {r}")
            results[relay.name].append(r)
    out = [f"Scenario C: open loop, a new connection every 1/{rate:.0f} s for {seconds:.0f} s, "
           "latency from the scheduled start to the 250 after the final dot.", "",
           "| scenario | relay | p50 ms median (range) | p99 ms median (range) | failed | "
           "ratio p99 portcullis/Postfix |", "|---|---|---|---|---|---|"]
    for name, rs in results.items():
        ratio = ""
        if name == "portcullis" and "postfix" in results:
            ratio = "%.2f×" % (statistics.median(r["p99_ms"] for r in rs) /
                               statistics.median(r["p99_ms"] for r in results["postfix"]))
        out.append(f"| C {rate:.0f} msg/s open loop | {name} | "
                   f"{fmt([r['p50_ms'] for r in rs], '.1f')} | {fmt([r['p99_ms'] for r in rs], '.1f')} | "
                   f"{sum(r['failed'] for r in rs)} | {ratio} |")
    return out


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
        log("relays up: " + ", ".join(f"{r.name} on 127.0.0.1:{r.port} (pid {r.root})" for r in relays))
        a = [scenario("A 1 KB, 20 sessions, new connection per message", relays, sink,
                      MESSAGES, 20, SMALL, False, WARMUP),
             scenario("A 1 KB, 20 sessions, connection reuse (-d)", relays, sink,
                      MESSAGES, 20, SMALL, True, WARMUP)]
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
            c_seconds = float(os.environ.get("BENCH_C_SECONDS", "15"))
            if c_seconds > 0:
                lines += [""] + latency_c(relays, sink, c_rate, c_seconds)
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
