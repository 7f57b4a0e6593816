#!/usr/bin/env python3
"""Stress-mode figure: seconds until a newcomer gets its 220 while idle connections fill the relay.

An attacker holds IDLE connections (default 1000 = the default limits.max_connections) from
ADDRS loopback addresses (default 50, so 20 each = the default max_connections_per_ip), each
greeted and then silent, and never reconnects. A client from another address then connects
every 0.5 s until it is greeted; the script prints how long that took, and what the idle
connections were told. The relay runs on the default limits (stress_threshold 80,
stress_timeout 10s, command_timeout 5m); only the listener and spool are set.

Usage: bench/stress_idle.py [PORTCULLIS_BINARY]   (default target/debug/portcullis)
Environment: STRESS_IDLE (default 1000), STRESS_ADDRS (default 50), STRESS_RECONNECT=1: the
attacker opens a new idle connection as soon as one of its connections is closed or refused
(the newcomer then competes with it for each freed slot). STRESS_KEEPALIVE=SECS: each idle
connection sends NOOP every SECS seconds (from when all are held) and stays while it gets 250.
Everything stays on 127.0.0.0/8. Exit status 0 when the newcomer was greeted within 15 s.
"""

import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/debug/portcullis"
IDLE = int(os.environ.get("STRESS_IDLE", "1000"))
ADDRS = int(os.environ.get("STRESS_ADDRS", "50"))
RECONNECT = os.environ.get("STRESS_RECONNECT") == "1"
KEEPALIVE = float(os.environ.get("STRESS_KEEPALIVE", "0"))
LIMIT_S = 15.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(src, port, timeout=10.0):
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_line(s):
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = s.recv(512)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def keepalive(idle, told, next_noop, until):
    """Until `until`: send NOOP on every idle connection when `next_noop` has come, and read
    the replies; a connection told anything but 250 (or closed) is dropped and counted in
    `told`. Returns when the next NOOPs are due."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in idle}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    while time.time() < until:
        if time.time() >= next_noop:
            for s in list(idle):
                try:
                    s.sendall(b"NOOP\r\n")
                except OSError:
                    pass
            next_noop += KEEPALIVE
        wait_ms = max(0, int(1000 * (min(until, next_noop) - time.time())))
        for fd, _ in poller.poll(wait_ms):
            s = by_fd.get(fd)
            if s is None:
                continue
            try:
                line = read_line(s)
            except OSError as e:
                line = type(e).__name__
            if line.startswith("250"):
                continue
            told[line[:9] or "closed"] = told.get(line[:9] or "closed", 0) + 1
            poller.unregister(fd)
            del by_fd[fd]
            idle.remove(s)
            s.close()
    return next_noop


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "portcullis.toml")
        with open(cfg, "w") as f:
            f.write(
                f'[server]\nhostname = "relay.test"\nspool_dir = "{tmp}/spool"\n\n'
                f'[[listeners]]\nname = "mx"\nbind = "127.0.0.1:{port}"\ntls = "none"\n\n'
                f'[[upstreams]]\nname = "up"\naddress = "127.0.0.1:{free_port()}"\ntls = "none"\n\n'
                '[relay]\naccepted_domains = ["example.com"]\n'
            )
        log = open(os.path.join(tmp, "relay.log"), "w")
        relay = subprocess.Popen([BIN, "run", "--config", cfg], stdout=log, stderr=log)
        try:
            deadline = time.time() + 10
            while True:
                try:
                    connect("127.0.0.1", port).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
            time.sleep(0.2)
            idle = []
            t_fill = time.time()
            for i in range(IDLE):
                s = connect(f"127.0.3.{1 + i % ADDRS}", port)
                greeting = read_line(s)
                assert greeting.startswith("220"), greeting
                idle.append(s)
            print(f"{IDLE} idle connections from {ADDRS} addresses held "
                  f"(filled in {time.time() - t_fill:.2f} s)")
            start = time.time()
            next_noop = start
            attempts = 0
            told = {}
            reconnected = 0
            while True:
                attempts += 1
                s = connect("127.0.4.1", port)
                reply = read_line(s)
                s.close()
                if reply.startswith("220"):
                    break
                if time.time() - start > 60:
                    print(f"no 220 after 60 s (last reply {reply!r})")
                    return 1
                if KEEPALIVE:
                    next_noop = keepalive(idle, told, next_noop, time.time() + 0.5)
                    continue
                if not RECONNECT:
                    time.sleep(0.5)
                    continue
                # Half a second of the attacker refilling every slot the relay frees.
                until = time.time() + 0.5
                while time.time() < until:
                    ready, _, _ = select.select(idle, [], [], max(0.0, until - time.time()))
                    for r in ready:
                        line = read_line(r)[:9] or "closed"
                        told[line] = told.get(line, 0) + 1
                        r.close()
                        idle.remove(r)
                        n = reconnected + IDLE
                        reconnected += 1
                        try:
                            c = connect(f"127.0.3.{1 + n % ADDRS}", port)
                            if read_line(c).startswith("220"):
                                idle.append(c)
                            else:
                                c.close()
                        except OSError:
                            pass
            if RECONNECT:
                print(f"attacker reconnected {reconnected} times")
            waited = time.time() - start
            print(f"newcomer greeted after {waited:.2f} s ({attempts} attempts; "
                  f"earlier ones: 421 4.3.2)")
            for s in idle:
                try:
                    line = read_line(s)[:9] or "closed"
                except OSError as e:
                    line = type(e).__name__
                told[line] = told.get(line, 0) + 1
                s.close()
            print(f"idle connections were told: {told}")
            return 0 if waited <= LIMIT_S else 1
        finally:
            relay.terminate()
            relay.wait(timeout=40)
            log.close()
            with open(os.path.join(tmp, "relay.log")) as f:
                lines = [l.strip() for l in f if "stress mode" in l]
            for l in lines:
                print("log:", l)


if __name__ == "__main__":
    sys.exit(main())
