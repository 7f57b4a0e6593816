#!/usr/bin/env python3
"""AUTH flood: password hashing as a denial of service, measured against a release build.

Starts `portcullis run` (a STARTTLS submission listener requiring AUTH, one user `alice`) on a
free loopback port, then:

1. idle: a real user (alice, right password, from 127.0.0.1) logs in AUTH_FLOOD_PROBES times;
   the time from sending AUTH to its reply is her login latency;
2. flood: AUTH_FLOOD_CONNS (default 300) clients at once, each from its own address
   127.x.y.z, each one connection after another for AUTH_FLOOD_SECONDS (default 30): EHLO,
   STARTTLS, EHLO, AUTH PLAIN with a random login and password. Meanwhile alice logs in every
   0.5 s from 127.0.0.1 (where she logged in before: a known pair), a newcomer logs in as
   alice every 0.5 s from a fresh address 127.0.1.N (never seen: verified in the strangers'
   lane), and the relay's RSS (VmRSS of /proc/PID/status) is sampled every 0.2 s;
3. after: RSS AUTH_FLOOD_AFTER seconds (default 60) after the flood ends, and alice again.

Prints RSS before / peak during / after (MiB), alice's latency (median, p90, max) idle and
during the flood, and the replies the flood got (535 verified and wrong, 454 busy or locked
out). Exit status 1 if RSS after the flood is more than 50 MiB above RSS before it, or if the
peak exceeds before + hash slots x 19 MiB + AUTH_FLOOD_SLACK_MIB (default 128: the 300 TLS
sessions, their buffers and the log).

Usage: cargo build --release && bench/auth_flood.py [target/release/portcullis]
Only loopback is used. Needs python3 (ssl, smtplib) and nothing else.
"""

import base64
import os
import random
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/portcullis"
CONNS = int(os.environ.get("AUTH_FLOOD_CONNS", "300"))
SECONDS = float(os.environ.get("AUTH_FLOOD_SECONDS", "30"))
AFTER = float(os.environ.get("AUTH_FLOOD_AFTER", "60"))
PROBES = int(os.environ.get("AUTH_FLOOD_PROBES", "10"))
SLACK_MIB = float(os.environ.get("AUTH_FLOOD_SLACK_MIB", "128"))
ARGON2_M_MIB = 19  # m = 19456 KiB, what `portcullis passwd` writes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def attempt(port, ctx, source, user, password):
    """One connection: EHLO, STARTTLS, EHLO, AUTH. Returns (code, seconds for AUTH)."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=60) as c:
        c.ehlo("client.test")
        c.starttls(context=ctx)
        c.ehlo("client.test")
        start = time.monotonic()
        code, _ = c.docmd("AUTH", "PLAIN " + plain(user, password))
        took = time.monotonic() - start
        try:
            c.quit()
        except smtplib.SMTPException:
            pass
        return code, took


def summary(xs):
    if not xs:
        return "none"
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
    return (f"median {statistics.median(xs) * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms, "
            f"max {xs[-1] * 1000:.0f} ms (n={len(xs)})")


def main():
    tmp = tempfile.mkdtemp(prefix="auth-flood-")
    subprocess.run([BIN, "gen-cert", "--out", f"{tmp}/tls", "--name", "localhost"],
                   check=True, capture_output=True)
    hashed = subprocess.run([BIN, "passwd"], input=b"secret\n", check=True,
                            capture_output=True).stdout.decode().strip()
    with open(f"{tmp}/users.toml", "w") as f:
        f.write(f'[[users]]\nname = "alice"\npassword_hash = "{hashed}"\n'
                f'senders = ["alice@example.com"]\n')
    port, upstream = free_port(), free_port()
    with open(f"{tmp}/portcullis.toml", "w") as f:
        f.write(f"""[server]
hostname = "flood.test"
spool_dir = "{tmp}/spool"

[tls]
cert = "{tmp}/tls/cert.pem"
key = "{tmp}/tls/key.pem"

[[listeners]]
name = "submission"
bind = "127.0.0.1:{port}"
tls = "starttls"
require_tls = true
auth = "required"

[relay]
accepted_domains = ["example.com"]

[auth]
users_file = "{tmp}/users.toml"

[limits]
max_connections = 2000

[rate_limits]
messages_per_user = "100/hour"

