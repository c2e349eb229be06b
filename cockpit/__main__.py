"""``python -m cockpit --api http://127.0.0.1:8080 --port 5006 [--token T]``: serve both cockpits."""

from __future__ import annotations

import argparse
import logging

from cockpit.app import TOKEN_ENV, serve
from cockpit.data import REFRESH_S


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve ``/bigscreen`` and ``/cockpit`` until stopped."""
    parser = argparse.ArgumentParser(prog="python -m cockpit", description=__doc__)
    parser.add_argument("--api", default="http://127.0.0.1:8080", help="base URL of the CarbonOS server")
    parser.add_argument("--port", type=int, default=5006, help="port of the cockpit pages")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--token", default=None, help=f"kiosk token of the big screen (default ${TOKEN_ENV})")
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="host:port browsers open the pages from (repeatable; default this address and localhost)",
    )
    parser.add_argument("--refresh-s", type=float, default=REFRESH_S, help="REST poll period in seconds")
    args = parser.parse_args(argv)
    if args.port <= 0 or args.port > 65535:
        parser.error("--port: must be within [1, 65535]")
    if args.refresh_s < 1:
        parser.error("--refresh-s: must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(
        args.api,
        port=args.port,
        address=args.address,
        token=args.token,
        allow_origins=args.allow_origin,
        refresh_s=args.refresh_s,
    )


if __name__ == "__main__":
    main()
