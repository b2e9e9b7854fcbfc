"""Deterministic micro-benchmark of a worker's cost per cached unary call (issue 11), without sockets or load.

Pre-records what an h2load-like client sends (preface, SETTINGS, then HEADERS + DATA(END_STREAM) per call, HPACK
by the ``hpack`` library: indexed fields after the first call, ``:path`` and ``content-length`` as literals
without indexing like nghttp2) and feeds it to the real worker stack: ``H2Protocol.data_received`` with a fake
transport (``--layer proto``, the default) or ``ServerConnection.receive`` + ``take_output`` (``--layer conn``),
the real ``Dispatcher``, the instrumented ``RangeService`` inline hit and ``RangeCache``. Prints CPU us per call
(process time, best of ``--repeat``), so it is not disturbed much by other load on a shared machine.

    python bench/h2_micro.py                      # calls per read 1 and 4, both layers
    python bench/h2_micro.py --profile --k 4      # cProfile of the timed part, top functions by own time
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hpack import Encoder, HeaderTuple, NeverIndexedHeaderTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etcdproxy.config import Config
from etcdproxy.h2 import frames as f
from etcdproxy.h2.protocol import H2Protocol, Server, ServerOptions
from etcdproxy.h2.rpc import Dispatcher
from etcdproxy.h2.server import ServerConnection, Settings
from etcdproxy.worker.cache import RangeService
from etcdproxy.worker.instrument import instrument

PATH = b"/etcdserverpb.KV/Range"
KEY = b"bench/hot"
REQUEST = b"\x0a" + bytes((len(KEY),)) + KEY + b"\x38\x01"  # RangeRequest{key, serializable: true}
# RangeResponse{header{cluster_id, member_id, revision 3, raft_term}, kvs: one opaque 120-byte blob, count 1}
RESPONSE = b"\x0a\x08\x08\x01\x10\x02\x18\x03\x20\x04" + b"\x12\x78" + b"x" * 120 + b"\x20\x01"


def client_bytes(k: int, reads: int, timeout: bool = False) -> tuple[bytes, list[bytes]]:
    """The connection start, and ``reads`` chunks of ``k`` calls each (HEADERS, DATA with END_STREAM)."""
    first = (
        f.PREFACE
        + f.settings([(f.ENABLE_PUSH, 0), (f.INITIAL_WINDOW_SIZE, (1 << 30) - 1)])
        + f.window_update(0, 1 << 30)
        + f.SETTINGS_ACK
    )
    body = b"\x00" + len(REQUEST).to_bytes(4, "big") + REQUEST
    enc = Encoder()
    headers: list[Any] = [
        HeaderTuple(b":method", b"POST"),
        NeverIndexedHeaderTuple(b":path", PATH),
        HeaderTuple(b":scheme", b"http"),
        HeaderTuple(b":authority", b"127.0.0.1:2379"),
        HeaderTuple(b"accept", b"*/*"),
        HeaderTuple(b"accept-encoding", b"gzip, deflate"),
        HeaderTuple(b"user-agent", b"h2load nghttp2/1.52.0"),
        HeaderTuple(b"content-type", b"application/grpc"),
        HeaderTuple(b"te", b"trailers"),
        NeverIndexedHeaderTuple(b"content-length", str(len(body)).encode()),
    ]
    chunks: list[bytes] = []
    sid = 1
    for _ in range(reads):
        parts = []
        for _ in range(k):
            h = [*headers, HeaderTuple(b"grpc-timeout", b"%du" % (4999000 - sid))] if timeout else headers
            parts.append(f.frame(f.HEADERS, f.END_HEADERS, sid, enc.encode(h)))
            parts.append(f.frame(f.DATA, f.END_STREAM, sid, body))
            sid += 2
        chunks.append(b"".join(parts))
    return first, chunks


class FakeTransport:
    __slots__ = ("n", "writes")

    def __init__(self) -> None:
        self.n = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def range_stack(loop: asyncio.AbstractEventLoop) -> Dispatcher:
    """The worker's Range handler (instrumented RangeService with a filled cache) in a Dispatcher."""
    hub: Any = SimpleNamespace(epoch=1, loop=loop, handlers={}, on_new_epoch=[], on_gap=[])
    service = RangeService(hub, Config())
    service.cache.enable(1)
    if not service.cache.fill(service.cache.ticket(), "", REQUEST, KEY, b"", 0, RESPONSE):
        raise SystemExit("the cache refused the answer")
    handler = instrument("etcdserverpb.KV", "Range", service.handler())
    return Dispatcher({PATH.decode(): handler}, loop)


def run_once(layer: str, k: int, reads: int, timeout: bool, profile: cProfile.Profile | None) -> float:
    loop = asyncio.get_running_loop()
    dispatcher = range_stack(loop)
    first, chunks = client_bytes(k, reads + 1, timeout)
    settings = Settings()
    out = 0
    if layer == "proto":
        server = Server(dispatcher, ServerOptions(settings), loop)
        proto = H2Protocol(server)
        transport = FakeTransport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        feed = proto.data_received
        feed(first)
        feed(chunks[0])  # fills the client's dynamic table: not timed
    else:
        conn = ServerConnection(dispatcher, settings, loop.time(), lambda: None)
        now = loop.time()

        def feed(data: bytes) -> None:
            conn.receive(data, now)
            nonlocal out
            out += len(conn.take_output())

        feed(first)
        feed(chunks[0])
    gc.collect()
    gc.disable()
    try:
        if profile is not None:
            profile.enable()
        t0 = time.process_time()
        for chunk in chunks[1:]:
            feed(chunk)
        dt = time.process_time() - t0
        if profile is not None:
            profile.disable()
    finally:
        gc.enable()
    if layer == "proto":
        out = transport.n
        if proto.conn is None or proto.conn.closed or proto.conn.streams:
            raise SystemExit(f"connection state wrong after the run: {proto.conn and proto.conn.close_reason}")
    if out < reads * k * len(RESPONSE):
        raise SystemExit(f"only {out} bytes written for {reads * k} calls: not answered from the cache?")
    return dt / (reads * k) * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", choices=("proto", "conn", "both"), default="both")
    ap.add_argument("--k", type=int, nargs="*", default=[1, 4], help="calls per read (default 1 4)")
    ap.add_argument("--calls", type=int, default=40000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--timeout", action="store_true", help="each call carries a distinct grpc-timeout")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    layers = ("proto", "conn") if args.layer == "both" else (args.layer,)
    for layer in layers:
        for k in args.k:
            reads = max(1, args.calls // k)
            if args.profile:
                prof = cProfile.Profile()
                run_once(layer, k, reads, args.timeout, prof)
                print(f"--- profile: layer {layer}, {k} calls per read")
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                continue
            best = min(run_once(layer, k, reads, args.timeout, None) for _ in range(args.repeat))
            print(f"layer {layer:5} calls/read {k}: {best:.2f} us CPU per cached call (best of {args.repeat})")


if __name__ == "__main__":
    asyncio.run(main())
