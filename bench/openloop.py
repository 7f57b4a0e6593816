#!/usr/bin/env python3
"""Open-loop SMTP load for scenario C: starts one session (new connection, 1 KB message,
1 recipient) every 1/RATE seconds on a fixed schedule, whatever the server's speed, and measures
from the *scheduled* start to the 250 after the final dot (so a late start counts as latency).

usage: openloop.py PORT RATE SECONDS   -> prints one JSON line: sent, ok, failed, p50_ms, p99_ms
"""

import asyncio
import json
import sys
import time

def message():
    head = b"From: bench@example.com\r\nTo: rcpt@example.net\r\nSubject: open loop\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    return head + line * ((1024 - len(head)) // len(line)) + b".\r\n"


MSG = message()


async def reply(r):
    while True:
        line = await r.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def session(port, scheduled, lat, fails):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            steps = [None, b"EHLO openloop.test\r\n", b"MAIL FROM:<bench@example.com>\r\n",
                     b"RCPT TO:<rcpt@example.net>\r\n", b"DATA\r\n", MSG]
            for cmd in steps:
                if cmd is not None:
                    w.write(cmd)
                code = await reply(r)
                if code >= 400:
                    raise ConnectionError(f"{code} after {cmd!r}")
            lat.append(time.monotonic() - scheduled)
            w.write(b"QUIT\r\n")
            await w.drain()
        finally:
            w.close()
    except (OSError, ConnectionError, asyncio.IncompleteReadError):
        fails.append(1)


async def main(port, rate, seconds):
    lat, fails, tasks = [], [], []
    start = time.monotonic() + 0.1
    n = int(rate * seconds)
    for i in range(n):
        at = start + i / rate
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(asyncio.wait_for(session(port, at, lat, fails), 60)))
    await asyncio.gather(*tasks, return_exceptions=True)
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
    print(json.dumps({"sent": n, "ok": len(lat), "failed": n - len(lat),
                      "p50_ms": q(0.50), "p99_ms": q(0.99)}))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])))
