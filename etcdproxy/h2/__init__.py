"""etcdproxy's own HTTP/2 + gRPC transport (DESIGN.md section 6): no grpcio on the data path.

Layers, each usable without the ones above it:
- ``frames``: RFC 9113 constants and frame builders (pure).
- ``hpackmemo``: HPACK decoding with the ``hpack`` library and a per-connection memo of header blocks (pure).
- ``grpcwire``: gRPC-over-HTTP/2 details: timeouts, status trailers, message framing, metadata (pure).
- ``server``: a sans-I/O server connection: bytes in (``receive``), bytes out (``take_output``), calls to an
  application object; no sockets, no event loop, no per-frame objects.
- ``rpc``: the gRPC call API handlers are written against (method handlers, context, status codes) and the
  dispatcher that runs them on an event loop.
- ``protocol``: the thin asyncio Protocol that drives a server connection (TLS, HTTP/1.1 sniffing, timers).
Nothing here knows about etcd.
"""
