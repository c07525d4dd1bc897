"""TCP client of the container test, against lb in front of lb-test-worker (HELLO=1: each
connection first gets `id=<slot> pid=<pid> ...`, then every byte is echoed).

  client.py hello HOST:PORT            one connection: print its hello line, check the echo
  client.py refused HOST:PORT SECONDS  exit 0 once a new connection is refused (lb stopped
                                       listening), 1 if it is still accepted at the deadline
  client.py hold HOST:PORT READY GO    open a connection, check an echo, create the file
                                       READY, wait for the file GO, then check a second echo
                                       and close; exit 1 if the connection was reset or cut

Exit codes and stdout are the interface; every failure is one line on stderr.
"""

import os
import socket
import sys
import time

TIMEOUT = 10.0


def address(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def connect(addr):
    sock = socket.create_connection(addr, timeout=TIMEOUT)
    hello = b""
    while not hello.endswith(b"\n"):
        chunk = sock.recv(512)
        if not chunk:
            raise ConnectionError(f"closed before the hello line, got {hello!r}")
        hello += chunk
    return sock, hello.decode().strip()


def echo(sock, payload):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            raise ConnectionError(f"closed after {got!r} of the echo of {payload!r}")
        got += chunk
    if got != payload:
        raise ConnectionError(f"echo: sent {payload!r}, got {got!r}")


def hello(addr):
    sock, line = connect(addr)
    with sock:
        echo(sock, b"ping\n")
    print(line)


def refused(addr, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(addr, timeout=1.0).close()
        except ConnectionRefusedError:
            return
        except OSError:
            # A timeout or reset is not yet the refusal that a closed listener gives.
            pass
        time.sleep(0.05)
    sys.exit(f"connections to {addr[0]}:{addr[1]} still accepted after {seconds} s")


def hold(addr, ready, go):
    sock, line = connect(addr)
    with sock:
        echo(sock, b"before\n")
        print(line, flush=True)
        open(ready, "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                sys.exit(f"no {go} within 120 s")
            time.sleep(0.05)
        echo(sock, b"after the stop began\n")
        # The whole exchange is done: close our side and expect lb's orderly close too.
        sock.shutdown(socket.SHUT_WR)
        rest = sock.recv(512)
        if rest:
            sys.exit(f"unexpected bytes after the echo: {rest!r}")


def main():
    try:
        cmd, addr = sys.argv[1], address(sys.argv[2])
        if cmd == "hello":
            hello(addr)
        elif cmd == "refused":
            refused(addr, float(sys.argv[3]))
        elif cmd == "hold":
            hold(addr, sys.argv[3], sys.argv[4])
        else:
            sys.exit(f"unknown command {cmd}")
    except (OSError, ValueError, IndexError) as err:
        sys.exit(f"client.py {' '.join(sys.argv[1:2])}: {err!r}")


if __name__ == "__main__":
    main()
