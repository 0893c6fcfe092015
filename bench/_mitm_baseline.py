"""Bare mitmproxy, the gateway benchmark's baseline: `python -m bench._mitm_baseline --listen-port N ...`.

The same mitmproxy, assembled like gateway/server.py (a `Master` with the same curated addons and the same
options: regular mode, lazy connection strategy, upstream TLS verified against certifi + the bench CA), minus the
EgressAddon. One tiny addon stands in for the gateway's resolver: it points the bench names at 127.0.0.1 in
`server_connect`, as the gateway's pinning does, since those names are in no DNS.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy import server_hooks


class PinHosts:
    """Dial the bench names at fixed addresses (what the gateway's static resolver answers and pins)."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if address is not None and address[0] in self.mapping:
            data.server.address = (self.mapping[address[0]], address[1])


async def _main(args: argparse.Namespace) -> None:
    mapping = dict(m.split("=", 1) for m in args.map)
    opts = options.Options()
    master = Master(opts, event_loop=asyncio.get_running_loop(), with_termlog=False)
    master.addons.add(
        core.Core(),
        disable_h2c.DisableH2C(),
        PinHosts(mapping),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
    )
    opts.update(
        mode=["regular"],
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        confdir=args.confdir,
        connection_strategy="lazy",
        ssl_insecure=False,
        ssl_verify_upstream_trusted_ca=args.upstream_trust,
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
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
