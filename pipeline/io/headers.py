"""Image dimensions read from file headers, before anything is decoded (no OpenCV, no Pillow, no pixel buffer).

:func:`parse_header` reads the header of the formats OpenCV decodes and Pillow may not open (JPEG, PNG, WebP, BMP,
TIFF, the Netpbm family, Radiance HDR), walking them as the decoders do: JPEG marker segments as libjpeg skips
them, PNG chunks (a chunk that claims more bytes than the file has is refused: OpenCV would allocate the claimed
length first), the first TIFF directory. :func:`pipeline.io.images.check_image_header` compares the result with
the pixel limit and leaves other formats to Pillow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.errors import ImageError

__all__ = ["ImageHeader", "decode_bytes", "parse_header"]

_JPEG_SOI = b"\xff\xd8"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (SOF0..SOF15), not DHT (C4), JPG (C8) or DAC (CC), which share the range
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}  # colour type -> channels OpenCV decodes (palette: maybe alpha)
_NETPBM = {b"P1": 1, b"P2": 1, b"P3": 3, b"P4": 1, b"P5": 1, b"P6": 3, b"PF": 3, b"Pf": 1}  # magic -> channels
_TEXT_HEADER_MAX = 4096  # bytes of a text header (Netpbm, PAM, Radiance) read before giving up
_WHITESPACE = b" \t\r\n\x0b\x0c"


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an encoded image's header declares, read without decoding a pixel.

    ``format``: ``JPEG``, ``PNG``, ``WEBP``, ``BMP``, ``TIFF``, ``PNM``, ``HDR`` or Pillow's name of another
    format. ``width``, ``height``: in pixels. ``decode_bytes``: an upper estimate of the bytes
    :func:`pipeline.io.images.decode_image` holds at once while decoding it (the decoded buffer, the decoder's own
    buffers and the conversions; not the encoded bytes).
    """

    format: str
    width: int
    height: int
    decode_bytes: int

    @property
    def pixels(self) -> int:
        """``width * height``."""
        return self.width * self.height


def decode_bytes(pixels: int, channels: int, sample_bytes: int) -> int:
    """Bytes :func:`pipeline.io.images.decode_image` holds at once for an image that OpenCV decodes with
    ``IMREAD_UNCHANGED``: the decoded buffer, its 8-bit copy (16-bit images; float images: a scaled copy of
    their own size too), the composited or converted colour image and the resize input (3 bytes a pixel each)."""
    extra = channels * sample_bytes + channels if sample_bytes > 2 else channels if sample_bytes == 2 else 0
    return pixels * (channels * sample_bytes + extra + 6)


def parse_header(data: bytes) -> ImageHeader | None:
    """The header of a JPEG, PNG, WebP, BMP, TIFF, Netpbm (PBM/PGM/PPM/PAM/PFM) or Radiance HDR file; None for
    another format, or a header not understood (Pillow may still read it).

    Raises:
        ImageError: a PNG chunk claims more bytes than the file has (``truncated or corrupt PNG ...``).
    """
    head = data[:4]
    if head[:2] == _JPEG_SOI:
        return _jpeg_header(data)
    if data[:8] == _PNG_SIGNATURE:
        return _png_header(data)
    if head == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_header(data)
    if head[:2] == b"BM":
        return _bmp_header(data)
    if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff_header(data)
    if head[:2] == b"P7":
        return _pam_header(data)
    if head[:2] in _NETPBM:
        return _netpbm_header(data)
    if data[:2] == b"#?":
        return _radiance_header(data)
    return None


