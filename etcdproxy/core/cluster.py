"""MemberList answers the proxy gives itself (with --advertise-client-url, as the Go proxy), registration
values. Pure."""

from __future__ import annotations

import json
from collections.abc import Iterable

from etcdproxy.etcdpb import rpc_pb2


def proxy_member_list(members: Iterable[tuple[str, str]]) -> bytes:
    """Serialized MemberListResponse listing proxies as (name, client URL) pairs.

    Like the Go proxy: no header, member ID 0, no peer URLs, never a learner, so clients that
    auto-sync their endpoints from MemberList move to the proxies instead of etcd members.
    """
    response = rpc_pb2.MemberListResponse(
        members=[rpc_pb2.Member(name=name, clientURLs=[url]) for name, url in members]
    )
    return response.SerializeToString()


# ---- registration under --resolver-prefix, byte-compatible with the Go proxy ------

_GO_HEX = "0123456789abcdef"


def go_json_string(text: str) -> str:
    """A JSON string exactly as Go's encoding/json writes it (HTML-safe: ``<>&`` escaped, so are
    U+2028/U+2029; other non-ASCII stays UTF-8), so registrations of both proxies are byte-equal."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or ch in "<>&":
            out.append("\\u00" + _GO_HEX[code >> 4] + _GO_HEX[code & 0xF])
        elif code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:  # not valid UTF-8: Go writes the replacement character
            out.append("\\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def registration_value(addr: str, hostname: str) -> bytes:
    """``{"Op":0,"Addr":"<addr>","Metadata":"{\\"name\\":\\"<hostname>\\"}"}``: clientv3's endpoints
    Update with Metadata a JSON *string* holding JSON (the Go proxy's register.go)."""
    metadata = '{"name":' + go_json_string(hostname) + "}"
    return ('{"Op":0,"Addr":' + go_json_string(addr) + ',"Metadata":' + go_json_string(metadata) + "}").encode()


def parse_registration(value: bytes) -> tuple[str, str] | None:
    """(name, addr) of a registration value, or None when it is not one we can list.

    Accepted like the Go proxy writes it; Metadata may also be a JSON object. Anything else
    (not JSON, no Addr, a Delete update, Metadata without a name object) is None: such entries
    are skipped, where the Go proxy fails the whole MemberList.
    """
    try:
        update = json.loads(value)
    except ValueError:
        return None
    if not isinstance(update, dict) or update.get("Op", 0) != 0:
        return None
    addr, metadata = update.get("Addr"), update.get("Metadata")
    if not isinstance(addr, str) or not addr:
        return None
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return None
    if not isinstance(metadata, dict):
        return None
    name = metadata.get("name", "")
    return (name, addr) if isinstance(name, str) else None
