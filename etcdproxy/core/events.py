"""The watch event as the hub hands it to workers; ipc/schema.py encodes it, core never imports ipc."""

from __future__ import annotations

# [mod_revision, is_delete, bytes with prev_kv, bytes without]: the serialized mvccpb.Event twice,
# so the worker never decodes and never re-encodes events.
WireEvent = tuple[int, bool, bytes, bytes]
