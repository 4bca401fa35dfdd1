"""The few PNG facts the label readers need, without an imaging library.

VOC ships its labels as palette ("P" mode) PNGs: the pixel value is a class
index and the file's PLTE chunk maps indices to display colours. TensorFlow's
PNG decoder always expands a palette to RGB, so a palette label is read back
to indices by inverting the file's own PLTE (`palette_indices`). Writing a
palette PNG needs only zlib (`encode_palette_png`), which lets the synthetic
dataset and the test fixtures use the real VOC label format.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# IHDR colour types.
GRAY, RGB, PALETTE, GRAY_ALPHA, RGBA = 0, 2, 3, 4, 6


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
