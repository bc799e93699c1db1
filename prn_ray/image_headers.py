"""Image files before decoding: the format from the magic bytes, the size from the header
(without allocating pixels: decompression bombs are refused from it), truncation, and the
error every decoding failure becomes."""

from __future__ import annotations

import io
import struct
import warnings

REASONS = (
    "empty_file",
    "not_an_image",
    "truncated",
    "corrupt",
    "too_large",
    "too_small",
    "unreadable",
    "mask_missing",
    "mask_unreadable",
    "mask_size_mismatch",
)


class ImageError(Exception):
    """A decode/validation failure: ``reason`` (one of :data:`REASONS`) and a human message."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __reduce__(self):  # picklable across Ray workers
        return (type(self), (self.reason, self.message))


# ----------------------------------------------------------------------------- headers

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SIG = b"\xff\xd8\xff"
# SOF markers carry the frame size; C4 (DHT), C8 (JPG), CC (DAC) are not frames.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def sniff_format(data: bytes) -> str | None:
    """``png``/``jpeg``/``bmp``/``gif``/``tiff``/``webp``/... from the magic bytes, else None."""
    if data.startswith(_PNG_SIG):
        return "png"
    if data.startswith(_JPEG_SIG):
        return "jpeg"
    if data.startswith(b"BM") and len(data) >= 6:
        return "bmp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"):
        return "pnm"
    if data[:4] == b"\x00\x00\x00\x0cjP  " or data[:4] == b"\xff\x4f\xff\x51":
        return "jpeg2000"
    return None


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding pixels, or None when unknown.

    Raises :class:`ImageError` ``truncated`` when a PNG/JPEG ends before its size is stated.
    """
    fmt = sniff_format(data)
    if fmt == "png":
        if len(data) < 24:
            raise ImageError("truncated", "PNG ends inside its header")
        if data[12:16] != b"IHDR":
            raise ImageError("corrupt", "PNG does not start with an IHDR chunk")
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if fmt == "jpeg":
        return _jpeg_size(data)
    if fmt == "bmp":
        if len(data) < 26:
            raise ImageError("truncated", "BMP ends inside its header")
        header_size = struct.unpack("<I", data[14:18])[0]
        if header_size == 12:
            w, h = struct.unpack("<HH", data[18:22])
        else:
            w, h = struct.unpack("<ii", data[18:26])
        return abs(int(w)), abs(int(h))
    if fmt == "gif":
        if len(data) < 10:
            raise ImageError("truncated", "GIF ends inside its header")
        w, h = struct.unpack("<HH", data[6:10])
        return int(w), int(h)
    return _pil_size(data)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    while i < n:
        # Skip fill bytes up to the next marker.
        if data[i] != 0xFF:
            raise ImageError("corrupt", f"JPEG marker expected at byte {i}")
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            continue
        if marker == 0xD9 or marker == 0xDA:  # EOI / start of scan before any frame header
            raise ImageError("corrupt", "JPEG has no frame header before its scan data")
        if i + 2 > n:
            break
        seg_len = struct.unpack(">H", data[i : i + 2])[0]
        if marker in _JPEG_SOF:
            if i + 7 > n:
                break
            h, w = struct.unpack(">HH", data[i + 3 : i + 7])
            return int(w), int(h)
        i += seg_len
    raise ImageError("truncated", "JPEG ends before its frame header")


def _pil_size(data: bytes) -> tuple[int, int] | None:
    """Lazy Pillow open (reads the header only) for the formats parsed nowhere else."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return tuple(int(v) for v in im.size)  # type: ignore[return-value]
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"header states a decompression bomb ({exc})") from None
    except Exception:
        return None


def _png_complete(data: bytes) -> bool:
    """Walk the PNG chunks: True when an IEND chunk is reached inside the data."""
    i, n = 8, len(data)
    while i + 8 <= n:
        length = struct.unpack(">I", data[i : i + 4])[0]
        ctype = data[i + 4 : i + 8]
        end = i + 12 + length
        if end > n:
            return False
        if ctype == b"IEND":
            return True
        i = end
    return False


def _jpeg_first_scan(data: bytes) -> int:
    """Offset of the first top-level SOS marker (segments skipped by length, so markers inside
    an EXIF thumbnail do not count), or -1 when the data ends before it."""
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return -1
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            return -1
        marker = data[i]
        if marker == 0xDA:
            return i - 1
        i += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9 or i + 2 > n:
            return -1
        i += struct.unpack(">H", data[i : i + 2])[0]
    return -1


def _jpeg_complete(data: bytes) -> bool:
    """True when an EOI marker follows the first scan (entropy data stuffs 0xFF as 0xFF00, so
    0xFFD9 there is the real EOI; bytes after EOI are tolerated)."""
    sos = _jpeg_first_scan(data)
    return sos >= 0 and data.rfind(b"\xff\xd9") > sos


def is_truncated(data: bytes) -> bool:
    fmt = sniff_format(data)
    if fmt == "png":
        return not _png_complete(data)
    if fmt == "jpeg":
        return not _jpeg_complete(data)
    return False