def _jpeg_header(data: bytes) -> ImageHeader | None:
    """The first frame header (SOFn) that libjpeg reads: from one marker to the next it skips every byte up to an
    ``FF``, then fill bytes ``FF``, and a stuffed ``FF 00`` is no marker; a segment is skipped by its length."""
    i, n = 2, len(data)
    while True:
        i = data.find(b"\xff", i)
        if i < 0:
            return None
        while i < n and data[i] == 0xFF:
            i += 1
        if i + 3 > n:
            return None
        marker = data[i]
        i += 1  # at the segment's length, if it has one
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stuffed zero; TEM, RSTn, SOI: no length
            continue
        if marker in (0xD9, 0xDA) or marker < 0xC0:  # end of image or a scan before any frame; unknown: an error
            return None
        (length,) = struct.unpack_from(">H", data, i)
        if marker in _JPEG_SOF:
            if length < 8 or i + 8 > n:
                return None
            height, width, components = struct.unpack_from(">HHB", data, i + 3)
            # OpenCV's output (3 bytes a pixel, grey or colour) plus libjpeg's whole-image coefficient buffers of
            # progressive and multi-scan files (2 bytes a pixel per component at most)
            return ImageHeader("JPEG", width, height, width * height * (3 + 2 * max(1, components)))
        i += length


def _png_header(data: bytes) -> ImageHeader | None:
    """IHDR, the first chunk of every PNG, once every chunk has been checked to fit in the file."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    _check_png_chunks(data)
    return ImageHeader("PNG", width, height, decode_bytes(width * height, _PNG_CHANNELS.get(colour, 4),
                                                         2 if depth == 16 else 1))


def _check_png_chunks(data: bytes) -> None:
    """Walk the chunks (length, type, body, CRC) up to IEND: OpenCV's reader allocates the length a chunk claims
    before reading it, so a chunk that claims more than the file holds is refused here."""
    i, n = 8, len(data)
    while i + 8 <= n:
        (length,) = struct.unpack_from(">I", data, i)
        kind = data[i + 4 : i + 8]
        left = n - i - 12
        if length > left:
            raise ImageError(f"truncated or corrupt PNG: chunk {kind.decode('latin-1')!r} at byte {i} claims "
                             f"{length} bytes, {max(left, 0)} are left")
        if kind == b"IEND":
            return
        i += 12 + length


def _webp_header(data: bytes) -> ImageHeader | None:
    """The VP8 (lossy), VP8L (lossless) or VP8X (extended) chunk's canvas size."""
    if len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        width, height = width & 0x3FFF, height & 0x3FFF
    elif chunk == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    else:
        return None
    return ImageHeader("WEBP", width, height, decode_bytes(width * height, 4, 1))


def _bmp_header(data: bytes) -> ImageHeader | None:
    """The DIB header: OS/2 (12 bytes, 16-bit sizes) or Windows (40 bytes and more; a negative height is a
    top-down bitmap)."""
    if len(data) < 26:
        return None
    (dib,) = struct.unpack_from("<I", data, 14)
    if dib == 12:
        width, height = struct.unpack_from("<HH", data, 18)
    elif dib >= 40:
        width, height = struct.unpack_from("<ii", data, 18)
        height = abs(height)
    else:
        return None
    if width < 0:
        return None
    return ImageHeader("BMP", width, height, decode_bytes(width * height, 4, 1))


_TIFF_TYPES = {1: "B", 3: "H", 4: "I", 16: "Q"}  # BYTE, SHORT, LONG, LONG8: the integer types of the tags read


