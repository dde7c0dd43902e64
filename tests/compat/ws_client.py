"""A WebSocket client (the `websockets` library): opens ws://HOST:PORT/, sends text and binary
messages and checks each echo. Prints one line per check; exits 1 on the first that fails.

Usage: ws_client.py HOST:PORT
"""
import asyncio
import sys

import websockets


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        sys.exit(1)


async def main():
    url = f"ws://{sys.argv[1]}/"
    async with websockets.connect(url, open_timeout=10, max_size=None) as ws:
        check(True, f"connected to {url}")
        for i in range(20):
            await ws.send(f"text {i}")
            answer = await asyncio.wait_for(ws.recv(), 10)
            check(answer == f"text {i}", f"text echo {i}: {answer!r}")
        blob = bytes(range(256)) * 1024
        await ws.send(blob)
        answer = await asyncio.wait_for(ws.recv(), 10)
        check(answer == blob, f"binary echo of {len(blob)} bytes: {len(answer)} bytes")


try:
    asyncio.run(main())
except Exception as e:  # the library's handshake and connection errors
    print(f"FAIL {type(e).__name__}: {e}", flush=True)
    sys.exit(1)
