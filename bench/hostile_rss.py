#!/usr/bin/env python3
"""The agent's memory under hostile clients, measured (never asserted).

Starts the release upstream and agent (an inbound listener in front of the upstream,
no control plane: the agent serves without policy), then measures its RSS:

- slowloris: N connections each send a request line, then one header line every
  --trickle seconds; RSS with all of them open, how many the agent closed and how
  long after they were opened, and RSS once they are gone;
- idle: M connections each make one keep-alive request and then stay silent;
  RSS with all of them open, and after the client closes them.

Loopback only, bounded in time. Raise `ulimit -n` (both processes inherit the
script's limit, raised to the hard limit here).

    bench/hostile_rss.py [--slowloris 2000] [--idle 10000] [--agent-arg=--header-read-timeout-ms=10000 ...]
        [--wrap 'heaptrack -o /tmp/idle']
"""

import argparse
import os
import resource
import selectors
import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def mb(kb):
    return f"{kb / 1024:.1f} MB"


def wait_port(port, what, deadline=30.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"hostile_rss: {what} never listened on {port}")


def get(port, keep=False):
    """One keep-alive GET; returns the open socket when `keep`."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    if keep:
        return s
    s.close()
    return None


def settle(pid, seconds=1.0):
    time.sleep(seconds)
    return rss_kb(pid)


def slowloris(pid, port, n, trickle, limit):
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n")
        s.setblocking(False)
        socks.append(s)
    opened = time.monotonic()
    peak = rss_kb(pid)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    closed_at = []
    next_trickle = opened + trickle
    while open_ and time.monotonic() - opened < limit:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                open_.discard(s)
                closed_at.append(time.monotonic() - opened)
                s.close()
        peak = max(peak, rss_kb(pid))
        if time.monotonic() >= next_trickle:
            next_trickle += trickle
            for s in list(open_):
                try:
                    s.send(b"X-Slow: 1\r\n")
                except OSError:
                    pass
    still = len(open_)
    for s in open_:
        s.close()
    after = settle(pid, 2.0)
    return peak, len(closed_at), still, (max(closed_at) if closed_at else None), after


def idle(pid, port, m):
    socks = []
    for _ in range(m):
        socks.append(get(port, keep=True))
    held = settle(pid, 2.0)
    for s in socks:
        s.close()
    after = settle(pid, 2.0)
    return held, after


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.environ.get("BIN_DIR", "target/release"))
    p.add_argument("--slowloris", type=int, default=2000)
    p.add_argument("--idle", type=int, default=10000)
    p.add_argument("--trickle", type=float, default=2.0, help="seconds between header lines")
    p.add_argument("--limit", type=float, default=25.0, help="seconds to watch the slowloris connections")
    p.add_argument("--listener", choices=["inbound", "admin"], default="inbound",
                   help="where the clients connect: the inbound listener (proxied to the upstream) or admin (answered by the agent)")
    p.add_argument("--agent-arg", action="append", default=[])
    p.add_argument("--wrap", default="",
                   help="a command to run the agent under, e.g. 'heaptrack -o /tmp/idle' (RSS is then the wrapper's)")
    a = p.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    up_port, in_port, admin_port, out_port = (free_port() for _ in range(4))
    procs = []
    try:
        procs.append(subprocess.Popen(
            [f"{a.bin}/bulwark-upstream", "--listen", f"127.0.0.1:{up_port}", "--name", "app"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(up_port, "the upstream")
        agent = subprocess.Popen(
            [*a.wrap.split(), f"{a.bin}/bulwark-agent", "--control-plane", "http://127.0.0.1:1",
             "--inbound", f"127.0.0.1:{in_port}={up_port}",
             "--admin-addr", f"127.0.0.1:{admin_port}",
             "--outbound-addr", f"127.0.0.1:{out_port}", *a.agent_arg],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": "error"})
        procs.append(agent)
        wait_port(in_port, "the agent")
        if a.listener == "admin":
            in_port = admin_port
        for _ in range(200):
            get(in_port)
        base = settle(agent.pid)
        print(f"baseline (after 200 requests)         {mb(base)}")
        if a.slowloris:
            peak, closed, still, last, after = slowloris(agent.pid, in_port, a.slowloris, a.trickle, a.limit)
            when = f", the last {last:.1f} s after opening" if last is not None else ""
            print(f"{a.slowloris} slowloris connections open       {mb(peak)} (peak)")
            print(f"  closed by the agent: {closed}{when}; still open after {a.limit:.0f} s: {still}")
            print(f"  after they are gone                  {mb(after)} ({(after - base) / 1024:+.1f} MB)")
        if a.idle:
            base = settle(agent.pid)
            held, after = idle(agent.pid, in_port, a.idle)
            print(f"{a.idle} idle keep-alive connections     {mb(held)} ({(held - base) / 1024:+.1f} MB over {mb(base)})")
            print(f"  after the client closes them         {mb(after)}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
