#!/usr/bin/env python3
"""The soak of RELIABILITY.md: portcullis under mixed load for a long time, its memory, open
files and queue sampled every few seconds. Started by bench/soak (which builds the relay and
installs gnuplot); everything talks to loopback only.

Load, all the time (rates per second, each its own thread, one session per message):
  mx          SOAK_MX_RATE (8): from 127.0.0.1 to user@example.com (an accepted domain), every
              other session over STARTTLS; one in SOAK_BIG_EVERY (100) is a 1 MB message
  submission  SOAK_SUB_RATE (4): from 127.0.0.2, STARTTLS, AUTH PLAIN as alice (right password),
              to friend@dest.example
  denied      1: from 127.0.0.66, in the mx listener's deny list: 554 at the greeting
  relaying    1: from 127.0.0.5, unauthenticated, to someone@elsewhere.example: 550 5.7.1
  authfail    1: from 127.0.0.77, STARTTLS, AUTH as a login that does not exist: 535, then
              454 while that address is locked out ([auth] max_failures 5, lockout 1m)
The upstream is a small SMTP server in this script; it goes away for SOAK_OUTAGE_MINUTES (5)
starting SOAK_OUTAGE_AT minutes (12.5) after the warm-up: the relay queues, then delivers the
backlog once it is back. After SOAK_WARMUP_MINUTES (5) of warm-up the run lasts SOAK_MINUTES
(30) more; then the load stops and the queue must empty.

Checks (exit status 1 when one fails): every message acknowledged with 250 reached the upstream
(by its X-Soak-Id); the queue returned to 0 after the outage and at the end; after the warm-up,
each minute's median RSS and least count of open files (descriptors but sockets) stay
within 10 % of the warm-up's last minute; sockets are shown beside them.
Writes SOAK_OUT (docs/soak): soak.csv (the samples), soak.svg (the curves), soak.md (figures).
"""

import csv
import os
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time

BIN = os.environ["SOAK_BIN"]
TMP = os.environ["SOAK_TMP"]
OUT = os.environ.get("SOAK_OUT", "docs/soak")
WARMUP_MIN = float(os.environ.get("SOAK_WARMUP_MINUTES", "5"))
MINUTES = float(os.environ.get("SOAK_MINUTES", "30"))
OUTAGE_AT = float(os.environ.get("SOAK_OUTAGE_AT", "12.5"))
OUTAGE_MIN = float(os.environ.get("SOAK_OUTAGE_MINUTES", "5"))
MX_RATE = float(os.environ.get("SOAK_MX_RATE", "8"))
SUB_RATE = float(os.environ.get("SOAK_SUB_RATE", "4"))
BIG_EVERY = int(os.environ.get("SOAK_BIG_EVERY", "100"))
SAMPLE_S = float(os.environ.get("SOAK_SAMPLE_SECONDS", "5"))
DRAIN_S = 300
TOLERANCE = 0.10
PASSWORD = "soak-password"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the upstream ------------------------------------------------------------------------

