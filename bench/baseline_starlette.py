"""The baseline for claim throughput: uvicorn[standard] + Starlette serving the claim, one fsync per request.

The original system's stack: an ASGI app whose claim endpoint applies the same
``claim`` command to the same SQLite queue through ``JobStore.execute`` (its own
transaction, so one fsync per claim with synchronous=FULL). The endpoint is
``async`` and calls the store on the event loop: requests are applied one at a
time, as the single SQLite writer would apply them anyway, with no thread hops.

    python bench/baseline_starlette.py --db QUEUE.sqlite3 --port-file FILE
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from cis490fleet.errors import FleetError, http_status  # noqa: E402
from cis490fleet.jobstore import JobStore  # noqa: E402


def make_app(db_path: str, synchronous: str = "FULL") -> Starlette:
    store = JobStore(db_path, synchronous=synchronous)

    async def claim(request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        try:
            result = store.execute({"op": "claim", "now": time.time(), "host": request.headers["x-lab-host"],
                                    "capability": body.get("capability") or {}, "lease": secrets.token_hex(16)})
        except FleetError as err:
            return JSONResponse({"error": err.code, "detail": err.detail}, status_code=http_status(err))
        return JSONResponse(result)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        store.close()

    return Starlette(routes=[Route("/v1/job/claim", claim, methods=["POST"]), Route("/v1/health", health)],
                     lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--synchronous", default="FULL")
    args = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(make_app(args.db, args.synchronous), loop="uvloop", http="httptools",
                            lifespan="on", log_level="warning", access_log=False, backlog=1024)
    server = uvicorn.Server(config)
    Path(args.port_file).write_text(f"http://127.0.0.1:{sock.getsockname()[1]}\n")
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
