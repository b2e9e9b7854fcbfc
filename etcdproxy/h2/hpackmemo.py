"""HPACK decoding (RFC 7541) with the ``hpack`` library, plus a per-connection memo of header blocks.

Pure-Python HPACK decoding costs 20-30 us a block, more than everything else a cached call does. Clients repeat
the same header block call after call (grpcio and grpc-go send all-indexed blocks after the first call; nghttp2
sends ``:path`` as a literal without indexing), so a decoded block is remembered by its bytes.

Invariant that makes the memo exactly as correct as a fresh decode: a block's decoded value depends only on its
bytes and the dynamic table, so an entry is valid while the dynamic table is unchanged since it was stored.
Hence: only blocks whose decoding cannot change the table are stored (no literal with incremental indexing, no
table size update), and any block that can change it clears the memo before it is decoded. A block that fails to
decode is never stored (the connection ends with a COMPRESSION_ERROR anyway).
"""

from __future__ import annotations

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.huffman_table import decode_huffman

Headers = list[tuple[bytes, bytes]]

MEMO_ENTRIES = 256
# Huffman-decoded strings by their encoded bytes, shared by every connection of the process (a string's
# decoding depends on nothing else): grpc-go sends each new grpc-timeout value as a Huffman literal
HUFFMAN_ENTRIES = 4096
_huffman: dict[bytes, bytes] = {}


class DecodeError(Exception):
    """The block cannot be decoded: a connection error (COMPRESSION_ERROR)."""


class OversizedError(DecodeError):
    """Decoding passed the hard header-list limit (an HPACK bomb): a connection error (ENHANCE_YOUR_CALM)."""


def _integer(block: bytes, i: int, prefix_mask: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) starting at ``block[i]`` -> (value, next index). IndexError if cut."""
    value = block[i] & prefix_mask
    i += 1
    if value < prefix_mask:
        return value, i
    shift = 0
    while True:
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
        if shift > 28:  # no sane header block needs it; let the decoder report the error
            raise IndexError


def leaves_table_unchanged(block: bytes) -> bool:
    """True when decoding ``block`` cannot modify the dynamic table: it holds only indexed fields and literals
    without indexing / never indexed (RFC 7541 6.1, 6.2.2, 6.2.3). False for literals with incremental indexing
    (6.2.1), dynamic table size updates (6.3) and anything malformed (the decoder then decides)."""
    i, n = 0, len(block)
    try:
        while i < n:
            byte = block[i]
            if byte & 0x80:  # indexed field
                _, i = _integer(block, i, 0x7F)
                continue
            if byte & 0xE0:  # 01xxxxxx incremental indexing, 001xxxxx table size update
                return False
            index, i = _integer(block, i, 0x0F)  # 0000xxxx / 0001xxxx: without indexing / never indexed
            if index == 0:
                length, i = _integer(block, i, 0x7F)
                i += length
            length, i = _integer(block, i, 0x7F)
            i += length
    except IndexError:
        return False
    return i == n


def header_list_size(headers: Headers) -> int:
    """RFC 9113 6.5.2: the sum of name and value lengths plus 32 per field."""
    return sum(len(k) + len(v) + 32 for k, v in headers)


def _string(block: bytes, i: int) -> tuple[bytes, int]:
    """An HPACK string literal (RFC 7541 5.2) at ``block[i]`` -> (bytes, next index). IndexError if cut."""
    huffman = block[i] & 0x80
    length, i = _integer(block, i, 0x7F)
    end = i + length
    if end > len(block):
        raise IndexError
    raw = block[i:end]
    if not huffman:
        return raw, end
    text = _huffman.get(raw)
    if text is None:
        text = decode_huffman(raw)
        if len(_huffman) >= HUFFMAN_ENTRIES:
            _huffman.clear()
        _huffman[raw] = text
    return text, end


class MemoDecoder:
    """One connection's HPACK decoder. ``decode(block)`` returns the header list (bytes pairs); the list returned
    for a memo hit is the same object as before, so callers must not mutate it."""

    __slots__ = ("_decoder", "hits", "memo", "memo_enabled")

    def __init__(self, hard_limit: int, memo: bool = True) -> None:
        # the library raises once the decoded list passes this: an HPACK bomb never grows past it
        self._decoder = Decoder(max_header_list_size=hard_limit)
        self.memo: dict[bytes, Headers] = {}
        self.memo_enabled = memo
        self.hits = 0

    def decode(self, block: bytes) -> Headers:
        memo = self.memo
        headers = memo.get(block)
        if headers is not None:
            self.hits += 1
            return headers
        keep = self.memo_enabled and leaves_table_unchanged(block)
        if not keep and memo:
            memo.clear()  # the table may change: every remembered decode may be wrong from here on
        try:
            headers = self._decode(block)
        except OversizedHeaderListError as exc:
            raise OversizedError(str(exc)) from exc
        except (HPACKError, ValueError, IndexError, TypeError) as exc:
            raise DecodeError(str(exc) or type(exc).__name__) from exc
        if keep:
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[bytes(block)] = headers
        return headers

    def _decode(self, block: bytes) -> Headers:
        """The library's decode, except for the common blocks (indexed fields and literals, no table size update),
        decoded here against the library's own table: same result and same table changes, without its per-field
        objects, and with Huffman strings remembered (the library takes ~30 us for a grpc-go block whose only
        new field is a grpc-timeout literal). Anything unusual or malformed goes to the library, which decides."""
        decoder = self._decoder
        table = decoder.header_table
        limit = decoder.max_header_list_size
        headers: Headers = []
        size = 0
        i, n = 0, len(block)
        try:
            while i < n:
                byte = block[i]
                if byte & 0x80:  # indexed field (6.1)
                    index, i = _integer(block, i, 0x7F)
                    if index == 0:
                        raise IndexError
                    name, value = table.get_by_index(index)
                elif byte & 0x40 or not byte & 0x20:  # literal with (6.2.1) or without (6.2.2, 6.2.3) indexing
                    index, i = _integer(block, i, 0x3F if byte & 0x40 else 0x0F)
                    if index:
                        name = table.get_by_index(index)[0]
                    else:
                        name, i = _string(block, i)
                    value, i = _string(block, i)
                    if byte & 0x40:
                        table.add(name, value)
                else:  # a dynamic table size update (6.3): the library's rules
                    if i:
                        raise IndexError
                    return decoder.decode(block, raw=True)  # type: ignore[return-value]
                headers.append((name, value))
                size += len(name) + len(value) + 32
                if size > limit:
                    raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
        except (IndexError, HPACKError) as exc:
            if isinstance(exc, OversizedHeaderListError):
                raise
            # nothing was added to the table before the failing field can matter: the connection ends now
            raise DecodeError(str(exc) or "Truncated header block") from exc
        return headers
