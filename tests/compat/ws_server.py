"""A WebSocket echo server (the `websockets` library): every message, text or binary, comes
back as it was.

Usage: ws_server.py PORT (listens on 0.0.0.0:PORT)
"""
import asyncio
import sys

import websockets


async def echo(websocket, path=None):
    async for message in websocket:
        await websocket.send(message)


async def main():
    async with websockets.serve(echo, "0.0.0.0", int(sys.argv[1]), max_size=None):
        print(f"serving WebSocket echo on 0.0.0.0:{sys.argv[1]}", flush=True)
        await asyncio.Future()


asyncio.run(main())
