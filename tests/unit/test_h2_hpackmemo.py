"""The HPACK memo is exactly as correct as a fresh decode (property test), and its classifier is exact."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from etcdproxy.h2.hpackmemo import DecodeError, MemoDecoder, OversizedError, leaves_table_unchanged

names = st.sampled_from([b":method", b":path", b"content-type", b"token", b"x-a", b"x-b", b"grpc-timeout", b"te"])
values = st.binary(min_size=0, max_size=40)
field = st.tuples(names, values, st.sampled_from(["index", "never", "plain"]))
header_list = st.lists(field, min_size=1, max_size=6)
# a step: a header list, how often it is repeated, whether Huffman is used, and an optional table size change
step = st.tuples(
    header_list, st.integers(1, 3), st.booleans(), st.one_of(st.none(), st.sampled_from([0, 64, 256, 4096]))
)


def _fields(raw: list[tuple[bytes, bytes, str]]) -> list[HeaderTuple]:
    out: list[HeaderTuple] = []
    for name, value, kind in raw:
        out.append(NeverIndexedHeaderTuple(name, value) if kind == "never" else HeaderTuple(name, value))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=12))
def test_memo_on_equals_memo_off(steps: list[tuple[list[tuple[bytes, bytes, str]], int, bool, int | None]]) -> None:
    encoder = Encoder()
    memo = MemoDecoder(1 << 20, memo=True)
    fresh = Decoder(max_header_list_size=1 << 20)
    for raw, repeat, huffman, table_size in steps:
        if table_size is not None:
            encoder.header_table_size = table_size  # the next block starts with a size update
        fields = _fields(raw)
        for _ in range(repeat):
            block = encoder.encode(fields, huffman=huffman)
            expected = [(bytes(k), bytes(v)) for k, v in fresh.decode(block, raw=True)]
            got = [(bytes(k), bytes(v)) for k, v in memo.decode(block)]
            assert got == expected


def test_memo_hits_for_a_repeated_all_indexed_block() -> None:
    encoder = Encoder()
    memo = MemoDecoder(1 << 16)
    fields = [(b":method", b"POST"), (b":path", b"/etcdserverpb.KV/Range"), (b"token", b"t")]
    first = encoder.encode(fields)
    assert not leaves_table_unchanged(first)  # it adds entries to the dynamic table
    memo.decode(first)
    again = encoder.encode(fields)  # now every field is indexed
    assert leaves_table_unchanged(again)
    assert memo.decode(again) == memo.decode(again)
    assert memo.hits == 1


@pytest.mark.parametrize(
    ("block", "unchanged"),
    [
        (b"\x82", True),  # indexed :method GET
        (b"\x04\x02/a", True),  # literal without indexing, indexed name :path
        (b"\x14\x02/a", True),  # never indexed
        (b"\x00\x01a\x01b", True),  # without indexing, literal name
        (b"\x44\x02/a", False),  # incremental indexing
        (b"\x20", False),  # table size update to 0
        (b"\x3f\xe1\x1f", False),  # table size update 4096
        (b"\x04\x05/a", False),  # cut literal: the decoder decides
        (b"\xff", False),  # cut integer
        (b"", True),
    ],
)
def test_classifier(block: bytes, unchanged: bool) -> None:
    assert leaves_table_unchanged(block) is unchanged


def test_bad_blocks_raise_and_are_not_memoized() -> None:
    memo = MemoDecoder(1 << 16)
    with pytest.raises(DecodeError):
        memo.decode(b"\xff\xff\xff\xff\xff\xff\x0f")  # index far beyond the tables
    assert not memo.memo


def test_hpack_bomb_stops_at_the_hard_limit() -> None:
    encoder = Encoder()
    big = [(b"x-big", b"v" * 3000)]
    memo = MemoDecoder(16 * 1024)
    memo.decode(encoder.encode(big))  # into the dynamic table
    bomb = encoder.encode(big * 40)  # 40 one-byte references to a 3 KB entry
    assert len(bomb) < 100
    with pytest.raises(OversizedError):
        memo.decode(bomb)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=24), st.builds(bytes, st.lists(st.integers(0x80, 0xC8), max_size=6)))))
def test_arbitrary_blocks_decode_like_the_library(blocks: list[bytes]) -> None:
    """Adversarial input: our decoder fails exactly when the library does, and otherwise returns the same list and
    leaves the same dynamic table (the next block is decoded against it)."""
    ours = MemoDecoder(4096, memo=False)
    library = Decoder(max_header_list_size=4096)
    for block in blocks:
        try:
            expected = [(bytes(k), bytes(v)) for k, v in library.decode(block, raw=True)]
        except Exception:
            with pytest.raises(DecodeError):
                ours.decode(block)
            return  # the connection ends at the first bad block
        got = [(bytes(k), bytes(v)) for k, v in ours.decode(block)]
        assert got == expected
        assert list(ours._decoder.header_table.dynamic_entries) == list(library.header_table.dynamic_entries)


def test_a_grpc_go_style_timeout_literal_is_decoded_and_indexed() -> None:
    encoder = Encoder()
    ours = MemoDecoder(1 << 16)
    library = Decoder()
    base = [(b":method", b"POST"), (b":path", b"/etcdserverpb.KV/Range"), (b"te", b"trailers")]
    for ms in (4999, 4998, 4999):
        block = encoder.encode([*base, (b"grpc-timeout", b"%dm" % ms)], huffman=True)
        assert ours.decode(block) == [(bytes(k), bytes(v)) for k, v in library.decode(block, raw=True)]
    assert ours.decode(block)[-1] == (b"grpc-timeout", b"4999m")
