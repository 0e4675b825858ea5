"""The shard record: a JSON header and the raw media bytes, nothing that can run code when read.

  record = b"HICOREC1" + uint32 little-endian header length + header (UTF-8 JSON) + media bytes

The header holds the annotation (id, conversations, optional start/end seconds, media type, source path,
dataset name); the media is the video file exactly as it was on disk (compressed mp4 etc.). Storing the
compressed file rather than decoded frames keeps shards ~100x smaller and lets each training stage sample
its own frame count; docs/data.md has the throughput that justifies it.
"""

from __future__ import annotations

import json
import struct

MAGIC = b"HICOREC1"
_LENGTH = struct.Struct("<I")
MEDIA_TYPES = ("video", "image", "text")


class RecordError(ValueError):
  """A record that cannot be parsed; the message says what is wrong."""


def encode_record(header: dict, media: bytes | None = None) -> bytes:
  if header.get("media_type") not in MEDIA_TYPES:
    raise RecordError(f"record {header.get('id')!r}: media_type must be one of {MEDIA_TYPES}")
  body = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  return MAGIC + _LENGTH.pack(len(body)) + body + (media or b"")


def decode_record(data: bytes) -> tuple[dict, bytes]:
  """(header, media bytes) of a record; RecordError if it is not one."""
  if not data.startswith(MAGIC):
    raise RecordError(f"not a hico record (first bytes {bytes(data[:8])!r})")
  start = len(MAGIC) + _LENGTH.size
  if len(data) < start:
    raise RecordError("record truncated inside its header length")
  (length,) = _LENGTH.unpack_from(data, len(MAGIC))
  if len(data) < start + length:
    raise RecordError(f"record truncated: header says {length} bytes, {len(data) - start} present")
  try:
    header = json.loads(bytes(data[start:start + length]).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RecordError(f"record header is not valid JSON: {e}") from None
  if not isinstance(header, dict) or "id" not in header:
    raise RecordError("record header has no id")
  return header, bytes(data[start + length:])
