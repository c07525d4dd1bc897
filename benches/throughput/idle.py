#!/usr/bin/env python3
"""Helpers for run.sh's idle-memory measurement (loopback only).

  idle.py echo PORT
      A TCP echo server on 127.0.0.1:PORT.
  idle.py hold PORT COUNT BYTES [BUSY]
      Opens COUNT connections to 127.0.0.1:PORT; on each sends BYTES and reads the
      same BYTES back (so each carries BYTES each way), at most BUSY connections at a
      time (default 200). Then prints "idle" and keeps every connection open, silent,
      until its stdin closes.
"""
import asyncio
import sys


async def echo(port):
    async def serve(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


async def hold(port, count, size, busy):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    gate = asyncio.Semaphore(busy)
    streams = []

    async def one():
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            await writer.drain()
            back = await reader.readexactly(size)
            if back != payload:
                raise RuntimeError("the echo differs from what was sent")
            streams.append(writer)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        print(f"{len(failed)} of {count} connections failed: {failed[0]!r}", file=sys.stderr)
        sys.exit(1)
    print("idle", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in streams:
        writer.close()


def main():
    mode = sys.argv[1]
    if mode == "echo":
        asyncio.run(echo(int(sys.argv[2])))
    elif mode == "hold":
        busy = int(sys.argv[5]) if len(sys.argv) > 5 else 200
        asyncio.run(hold(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), busy))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
