"""The shard record: a JSON header and the raw media bytes, nothing that can run code when read.

  record = b"HICOREC1" + uint32 little-endian header length + header (UTF-8 JSON) + media bytes

The header holds the annotation (id, conversations, optional start/end seconds, media type, source path,
dataset name); the media is the video or image file exactly as it was on disk (compressed mp4, jpeg etc.).
A record with several media files (a multi-image sample) stores them one after another and their sizes in the
header's "media_sizes"; a record without that field holds one file (or none), as records always did. Storing the
compressed file rather than decoded frames keeps shards ~100x smaller and lets each training stage sample
its own frame count; docs/data.md has the throughput that justifies it.
"""

from __future__ import annotations

import json
import struct
from typing import Sequence

MAGIC = b"HICOREC1"
_LENGTH = struct.Struct("<I")
MEDIA_TYPES = ("video", "image", "text")


class RecordError(ValueError):
  """A record that cannot be parsed; the message says what is wrong."""


def encode_record(header: dict, media: bytes | Sequence[bytes] | None = None) -> bytes:
  """media: one file's bytes, or a list of files (several images); a list of one is stored as one file."""
  if header.get("media_type") not in MEDIA_TYPES:
    raise RecordError(f"record {header.get('id')!r}: media_type must be one of {MEDIA_TYPES}")
  if isinstance(media, (list, tuple)):
    if len(media) == 1:
      media = media[0]
    else:
      header = {**header, "media_sizes": [len(m) for m in media]}
      media = b"".join(media)
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


def decode_record_parts(data: bytes) -> tuple[dict, list[bytes]]:
  """(header, [each media file's bytes]) of a record: [] for a text record, one entry for a record written
  before multi-media records existed. RecordError if the sizes do not add up."""
  header, media = decode_record(data)
  sizes = header.get("media_sizes")
  if sizes is None:
    return header, [media] if media else []
  if not isinstance(sizes, list) or any(not isinstance(n, int) or n < 0 for n in sizes) or sum(sizes) != len(media):
    raise RecordError(f"record {header.get('id')!r}: media_sizes {sizes} do not add up to its {len(media)} media bytes")
  parts, start = [], 0
  for n in sizes:
    parts.append(media[start:start + n])
    start += n
  return header, parts
