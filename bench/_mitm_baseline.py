"""Bare mitmproxy, the gateway benchmark's baseline: `python -m bench._mitm_baseline --listen-port N ...`.

The same mitmproxy, assembled like gateway/server.py (a `Master` with the same curated addons and the same
options: regular mode, lazy connection strategy, upstream TLS verified against certifi + the bench CA), minus the
EgressAddon. The bench names are in no DNS, so `--map NAME=IP` answers them in `socket.getaddrinfo`, like an
/etc/hosts entry would: mitmproxy resolves and dials them as it would any name, and keeps its upstream
connections keyed by that name (see bench/README.md on why the address is not rewritten in `server_connect`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from typing import Any

from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master


def static_hosts(mapping: dict[str, str]) -> None:
    """Answer the names in `mapping` from it (an /etc/hosts for this process); everything else as before."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, bytes):
            host = host.decode("idna")
        return real(mapping.get(host, host), *args, **kwargs)

    socket.getaddrinfo = getaddrinfo


async def _main(args: argparse.Namespace) -> None:
    static_hosts(dict(m.split("=", 1) for m in args.map))
    opts = options.Options()
    master = Master(opts, event_loop=asyncio.get_running_loop(), with_termlog=False)
    master.addons.add(  # type: ignore[no-untyped-call]
        core.Core(),
        disable_h2c.DisableH2C(),
        proxyserver.Proxyserver(),  # type: ignore[no-untyped-call]
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
    )
    opts.update(  # type: ignore[no-untyped-call]
        mode=["regular"],
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        confdir=args.confdir,
        connection_strategy="lazy",
        ssl_insecure=False,
        ssl_verify_upstream_trusted_ca=args.upstream_trust,
        # Passthrough (mitmproxy's own splice) for these hosts: the splice bench's reference for what the relay
        # itself costs, without our addon.
        ignore_hosts=args.ignore_host,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--listen-port", type=int, required=True)
    p.add_argument("--confdir", required=True, help="holds mitmproxy-ca.pem, the interception CA")
    p.add_argument("--upstream-trust", required=True, help="CA bundle for verifying upstreams")
    p.add_argument("--map", action="append", default=[], help="NAME=IP, repeatable")
    p.add_argument("--ignore-host", action="append", default=[], help="regex of hosts passed through, repeatable")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