class Sink:
    """A plain ESMTP server that records each message's X-Soak-Id; stop() closes its port and
    every connection (the outage), start() opens it again."""

    def __init__(self, port):
        self.port = port
        self.lock = threading.Lock()
        self.delivered = {}  # soak id -> times received
        self.conns = set()
        self.srv = None
        self.start()

    def start(self):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(256)
        self.srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def stop(self):
        srv, self.srv = self.srv, None
        # shutdown() wakes the thread blocked in accept() and stops the listening at once;
        # close() alone would leave the socket listening while that thread holds it.
        try:
            srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        srv.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def up(self):
        return self.srv is not None

    def _accept(self, srv):
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with self.lock:
                self.conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            f = conn.makefile("rb")
            conn.sendall(b"220 soak-sink ESMTP\r\n")
            while True:
                line = f.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-soak-sink\r\n250-8BITMIME\r\n250 SIZE 30000000\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    soak_id = None
                    while True:
                        data = f.readline()
                        if not data or data == b".\r\n":
                            break
                        if soak_id is None and data.startswith(b"X-Soak-Id: "):
                            soak_id = data[11:].strip().decode()
                    if not data:
                        return
                    if soak_id is not None:
                        with self.lock:
                            self.delivered[soak_id] = self.delivered.get(soak_id, 0) + 1
                    conn.sendall(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 ok\r\n")
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            conn.close()


# ---- the relay ---------------------------------------------------------------------------

def relay_config(mx, sub, sink):
    return f"""[server]
hostname = "soak.portcullis.test"
spool_dir = "./spool"

[tls]
cert = "./tls/cert.pem"
key = "./tls/key.pem"

[[listeners]]
name = "mx"
bind = "127.0.0.1:{mx}"
tls = "starttls"
deny = ["127.0.0.66"]

[[listeners]]
name = "submission"
bind = "127.0.0.1:{sub}"
tls = "starttls"
require_tls = true
auth = "required"

[relay]
accepted_domains = ["example.com"]

[auth]
users_file = "./users.toml"
max_failures = 5
failure_window = "1m"
lockout = "1m"

[limits]
pregreet_wait = "0s"
max_connections_per_ip = 200

[[upstreams]]
name = "exchange"
address = "127.0.0.1:{sink}"
tls = "none"

[queue]
retry = ["10s"]
bounces = false
"""


def start_relay(sink_port):
    d = os.path.join(TMP, "relay")
    os.makedirs(d, exist_ok=True)
    subprocess.run([BIN, "gen-cert", "--out", os.path.join(d, "tls"), "--name", "localhost"],
                   check=True, stdout=subprocess.DEVNULL)
    hashed = subprocess.run([BIN, "passwd"], input=PASSWORD + "\n", capture_output=True,
                            text=True, check=True).stdout.strip()
    with open(os.path.join(d, "users.toml"), "w") as f:
        f.write(f'[[users]]\nname = "alice"\npassword_hash = "{hashed}"\n'
                'senders = ["alice@example.com"]\n')
    mx, sub = free_port(), free_port()
    with open(os.path.join(d, "portcullis.toml"), "w") as f:
        f.write(relay_config(mx, sub, sink_port))
    proc = subprocess.Popen([BIN, "run", "--config", "portcullis.toml"], cwd=d,
                            stdout=open(os.path.join(d, "relay.log"), "w"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", sub), timeout=1).close()
            return proc, d, mx, sub
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the relay did not start; see " + os.path.join(d, "relay.log"))


def queued(spool):
    q = os.path.join(spool, "queue")
    return sum(1 for n in os.listdir(q) if not n.endswith(".state"))


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descriptors(pid):
    """(open descriptors, of which sockets)."""
    total = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        total += 1
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return total, sockets


# ---- the load ----------------------------------------------------------------------------

class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.acknowledged = set()
        self.counts = {}

    def add(self, what, n=1):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def acknowledged_as(self, what, soak_id):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1
            self.acknowledged.add(soak_id)


TLS = ssl.create_default_context()
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE


def message(soak_id, sender, rcpt, big):
    body = ("x" * 76 + "\r\n") * (13_000 if big else 10)
    return (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: soak {soak_id}\r\n"
            f"X-Soak-Id: {soak_id}\r\n\r\n{body}")


def paced(rate, stop, fn):
    """Call fn(n) about `rate` times a second until stop is set."""
    n, start = 0, time.monotonic()
    while not stop.is_set():
        try:
            fn(n)
        except Exception:  # a failed session is counted by fn; the load goes on
            pass
        n += 1
        wait = start + n / rate - time.monotonic()
        if wait > 0:
            stop.wait(wait)


def mx_load(port, c, stop):
    def one(n):
        soak_id = f"mx-{n}"
        big = BIG_EVERY > 0 and n % BIG_EVERY == BIG_EVERY - 1
        try:
            with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.1", 0), timeout=60) as s:
                if n % 2:
                    s.starttls(context=TLS)
                s.sendmail("sender@remote.example", [f"user{n % 50}@example.com"],
                           message(soak_id, "sender@remote.example", "user@example.com", big))
            c.acknowledged_as("big" if big else "mx", soak_id)
        except Exception:
            c.add("mx_failed")
            raise
    paced(MX_RATE, stop, one)


def submission_load(port, c, stop):
    def one(n):
        soak_id = f"sub-{n}"
        try:
            with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=60) as s:
                s.starttls(context=TLS)
                s.login("alice", PASSWORD)
                s.sendmail("alice@example.com", ["friend@dest.example"],
                           message(soak_id, "alice@example.com", "friend@dest.example", False))
            c.acknowledged_as("submission", soak_id)
        except Exception:
            c.add("submission_failed")
            raise
    paced(SUB_RATE, stop, one)


def denied_load(port, c, stop):
    def one(_):
        try:
            smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.66", 0), timeout=30).quit()
            c.add("denied_but_greeted")
        except smtplib.SMTPConnectError as e:
            c.add("denied" if e.smtp_code == 554 else f"denied_{e.smtp_code}")
    paced(1, stop, one)


def relaying_load(port, c, stop):
    def one(_):
        with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.5", 0), timeout=30) as s:
            s.ehlo()
            s.mail("spammer@remote.example")
            code, _ = s.rcpt("someone@elsewhere.example")
            c.add(f"relay_{code}")
    paced(1, stop, one)


def authfail_load(port, c, stop):
    def one(_):
        with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.77", 0), timeout=30) as s:
            s.starttls(context=TLS)
            try:
                s.login("mallory", "wrong-password")
                c.add("auth_wrongly_accepted")
            except smtplib.SMTPAuthenticationError as e:
                c.add(f"auth_{e.smtp_code}")
    paced(1, stop, one)


# ---- the run -----------------------------------------------------------------------------

def minute_values(rows, key, t_from, t_to, pick):
    """(start, pick(samples)) of each minute from t_from to t_to."""
    out = []
    t = t_from
    while t < t_to:
        vals = [r[key] for r in rows if t <= r["t"] < t + 60]
        if vals:
            out.append((t, pick(vals)))
        t += 60
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    sink = Sink(free_port())
    proc, d, mx, sub = start_relay(sink.port)
    try:
        run(sink, proc, d, mx, sub)
    finally:
        if proc.poll() is None:
            proc.kill()


def run(sink, proc, d, mx, sub):
    spool = os.path.join(d, "spool")
    c = Counters()
    stop = threading.Event()
    loads = [threading.Thread(target=f, args=(port, c, stop), daemon=True) for f, port in
             [(mx_load, mx), (submission_load, sub), (denied_load, mx), (relaying_load, mx),
              (authfail_load, sub)]]
    t0 = time.monotonic()
    for t in loads:
        t.start()
    rows = []
    outage = (t0 + (WARMUP_MIN + OUTAGE_AT) * 60, t0 + (WARMUP_MIN + OUTAGE_AT + OUTAGE_MIN) * 60)
    end = t0 + (WARMUP_MIN + MINUTES) * 60
    log(f"soak: {WARMUP_MIN} min warm-up + {MINUTES} min, outage at "
        f"{WARMUP_MIN + OUTAGE_AT} min for {OUTAGE_MIN} min; relay pid {proc.pid}, dir {d}")
    drained_at = None
    stopped_at = None
    next_sample = t0
    while True:
        now = time.monotonic()
        if sink.up and outage[0] <= now < outage[1]:
            log("upstream down")
            sink.stop()
        elif not sink.up and now >= outage[1]:
            log("upstream back")
            sink.start()
        if stopped_at is None and now >= end:
            log("load stopped; waiting for the queue to empty")
            stop.set()
            stopped_at = now
        if proc.poll() is not None:
            raise SystemExit(f"the relay exited ({proc.returncode}); see {d}/relay.log")
        q = queued(spool)
        with c.lock:
            delivered = sum(1 for k in c.acknowledged if k in sink.delivered)
            fds, sockets = descriptors(proc.pid)
            row = {"t": round(now - t0, 1), "rss_kb": rss_kb(proc.pid),
                   "open_files": fds - sockets, "sockets": sockets, "queue": q,
                   "acknowledged": len(c.acknowledged), "delivered": delivered,
                   "upstream_up": int(sink.up)}
            row.update({k: v for k, v in c.counts.items()})
        rows.append(row)
        if len(rows) % int(60 / SAMPLE_S) == 0:
            log(f"t={row['t']:.0f}s rss={row['rss_kb']} kB files={row['open_files']} "
                f"sockets={row['sockets']} "
                f"queue={q} acknowledged={row['acknowledged']} counts={c.counts}")
        if now >= outage[1] and q == 0 and drained_at is None:
            drained_at = now
            log(f"queue back to 0, {now - outage[1]:.0f} s after the upstream returned")
        if stopped_at is not None and q == 0:
            break
        if stopped_at is not None and now - stopped_at > DRAIN_S:
            break
        next_sample += SAMPLE_S
        time.sleep(max(0, next_sample - time.monotonic()))
    for t in loads:
        t.join(120)
    time.sleep(2)
    proc.terminate()
    proc.wait(60)

    keys = ["t", "rss_kb", "open_files", "sockets", "queue", "acknowledged", "delivered",
            "upstream_up"]
    extra = sorted({k for r in rows for k in r} - set(keys))
    with open(os.path.join(OUT, "soak.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + extra)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, 0) for k in keys + extra})

    warm_from, warm_to = (WARMUP_MIN - 1) * 60, WARMUP_MIN * 60
    out_from, out_to = (WARMUP_MIN + OUTAGE_AT) * 60, (WARMUP_MIN + OUTAGE_AT + OUTAGE_MIN) * 60
    run_to = (WARMUP_MIN + MINUTES) * 60
    findings, failed = [], []
    # RSS by the minute's median; open files (descriptors that are not sockets: the spool,
    # the journal, the log) by the minute's least. Sockets are the sessions in flight and the
    # upstream connections, bounded by [limits] and the upstream's max_connections: shown,
    # not judged against the warm-up (their number follows the load).
    for key, name, pick, judged in [("rss_kb", "RSS (kB)", statistics.median, True),
                                    ("open_files", "open files (least)", min, True),
                                    ("sockets", "sockets (least)", min, False)]:
        base = pick([r[key] for r in rows if warm_from <= r["t"] < warm_to])
        minutes = minute_values(rows, key, warm_to, run_to, pick)
        worst = max(minutes, key=lambda m: abs(m[1] - base))
        raw = [r[key] for r in rows if warm_to <= r["t"] < run_to]
        dev = (worst[1] - base) / base
        findings.append(f"| {name} | {base:.0f} | {min(m[1] for m in minutes):.0f} – "
                        f"{max(m[1] for m in minutes):.0f} | {dev:+.1%} (minute "
                        f"{worst[0] / 60:.0f}) | {min(raw)} – {max(raw)} |")
        if judged and abs(dev) > TOLERANCE:
            failed.append(f"{name}: minute {worst[0] / 60:.0f} median {worst[1]:.0f} vs "
                          f"warm-up {base:.0f} ({dev:+.1%})")
    ack = c.acknowledged
    lost = sorted(k for k in ack if k not in sink.delivered)
    dup = sum(1 for k in ack if sink.delivered.get(k, 0) > 1)
    peak = max((r["queue"] for r in rows if out_from <= r["t"] <= out_to + 600), default=0)
    back = (f"{drained_at - (t0 + out_to):.0f} s" if drained_at else "never")
    if lost:
        failed.append(f"{len(lost)} acknowledged messages never delivered, e.g. {lost[:5]}")
    if drained_at is None:
        failed.append("the queue did not return to 0 after the outage")
    if rows[-1]["queue"] != 0:
        failed.append(f"{rows[-1]['queue']} messages still queued at the end")
    counts = dict(sorted(c.counts.items()))
    summary = [
        f"Soak: {WARMUP_MIN:g} min warm-up + {MINUTES:g} min, upstream down from minute "
        f"{WARMUP_MIN + OUTAGE_AT:g} for {OUTAGE_MIN:g} min; a sample every {SAMPLE_S:g} s.",
        "",
        "| measure | warm-up (last minute) | after warm-up (each minute) | "
        "largest deviation | raw samples after warm-up |",
        "|---|---|---|---|---|",
        *findings,
        "",
        f"- acknowledged with 250: {len(ack)}; delivered: {len(ack) - len(lost)}; lost: "
        f"{len(lost)}; delivered twice: {dup}",
        f"- queue: peak {peak} during the outage; back to 0 {back} after the upstream returned; "
        f"{rows[-1]['queue']} at the end",
        f"- sessions by outcome: {counts}",
        f"- result: {'PASS' if not failed else 'FAIL: ' + '; '.join(failed)}",
    ]
    with open(os.path.join(OUT, "soak.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    print("\n".join(summary))
    plot(out_from, out_to, warm_to)
    sink.stop()
    sys.exit(1 if failed else 0)


def plot(out_from, out_to, warm_to):
    script = f"""
set terminal svg size 900,780 dynamic font 'sans,11' background '#ffffff'
set output '{OUT}/soak.svg'
set datafile separator ','
set key autotitle columnhead
set multiplot layout 3,1 title 'portcullis soak: mixed load, upstream outage (shaded), warm-up before the dashed line'
set xlabel 'minutes'
set grid
set xrange [0:*]
set object 1 rect from {out_from / 60},graph 0 to {out_to / 60},graph 1 fc rgb '#ffdddd' fs solid 0.5 behind
set arrow 1 from {warm_to / 60},graph 0 to {warm_to / 60},graph 1 nohead dt 2
set ylabel 'RSS (MiB)'
plot '{OUT}/soak.csv' using ($1/60):($2/1024) with lines lw 2 title 'RSS'
set ylabel 'descriptors'
plot '{OUT}/soak.csv' using ($1/60):3 with lines lw 2 title 'open files', '' using ($1/60):4 with lines lw 1 title 'sockets'
set ylabel 'messages'
plot '{OUT}/soak.csv' using ($1/60):5 with lines lw 2 title 'queue'
unset multiplot
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


if __name__ == "__main__":
    main()
