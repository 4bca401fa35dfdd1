"""The few PNG facts the label readers need, without an imaging library.

VOC ships its labels as palette ("P" mode) PNGs: the pixel value is a class
index and the file's PLTE chunk maps indices to display colours. TensorFlow's
PNG decoder always expands a palette to RGB, so a palette label is read back
to indices by inverting the file's own PLTE (`palette_indices`). Writing a
palette PNG needs only zlib (`encode_palette_png`), which lets the synthetic
dataset and the test fixtures use the real VOC label format.

`encode_png` writes 8-bit RGB/gray PNGs with a chosen row filter and zlib
strategy: the Cityscapes training strips are written with settings that
decode faster than libpng's defaults and encode ~10x faster.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# IHDR colour types.
GRAY, RGB, PALETTE, GRAY_ALPHA, RGBA = 0, 2, 3, 4, 6

# Row filter types (PNG specification, section 9.2).
FILTER_NONE, FILTER_SUB, FILTER_UP, FILTER_AVERAGE, FILTER_PAETH = 0, 1, 2, 3, 4


class PngFormatError(ValueError):
    """Bytes that are not a readable PNG."""


def _chunks(data: bytes):
    """Yields (type, payload) for each chunk up to IDAT (the header chunks)."""
    if not data.startswith(PNG_SIGNATURE):
        raise PngFormatError("not a PNG file (bad signature)")
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        if len(payload) != length:
            raise PngFormatError(f"truncated {kind!r} chunk")
        yield kind, payload
        if kind in (b"IDAT", b"IEND"):
            return
        pos += 12 + length


def header(data: bytes) -> dict:
    """Reads the IHDR and PLTE chunks of a PNG.

    Args:
      data: the PNG file's bytes.

    Returns:
      A dict with "width", "height", "bit_depth", "color_type" and
      "palette" (uint8 (n, 3) array, or None without a PLTE chunk).

    Raises:
      PngFormatError: the bytes are not a PNG or the header is cut short.
    """
    info = None
    palette = None
    for kind, payload in _chunks(data):
        if kind == b"IHDR":
            if len(payload) != 13:
                raise PngFormatError("malformed IHDR chunk")
            width, height, bit_depth, color_type = struct.unpack(">IIBB", payload[:10])
            info = dict(width=width, height=height, bit_depth=bit_depth, color_type=color_type)
        elif kind == b"PLTE":
            palette = np.frombuffer(payload, np.uint8).reshape(-1, 3)
    if info is None:
        raise PngFormatError("no IHDR chunk")
    info["palette"] = palette
    return info


def palette_indices(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Maps an RGB-expanded palette image back to its palette indices.

    Args:
      rgb: uint8 (H, W, 3), the image decoded with the palette applied.
      palette: uint8 (n, 3), the file's PLTE entries.

    Returns:
      uint8 (H, W) indices. Where the palette repeats a colour, the lowest
      index holding it is returned (a real VOC palette has 256 distinct
      colours, so the inversion is exact there).
    """
    keys = (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8) | palette[:, 2]
    # np.unique returns the first occurrence of each colour: the lowest index.
    unique_keys, first_index = np.unique(keys, return_index=True)
    pixels = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pos = np.clip(np.searchsorted(unique_keys, pixels), 0, len(unique_keys) - 1)
    if not np.array_equal(unique_keys[pos], pixels):
        # Cannot happen for a decoder that applied this palette; guard anyway.
        raise PngFormatError("decoded colours not found in the PNG's palette")
    return first_index[pos].astype(np.uint8)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_palette_png(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """Encodes class indices as an 8-bit palette PNG (VOC's label format).

    Args:
      indices: uint8 (H, W) palette indices.
      palette: uint8 (n, 3) colours, n <= 256; every index used must be < n.

    Returns:
      The PNG file's bytes.
    """
    indices = np.asarray(indices)
    palette = np.asarray(palette, np.uint8)
    if indices.ndim != 2 or indices.dtype != np.uint8:
        raise ValueError(f"indices must be uint8 (H, W), got {indices.dtype} {indices.shape}")
    if palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= len(palette) <= 256:
        raise ValueError(f"palette must be (n <= 256, 3), got {palette.shape}")
    if indices.size and int(indices.max()) >= len(palette):
        raise ValueError(f"index {int(indices.max())} has no palette entry (palette has {len(palette)})")
    height, width = indices.shape
    # Filter type 0 (None) on every row: simplest valid encoding.
    raw = np.concatenate([np.zeros((height, 1), np.uint8), indices], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, PALETTE, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"PLTE", palette.tobytes())
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def filter_rows(image: np.ndarray, filter_type: int) -> np.ndarray:
    """Applies one PNG row filter to every row of an 8-bit image.

    Args:
      image: uint8 (H, W, C).
      filter_type: one of the FILTER_* types.

    Returns:
      uint8 (H, W * C), the filtered bytes of each row (without the
      leading filter-type byte). The first row's "above" is zeros, as the
      specification says.
    """
    x = image.reshape(image.shape[0], -1).astype(np.int16)
    bpp = image.shape[2]
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    up = np.zeros_like(x)
    up[1:] = x[:-1]
    if filter_type == FILTER_NONE:
        predicted = np.zeros_like(x)
    elif filter_type == FILTER_SUB:
        predicted = left
    elif filter_type == FILTER_UP:
        predicted = up
    elif filter_type == FILTER_AVERAGE:
        predicted = (left + up) >> 1
    elif filter_type == FILTER_PAETH:
        up_left = np.zeros_like(x)
        up_left[1:, bpp:] = x[:-1, :-bpp]
        p = left + up - up_left
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
        predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    else:
        raise ValueError(f"unknown PNG filter type {filter_type}")
    return ((x - predicted) & 0xFF).astype(np.uint8)


def encode_png(
    image: np.ndarray, filter_type: int = FILTER_UP, level: int = 6, strategy: int = zlib.Z_RLE
) -> bytes:
    """Encodes an 8-bit RGB or grayscale image as a PNG with one row filter.

    Any PNG decoder reads it back to exactly `image`. The defaults (Up
    filter, zlib run-length strategy) decode ~25% faster than libpng's
    default settings (adaptive filters, level 6) and encode ~10x faster;
    on photos the file is ~9% larger (BENCHMARKS.md, "Input pipeline").

    Args:
      image: uint8 (H, W, 3) or (H, W, 1) / (H, W).
      filter_type: one of the FILTER_* types, used on every row.
      level: zlib compression level (0-9).
      strategy: zlib strategy (zlib.Z_DEFAULT_STRATEGY, Z_FILTERED, Z_RLE, ...).

    Returns:
      The PNG file's bytes.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be uint8 (H, W, 3) or (H, W, 1), got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    rows = filter_rows(image, filter_type)
    raw = np.concatenate([np.full((height, 1), filter_type, np.uint8), rows], axis=1).tobytes()
    compressor = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 9, strategy)
    data = compressor.compress(raw) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, RGB if channels == 3 else GRAY, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