def _tiff_header(data: bytes) -> ImageHeader | None:
    """ImageWidth, ImageLength, BitsPerSample and SamplesPerPixel of the first directory (the page OpenCV reads),
    classic TIFF or BigTIFF."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (first,) = struct.unpack_from(order + "Q", data, 8)
            (count,) = struct.unpack_from(order + "Q", data, first)
            entry, size, start, inline = order + "HHQ", 20, first + 8, 8
        else:
            (first,) = struct.unpack_from(order + "I", data, 4)
            (count,) = struct.unpack_from(order + "H", data, first)
            entry, size, start, inline = order + "HHI", 12, first + 2, 4
        tags: dict[int, int] = {}
        for k in range(min(count, 4096)):
            at = start + k * size
            tag, kind, n = struct.unpack_from(entry, data, at)
            if tag not in (256, 257, 258, 277, 339) or kind not in _TIFF_TYPES or n < 1:
                continue
            fmt = order + _TIFF_TYPES[kind]
            where = at + size - inline
            if struct.calcsize(fmt) * n > inline:  # the values are elsewhere: the offset says where
                (where,) = struct.unpack_from(order + ("Q" if big else "I"), data, where)
            tags[tag] = struct.unpack_from(fmt, data, where)[0]
    except (struct.error, OverflowError):  # an offset or count past the end of the file (or past 2**63)
        return None
    if 256 not in tags or 257 not in tags:
        return None
    width, height = tags[256], tags[257]
    sample_bytes = max(1, (tags.get(258, 8) + 7) // 8)
    channels = max(3, tags.get(277, 1))
    return ImageHeader("TIFF", width, height, decode_bytes(width * height, channels, min(sample_bytes, 8)))


def _tokens(data: bytes, start: int, count: int) -> tuple[list[bytes], int] | None:
    """``count`` whitespace-separated tokens of a Netpbm header from ``start`` (``#`` comments skipped), and where
    the last one ended; a token ends at the first byte that is not part of it (pixels may follow at once)."""
    tokens: list[bytes] = []
    i, n = start, min(len(data), _TEXT_HEADER_MAX)
    while len(tokens) < count:
        while i < n and (data[i] in _WHITESPACE or data[i] == 0x23):
            if data[i] == 0x23:  # '#': a comment to the end of the line
                while i < n and data[i] not in b"\r\n":
                    i += 1
            else:
                i += 1
        j = i
        while j < n and (data[j] in b"0123456789+-.eE"):
            j += 1
        if j == i:
            return None
        tokens.append(data[i:j])
        i = j
    return tokens, i


def _netpbm_header(data: bytes) -> ImageHeader | None:
    """PBM, PGM, PPM (``P1``..``P6``) and PFM (``PF``, ``Pf``): width, height and, for grey and colour maps, the
    maximum value (above 255: 16-bit samples)."""
    magic = data[:2]
    found = _tokens(data, 2, 2 if magic in (b"P1", b"P4", b"PF", b"Pf") else 3)
    if found is None:
        return None
    tokens = found[0]
    try:
        width, height = int(tokens[0]), int(tokens[1])
        sample_bytes = 4 if magic in (b"PF", b"Pf") else 2 if len(tokens) == 3 and int(tokens[2]) > 255 else 1
    except ValueError:
        return None
    return ImageHeader("PNM", width, height, decode_bytes(width * height, max(3, _NETPBM[magic]), sample_bytes))


def _pam_header(data: bytes) -> ImageHeader | None:
    """PAM (``P7``): ``WIDTH``, ``HEIGHT``, ``DEPTH`` and ``MAXVAL`` lines up to ``ENDHDR``."""
    fields: dict[bytes, int] = {}
    for line in data[:_TEXT_HEADER_MAX].split(b"\n")[1:]:
        words = line.split()
        if words[:1] == [b"ENDHDR"]:
            break
        if len(words) == 2 and words[1].isdigit():
            fields[words[0]] = int(words[1])
    else:
        return None
    if b"WIDTH" not in fields or b"HEIGHT" not in fields:
        return None
    width, height = fields[b"WIDTH"], fields[b"HEIGHT"]
    sample_bytes = 2 if fields.get(b"MAXVAL", 255) > 255 else 1
    return ImageHeader("PNM", width, height, decode_bytes(width * height, max(3, fields.get(b"DEPTH", 1)),
                                                         sample_bytes))


def _radiance_header(data: bytes) -> ImageHeader | None:
    """Radiance RGBE (``#?RADIANCE``): the resolution line after the blank line that ends the header, e.g.
    ``-Y 480 +X 640`` (rows first) or ``+X 640 -Y 480``."""
    end = data.find(b"\n\n", 0, _TEXT_HEADER_MAX)
    if end < 0:
        return None
    words = data[end + 2 : end + 2 + 64].split(b"\n", 1)[0].split()
    if len(words) != 4 or not (words[1].isdigit() and words[3].isdigit()):
        return None
    first, second = int(words[1]), int(words[3])
    height, width = (first, second) if words[0].endswith(b"Y") else (second, first)
    return ImageHeader("HDR", width, height, decode_bytes(width * height, 3, 4))
