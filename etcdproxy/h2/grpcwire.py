"""gRPC over HTTP/2 (grpc's PROTOCOL-HTTP2 document): the pieces that are pure functions of bytes.

Response header blocks are constant bytes: they use static-table indexes and literals without indexing only,
so they need no HPACK encoder state, and every response on every connection can share them.
"""

from __future__ import annotations

import base64
import gzip
import zlib
from dataclasses import dataclass

# ---- HPACK encoding of our own (static table + literals without indexing, no Huffman) ------------------


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A literal field without indexing with a literal name (RFC 7541 6.2.2), no Huffman."""
    return b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value


def literal_indexed_name(index: int, value: bytes) -> bytes:
    """A literal field without indexing whose name is static-table entry ``index``."""
    return _integer(index, 4, 0) + _integer(len(value), 7, 0) + value


STATUS_200 = b"\x88"  # static table 8: ":status: 200"
CONTENT_TYPE_GRPC = literal_indexed_name(31, b"application/grpc")  # 31: content-type
RESPONSE_HEADERS = STATUS_200 + CONTENT_TYPE_GRPC
TRAILER_OK = literal(b"grpc-status", b"0")


def http_status(status: int) -> bytes:
    return literal_indexed_name(8, str(status).encode())  # 8: :status


# ---- status ------------------------------------------------------------------------------------------

_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def percent_encode(message: str) -> bytes:
    """grpc-message encoding: UTF-8, then every byte outside 0x20-0x7E, and '%', as %XX."""
    raw = message.encode("utf-8", "surrogateescape")
    if all(b in _UNRESERVED for b in raw):
        return raw
    return b"".join(bytes((b,)) if b in _UNRESERVED else b"%%%02X" % b for b in raw)


def percent_decode(value: bytes) -> str:
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == 0x25 and i + 2 < n:
            try:
                out.append(int(value[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(c)
        i += 1
    return out.decode("utf-8", "replace")


def status_fields(code: int, message: str) -> bytes:
    block = literal(b"grpc-status", str(code).encode())
    if message:
        block += literal(b"grpc-message", percent_encode(message))
    return block


def trailers(code: int, message: str) -> bytes:
    """The trailer block ending a call whose response headers were sent."""
    if code == 0 and not message:
        return TRAILER_OK
    return status_fields(code, message)


def trailers_only(code: int, message: str, status: int = 200) -> bytes:
    """One HEADERS block that is the whole response (an error before any message)."""
    head = STATUS_200 if status == 200 else http_status(status)
    return head + CONTENT_TYPE_GRPC + status_fields(code, message)


# ---- grpc-timeout ------------------------------------------------------------------------------------

_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}


def parse_timeout(value: bytes) -> float:
    """``grpc-timeout`` (1-8 ASCII digits and a unit) -> seconds. ValueError when malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        raise ValueError(f"timeout string is too short or malformed: {value.decode('latin-1')!r}")
    unit = _UNITS.get(value[-1])
    if unit is None:
        raise ValueError(f"timeout unit is not recognized: {value.decode('latin-1')!r}")
    return int(value[:-1]) * unit


# ---- metadata ----------------------------------------------------------------------------------------


def metadata_value(name: bytes, value: bytes) -> str | bytes:
    """A custom metadata value as handlers see it: ``-bin`` values base64-decoded (padded or not)."""
    if name.endswith(b"-bin"):
        try:
            return base64.b64decode(value + b"=" * (-len(value) % 4))
        except ValueError:
            return b""
    return value.decode("latin-1")


# ---- compression -------------------------------------------------------------------------------------

SUPPORTED_ENCODINGS = (b"identity", b"gzip")


class MessageTooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"grpc: received message larger than max ({size} vs. {limit})")


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress one gzip message, refusing output above ``limit`` without inflating it all (zip bombs)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, limit + 1)
    if len(out) > limit:
        raise MessageTooLarge(len(out), limit)
    if not d.eof:
        raise gzip.BadGzipFile("truncated gzip message")
    return out


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What a request's header block means, computed once per distinct block (memoized with the decode).

    ``error``: None, or (http status, grpc code, message) for a trailers-only answer, or (0, 0, "") for a
    malformed request (RST_STREAM PROTOCOL_ERROR)."""

    path: str
    timeout_s: float | None
    encoding: bytes
    content_length: int | None
    metadata: tuple[tuple[str, str | bytes], ...]
    error: tuple[int, int, str] | None
    oversized: bool = False


# ---- request header validation (RFC 9113 8.2 and 8.3, then gRPC's rules) ------------------------------

_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
_CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
_NOT_METADATA = frozenset((b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"))
MALFORMED = (0, 0, "")

# grpc codes used here (numbers from grpc's status codes)
INTERNAL, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED = 13, 3, 8, 12


_DELIMITERS = frozenset(b'(),/:;<=>?@[\\]{}"')
# the bytes a request header name may hold: lowercase token characters (RFC 9110 5.1, RFC 9113 8.2.1)
_NAME_BYTES = bytes(b for b in range(0x21, 0x7F) if b not in _DELIMITERS and not 0x41 <= b <= 0x5A)
_NAME_CACHE: dict[bytes, bool] = {}  # names seen (few distinct per process); bounded by clearing


def _valid_name(name: bytes) -> bool:
    # translate() deletes every allowed byte: anything left is not allowed
    ok = _NAME_CACHE.get(name)
    if ok is None:
        ok = bool(name) and not name.translate(None, _NAME_BYTES)
        if len(_NAME_CACHE) >= 1024:
            _NAME_CACHE.clear()
        _NAME_CACHE[name] = ok
    return ok


def _valid_value(value: bytes) -> bool:
    # no NUL, CR or LF, no leading or trailing SP / HTAB (RFC 9113 8.2.1); bytes methods, not a loop per byte
    return value.strip(b" \t") == value and len(value.translate(None, b"\x00\r\n")) == len(value)


def request_head(headers: list[tuple[bytes, bytes]], max_list_size: int) -> RequestHead:
    """Validate a request header list and extract what a gRPC call needs."""
    method = path = scheme = content_type = timeout = None
    encoding = b"identity"
    content_length: int | None = None
    seen: set[bytes] = set()
    regular = False
    metadata: list[tuple[str, str | bytes]] = []
    size = 0
    malformed = False
    for name, value in headers:
        size += len(name) + len(value) + 32
        if name[:1] == b":":
            if regular or name not in _REQUEST_PSEUDO or name in seen:
                malformed = True
                break
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":scheme":
                scheme = value
            continue
        regular = True
        if not _valid_name(name) or name in _CONNECTION_SPECIFIC or not _valid_value(value):
            malformed = True
            break
        if name == b"te":
            if value != b"trailers":
                malformed = True
                break
        elif name == b"content-type":
            content_type = value
        elif name == b"grpc-timeout":
            timeout = value
        elif name == b"grpc-encoding":
            encoding = value
        elif name == b"content-length":
            if not value.isdigit() or content_length is not None:
                malformed = True
                break
            content_length = int(value)
        if name not in _NOT_METADATA:
            metadata.append((name.decode("latin-1"), metadata_value(name, value)))
    text_path = path.decode("latin-1") if path else ""
    if malformed or method is None or scheme is None or not path:
        return RequestHead(text_path, None, encoding, content_length, (), MALFORMED)
    if size > max_list_size:
        message = f"grpc: received header list larger than max ({size} vs. {max_list_size})"
        return RequestHead(text_path, None, encoding, content_length, (), (200, RESOURCE_EXHAUSTED, message), True)
    if method != b"POST":
        message = f"Received a HEADERS frame with :method {method.decode('latin-1')!r} which should be POST"
        return RequestHead(text_path, None, encoding, content_length, (), (405, INTERNAL, message))
    if content_type is None or not (
        content_type == b"application/grpc" or content_type[:17] in (b"application/grpc+", b"application/grpc;")
    ):
        shown = (content_type or b"").decode("latin-1")
        message = f'invalid gRPC request content-type "{shown}"'
        return RequestHead(text_path, None, encoding, content_length, (), (415, INVALID_ARGUMENT, message))
    if encoding not in SUPPORTED_ENCODINGS:
        # grpc-go refuses an unknown grpc-encoding from the header alone, compressed message or not
        message = f'grpc: Decompressor is not installed for grpc-encoding "{encoding.decode("latin-1")}"'
        return RequestHead(text_path, None, encoding, content_length, (), (200, UNIMPLEMENTED, message))
    timeout_s = None
    if timeout is not None:
        try:
            timeout_s = parse_timeout(timeout)
        except ValueError as exc:
            message = f"transport: malformed grpc-timeout: {exc}"
            return RequestHead(text_path, None, encoding, content_length, (), (200, INTERNAL, message))
    return RequestHead(text_path, timeout_s, encoding, content_length, tuple(metadata), None)


# ---- client side (requests we send) ------------------------------------------------------------------

_MAX_TIMEOUT_VALUE = 99_999_999  # grpc-timeout allows at most 8 digits
_TIMEOUT_UNITS = ((1, b"n"), (1_000, b"u"), (1_000_000, b"m"), (1_000_000_000, b"S"), (60_000_000_000, b"M"))


def encode_timeout(seconds: float) -> bytes:
    """A timeout as grpc-go's encodeTimeout writes it: the finest unit whose value (rounded up) fits 8 digits."""
    ns = round(seconds * 1e9)
    if ns <= 0:
        return b"0n"
    for size, unit in _TIMEOUT_UNITS:
        value = -(-ns // size)
        if value <= _MAX_TIMEOUT_VALUE:
            return b"%d%s" % (value, unit)
    return b"%dH" % -(-ns // 3_600_000_000_000)


def metadata_field(name: str, value: str | bytes) -> bytes:
    """One custom metadata entry as a literal field: ``-bin`` values base64 without padding (as grpc-go sends)."""
    key = name.encode("latin-1")
    if key.endswith(b"-bin"):
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        data = base64.b64encode(raw).rstrip(b"=")
    else:
        data = value if isinstance(value, bytes) else value.encode("latin-1")
    return literal(key, data)
