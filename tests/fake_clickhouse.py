"""A stand-in for a ClickHouse server that refuses our password, as a real one does over HTTP (no modern ClickHouse
server installs here: see DESIGN.md). Used for the wrong-password start-up and `tagway config check`."""
from __future__ import annotations

from aiohttp import web

from tests.http_server import ThreadedServer

AUTH_FAILED = ("Code: 516. DB::Exception: tagway: Authentication failed: password is incorrect, or there is no user "
               "with such name. (AUTHENTICATION_FAILED) (version 25.8.1.1 (official build))\n")


class WrongPasswordClickHouse(ThreadedServer):
    """Answers every request with HTTP 516 and ClickHouse's AUTHENTICATION_FAILED text."""

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.deny)

    async def deny(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=516, text=AUTH_FAILED, headers={"X-ClickHouse-Exception-Code": "516"})

    def dsn(self, password: str = "wrong-password") -> str:
        return f"http://tagway:{password}@127.0.0.1:{self.port}/tagway"
