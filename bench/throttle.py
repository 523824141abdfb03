#!/usr/bin/env python3
"""A TCP relay on 127.0.0.1 that paces the bytes it carries to a link's
rate: one token bucket per direction, shared by every connection (a link
is one pipe), refilled at RATE bytes per second with a burst of 64 KiB.
It prints its port, then counts the bytes it carried each way into
STATS_FILE (updated as it goes: `to_client to_server`).

Usage: throttle.py TARGET_PORT RATE_BYTES_PER_SEC STATS_FILE
"""

import asyncio
import sys
import time

BURST = 64 * 1024
CHUNK = 16 * 1024


class Bucket:
    def __init__(self, rate):
        self.rate = rate
        self.tokens = BURST
        self.at = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n):
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(BURST, self.tokens + (now - self.at) * self.rate)
                self.at = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


async def main():
    target_port, rate, stats_file = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    down, up = Bucket(rate), Bucket(rate)
    carried = {"to_client": 0, "to_server": 0}

    def save():
        with open(stats_file, "w") as f:
            f.write(f"{carried['to_client']} {carried['to_server']}\n")

    async def pipe(reader, writer, bucket, key):
        try:
            while data := await reader.read(CHUNK):
                await bucket.take(len(data))
                writer.write(data)
                await writer.drain()
                carried[key] += len(data)
                save()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def relay(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(
            pipe(server_reader, client_writer, down, "to_client"),
            pipe(client_reader, server_writer, up, "to_server"),
        )

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    save()
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
