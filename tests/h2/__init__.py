"""HTTP/2 conformance and abuse tests of the proxy's client port (issue 11, notes/h2_contract.md).

* rawclient.py: a blocking raw-socket HTTP/2 client (struct framing, ``hpack``, optional TLS with ALPN)
  that can send anything, malformed frames included, and judges answers with h2spec's rule.
* test_rfc9113.py, test_http_semantics.py, test_rfc7541.py: h2spec's case list, section by section.
* test_grpc.py: gRPC over HTTP/2 (grpc's PROTOCOL-HTTP2) as grpc-go answers it.
* test_transport.py: what the contract fixes beyond the RFCs (SETTINGS, flow control towards the client,
  graceful GOAWAY, keepalive, HTTP/1.1 on the gRPC port).
* test_abuse.py: one test per abuse limit, with a well-behaved grpcio client's p99 measured meanwhile.
* test_fuzz.py: seeded random frames, header blocks and gRPC messages.

Run against the Go proxy with ``ETCDPROXY_TEST_IMPL=go``; the server answering is detected (``transport``
fixture: go, grpcio or h2). Where a reference server differs from the contract, each module's
``DEVIATIONS`` skips that case for that server only, with the observed behaviour as the reason.
"""