[[upstreams]]
name = "up"
address = "127.0.0.1:{upstream}"
tls = "none"
""")
    log = open(f"{tmp}/relay.log", "w")
    relay = subprocess.Popen([BIN, "run", "--config", f"{tmp}/portcullis.toml"],
                             stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
    try:
        run(relay, port, tmp)
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(timeout=20)
        except subprocess.TimeoutExpired:
            relay.kill()
        print(f"relay log: {tmp}/relay.log")


def run(relay, port, tmp):
    ctx = ssl.create_default_context(cafile=f"{tmp}/tls/cert.pem")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    slots = os.cpu_count() or 1

    rss_start = rss_mib(relay.pid)
    idle = []
    for _ in range(PROBES):
        code, took = attempt(port, ctx, "127.0.0.1", "alice", "secret")
        assert code == 235, code
        idle.append(took)
    time.sleep(2)
    rss_before = rss_mib(relay.pid)

    stop = threading.Event()
    replies = {}
    errors = [0]
    lock = threading.Lock()

    def flooder(i):
        rng = random.Random(i)
        source = f"127.{1 + i // 250 % 250}.{i % 250 + 1}.{rng.randrange(1, 250)}"
        while not stop.is_set():
            try:
                code, _ = attempt(port, ctx, source, f"u{rng.randrange(10**9)}",
                                  f"p{rng.randrange(10**9)}")
            except (OSError, smtplib.SMTPException):
                code = None
            with lock:
                if code is None:
                    errors[0] += 1
                else:
                    replies[code] = replies.get(code, 0) + 1
            # A locked-out address moves on, as a botnet would.
            if code == 454:
                source = f"127.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}"

    during = []
    user_codes = {}

    def real_user():
        while not stop.is_set():
            try:
                code, took = attempt(port, ctx, "127.0.0.1", "alice", "secret")
                during.append(took)
                user_codes[code] = user_codes.get(code, 0) + 1
            except (OSError, smtplib.SMTPException) as e:
                user_codes[str(e)[:40]] = user_codes.get(str(e)[:40], 0) + 1
            stop.wait(0.5)

    fresh = []
    fresh_codes = {}

    def newcomer():
        n = 0
        while not stop.is_set():
            n += 1
            try:
                code, took = attempt(port, ctx, f"127.0.1.{n % 250 + 1}", "alice", "secret")
                if code == 235:
                    fresh.append(took)
                fresh_codes[code] = fresh_codes.get(code, 0) + 1
            except (OSError, smtplib.SMTPException) as e:
                fresh_codes[str(e)[:40]] = fresh_codes.get(str(e)[:40], 0) + 1
            stop.wait(0.5)

    peak = [rss_before]

    def sampler():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(relay.pid))
            stop.wait(0.2)

    threads = [threading.Thread(target=flooder, args=(i,)) for i in range(CONNS)]
    threads += [threading.Thread(target=t) for t in (real_user, newcomer, sampler)]
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join()
    rss_end = rss_mib(relay.pid)
    time.sleep(AFTER)
    rss_after = rss_mib(relay.pid)
    after = []
    for _ in range(PROBES):
        code, took = attempt(port, ctx, "127.0.0.1", "alice", "secret")
        after.append(took)

    print(f"flood: {CONNS} parallel TLS+AUTH clients for {SECONDS:.0f} s, {slots} hash slots")
    print(f"flood replies: {dict(sorted(replies.items()))}, connection errors {errors[0]}")
    print(f"alice idle:         {summary(idle)}")
    print(f"alice during flood: {summary(during)}; replies {user_codes}")
    print(f"newcomer during:    {summary(fresh)} (235 only); replies {fresh_codes}")
    print(f"alice after:        {summary(after)}")
    print(f"RSS MiB: at start {rss_start:.1f}, before flood {rss_before:.1f}, "
          f"peak during {peak[0]:.1f}, at end {rss_end:.1f}, {AFTER:.0f} s after {rss_after:.1f}")
    bound = rss_before + slots * ARGON2_M_MIB + SLACK_MIB
    ok = rss_after <= rss_before + 50 and peak[0] <= bound
    print(f"bound: peak <= before + {slots} x {ARGON2_M_MIB} + {SLACK_MIB:.0f} = {bound:.1f}; "
          f"after <= before + 50 = {rss_before + 50:.1f}: {'ok' if ok else 'EXCEEDED'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
