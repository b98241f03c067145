"""The one image sniffer: what an answer's bytes really are, complete or not, and their size.

No Pillow here (decoding a 300 KB JPEG to learn its size costs more than the rest of an
answer): the type comes from the magic bytes, completeness from the trailer, the size from the
JPEG frame header or the PNG IHDR chunk. Input images (`inputs.images`) use `image_type` too.
"""

from __future__ import annotations

import zlib

from flux_flows.errors import ResponseError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


def image_type(data: bytes) -> str | None:
    """The type the bytes say they are (JPEG, PNG or WebP) from the magic bytes alone, or None."""
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    if data.startswith(PNG_MAGIC):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def sniff_image(data: bytes) -> str:
    """The content type the bytes really are; a complete JPEG or PNG, or ResponseError.

    Checks the trailer too (JPEG EOI marker, PNG IEND chunk), because a truncated image decodes
    to a half-grey picture that would otherwise be stored and paid for as if it were real.
    """
    kind = image_type(data)
    if kind == "image/jpeg" and _JPEG_END not in data[-64:]:
        raise ResponseError(f"the JPEG answer is truncated ({len(data)} bytes, no end marker)")
    if kind == "image/png" and not data.rstrip(b"\x00").endswith(_PNG_END):
        raise ResponseError(f"the PNG answer is truncated ({len(data)} bytes, no IEND chunk)")
    if kind is None:
        preview = data[:40]
        raise ResponseError(
            f"the answer is not a JPEG or PNG image ({len(data)} bytes starting {preview!r})"
        )
    return kind


# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): the segment
# that carries the dimensions. 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range but are not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_PNG_MAX_SIDE = 2**31 - 1  # the PNG spec's limit for IHDR width and height


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG or PNG, read from its header, with the header checked.

    Every answer goes through here, so it parses the few bytes that carry the size instead of
    handing the image to Pillow (whose plugin machinery cost 15.5 us per image against 1.3 us
    for this in an uncommitted A/B of issue 17, benchmarks/RESULTS.md, and would pull Pillow
    into the client). It is still a structural check:
    a JPEG must reach a frame header through well-formed segments before its first scan, and a
    PNG must open with an IHDR chunk whose CRC matches. Together with `sniff_image`'s check of
    the trailer, a truncated or mangled answer raises ResponseError rather than being stored.
    """
    if data.startswith(JPEG_MAGIC):
        return _jpeg_size(data)
    if data.startswith(PNG_MAGIC):
        return _png_size(data)
    raise ResponseError(f"the answer's image cannot be read: not a JPEG or PNG ({len(data)} bytes)")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the marker segments from SOI to the first start-of-frame (ITU T.81, B.1.1)."""
    end, pos = len(data), 2
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise ResponseError(f"the JPEG answer is corrupt: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        pos += 2
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or a scan before any frame header
            raise ResponseError("the JPEG answer is corrupt: no frame header before its data")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > end:
            break
        if marker in _JPEG_SOF:
            # length(2) precision(1) height(2) width(2) components(1)...
            if length < 8:
                raise ResponseError("the JPEG answer is corrupt: its frame header is too short")
            height = int.from_bytes(data[pos + 3 : pos + 5], "big")
            width = int.from_bytes(data[pos + 5 : pos + 7], "big")
            if not width or not height:
                raise ResponseError(f"the JPEG answer has an empty size ({width}x{height})")
            return width, height
        pos += length
    raise ResponseError(f"the JPEG answer is truncated ({end} bytes, header incomplete)")


def _png_size(data: bytes) -> tuple[int, int]:
    """The IHDR chunk, which the PNG spec requires to come first: length 13, CRC checked."""
    ihdr = data[8 : 8 + 25]  # length (4), type (4), 13 bytes of data, CRC (4)
    if len(ihdr) < 25 or ihdr[:8] != b"\x00\x00\x00\x0dIHDR":
        raise ResponseError("the PNG answer is corrupt: it does not start with an IHDR chunk")
    if zlib.crc32(ihdr[4:21]) != int.from_bytes(ihdr[21:25], "big"):
        raise ResponseError("the PNG answer is corrupt: its IHDR chunk fails its CRC")
    width = int.from_bytes(ihdr[8:12], "big")
    height = int.from_bytes(ihdr[12:16], "big")
    if not (0 < width <= _PNG_MAX_SIDE and 0 < height <= _PNG_MAX_SIDE):
        raise ResponseError(f"the PNG answer has an impossible size ({width}x{height})")
    return width, height
