"""An echo server that negotiates permessage-deflate, for the Autobahn
compression cases (12.x, 13.x) through a limited route: wsproxy then checks
compressed messages by inflating them as they pass, and the suite shows
whether anything about them changes on the way.

    python deflate_echo.py PORT
"""

import asyncio
import sys

from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def main(port: int) -> None:
    async with serve(echo, "127.0.0.1", port, max_size=None, compression="deflate"):
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
