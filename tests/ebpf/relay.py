"""A minimal transparent TCP relay standing in for the gateway's transparent listener in the eBPF tests.

Listens on 0.0.0.0:PORT in the gateway namespace. For each connection it finds the original destination --
SO_ORIGINAL_DST (tc guard + nft redirect), else the eBPF ``cxe_origpeer`` map (process sandbox whose connect()
was rewritten) -- connects there and copies bytes both ways. Prints ``READY`` once listening and one JSON line
per connection (``{"peer": ..., "original": ..., "via": ...}``) to stdout.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80


def original_destination(conn: socket.socket) -> tuple[str, int, str] | None:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        ip = socket.inet_ntoa(raw[4:8])
        if (ip, port) != conn.getsockname():
            return ip, port, "so_original_dst"
    except OSError:
        pass
    import ebpf  # the test's interpreter: the project is installed in it

    with ebpf.Enforcer.open(create=False) as enf:
        found = enf.original_destination(peer=conn.getpeername())
    return (found.ip, found.port, "cxe_origpeer") if found else None


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def handle(conn: socket.socket) -> None:
    orig = original_destination(conn)
    print(
        json.dumps({"peer": list(conn.getpeername()), "original": orig and list(orig[:2]), "via": orig and orig[2]}),
        flush=True,
    )
    if orig is None:
        conn.close()
        return
    try:
        up = socket.create_connection(orig[:2], timeout=5)
    except OSError:
        conn.close()
        return
    threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
    pipe(up, conn)


def main() -> None:
    port = int(sys.argv[1])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    print("READY", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
