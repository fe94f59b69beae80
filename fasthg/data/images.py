"""Image files read during training and evaluation, as RGB uint8.

OpenCV decodes them (IMREAD_COLOR: grey, CMYK and palette files become RGB, 16-bit files are
scaled to 8 bits, alpha is dropped). What it would accept or do silently is checked first:

* truncation: a JPEG must hold its end-of-image marker (FF D9) after its first scan, a PNG its
  IEND chunk (OpenCV's imread returns a truncated JPEG's top part without a word);
* size: a PNG or JPEG whose header declares more than MAX_IMAGE_PIXELS pixels is refused before
  anything is decoded (a 900 KB PNG can declare 30000 x 30000 pixels: 2.7 GB to decode), and
  a file of more than 8 bytes a pixel of that limit is not read in. Other formats are held to
  OpenCV's own limit, CV_IO_MAX_IMAGE_PIXELS (2**30 unless set);
* unreadable files (missing, no read permission, a folder) and files that are no image.

Each is a BadImageError (a ValueError) whose one-line message names the file and what is wrong.
"""
import os
from typing import Optional, Tuple

import cv2
import numpy as np

# 10000 x 10000, 300 MB as RGB: far above the pose data sets' pictures (MPII's and COCO's are
# a few megapixels at most) and most cameras', far below what would exhaust memory.
MAX_IMAGE_PIXELS = 100_000_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (SOF0-SOF15 but DHT C4, JPG C8 and DAC CC), which carry the image size.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_BARE = frozenset([0x01, *range(0xD0, 0xD9)])


class BadImageError(ValueError):
    """An image file that cannot be used; the message names it (and, from load_image, the record).

    torch's DataLoader re-raises an exception of a worker process in the main one as
    `type(e)(text)`, the text being "Caught ... Original Traceback ..." and the worker's
    traceback: this class keeps only the worker's own message, so the error a person sees is
    the same one line with and without workers."""

    def __init__(self, message: str = ""):
        super().__init__(_worker_message(str(message), type(self)))


def _worker_message(text: str, cls: type) -> str:
    """The worker's message out of the text torch's DataLoader re-raises; `text` otherwise."""
    if not text.startswith(f"Caught {cls.__name__} ") or "Traceback" not in text:
        return text
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix):]
    return text


def _png_facts(data: bytes) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """((width, height) or None, the reason it is truncated or None) of a PNG's bytes."""
    size = None
    if len(data) >= 24 and data[12:16] == b"IHDR":
        size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.find(b"IEND", 8) < 0:
        return size, "truncated PNG (no IEND chunk at its end)"
    return size, None


def _jpeg_facts(data: bytes) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """((width, height) or None, the reason it is truncated or None) of a JPEG's bytes: its
    segments walked up to the first scan (SOS), after which the end marker must come."""
    size, i = None, 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return size, None  # not a marker where one should be: left to the decoder
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_BARE:
            i += 2
            continue
        if marker == 0xD9:
            return size, "no image data (end of image before any scan)"
        if marker in _JPEG_FRAMES and i + 9 <= len(data):
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            size = (width, height) if height else None  # height 0: given later (DNL), left to the decoder
        if marker == 0xDA:
            # Scan data escapes every FF, so an FF D9 after the first scan is the image's end (or a
            # later one's, in trailing data): a file cut short has none.
            if data.find(b"\xff\xd9", i + 2) < 0:
                return size, "truncated JPEG (no end-of-image marker FF D9)"
            return size, None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return size, "truncated JPEG (it ends before its image data)"


def check_image_bytes(data: bytes) -> Optional[str]:
    """Why an image file's bytes cannot be used without decoding them (empty, truncated PNG or
    JPEG, more pixels than MAX_IMAGE_PIXELS), or None."""
    if not data:
        return "an empty file"
    if data.startswith(_PNG_SIGNATURE):
        size, truncated = _png_facts(data)
    elif data.startswith(b"\xff\xd8"):
        size, truncated = _jpeg_facts(data)
    else:
        return None
    if size and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return (f"{size[0]} x {size[1]} pixels, more than fasthg.data.images.MAX_IMAGE_PIXELS "
                f"({MAX_IMAGE_PIXELS:,})")
    return truncated


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # 8 bytes a pixel: uncompressed 16-bit RGBA, the largest an image of the limit can take
            if size > 8 * MAX_IMAGE_PIXELS:
                raise BadImageError(f"cannot read image file {path!r}: {size:,} bytes, more than an image of "
                                    f"fasthg.data.images.MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS:,}) pixels needs")
            return f.read()
    except OSError as e:
        raise BadImageError(f"cannot read image file {path!r}: {e.strerror or e}") from None


def read_rgb(path: str) -> np.ndarray:
    """The image file as RGB uint8 (H, W, 3); BadImageError naming the file and the fault."""
    data = _read_bytes(path)
    problem = check_image_bytes(data)
    if problem:
        raise BadImageError(f"cannot read image file {path!r}: {problem}")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:  # OpenCV's own limits (CV_IO_MAX_IMAGE_PIXELS) raise instead of returning None
        reason = str(e).strip().splitlines()[-1]
        raise BadImageError(f"cannot read image file {path!r}: OpenCV refuses it ({reason})") from None
    if img is None:
        raise BadImageError(f"cannot read image file {path!r}: corrupt, or not an image OpenCV can decode "
                            "(expected a JPEG, PNG, BMP, TIFF or WebP file)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
