"""Image sizes from header bytes, and the prompt tokens OpenAI bills for one image.

    data = decode_data_url("data:image/png;base64,iVBORw0KGgo...", max_bytes=HEADER_BYTES)
    size = image_size(data or b"")                             # (1024, 1024), or None
    size = data_url_size("data:image/png;base64,iVBORw0KGgo...")  # the same, decoding less
    image_tokens("gpt-4o", detail="high", size=(1024, 1024))   # 765
    image_tokens("gpt-4o", detail="auto", size=None)           # 1445: the most it can bill
    image_tokens("my-model", detail=None, size=(64, 64))       # None: family not documented

Figures from OpenAI's "Images and vision" guide, "Calculating costs":

* Tile models: ``detail: "low"`` costs the base tokens; anything else (``high``, ``auto``,
  absent) is priced as high: fit in 2048 x 2048, shrink the short side to 768 (never
  enlarge), then base + tiles x per-tile, a tile being 512 px square. The most one image
  can cost is 2 x 4 tiles (768 x 2048). Base / per tile: gpt-4o, chatgpt-4o-latest,
  gpt-4.1, gpt-4.5-preview and gpt-4-turbo 85 / 170; gpt-4o-mini 2833 / 5667; gpt-5 and
  gpt-5-chat-latest 70 / 140; o1, o1-pro and o3 75 / 150; computer-use-preview 65 / 129.
* Patch models: 32 px patches cover the image after it is fit in 2048 x 2048; over the
  1536-patch budget it shrinks until it fits (the guide's ``shrink_factor`` and
  ``adjusted_shrink_factor``), and the count is capped at 1536. Tokens are patches x the
  model's multiplier (gpt-4.1-mini, gpt-5-mini and gpt-5.4-mini 1.62; gpt-4.1-nano,
  gpt-5-nano and gpt-5.4-nano 2.46; o4-mini 1.72), rounded up, plus one token: measured
  bills of a 128 x 64 image (8 patches) run one over the rounded product. The guide gives
  no low-detail figure for them, so ``detail`` is ignored: low is priced as high.

Where the guide leaves a rounding open, the count rounds up, so a figure is never below the
bill (a 2050 x 513 image is held at 8 tiles where the API rounds it to 4). Names match
as documented, with an optional ``-YYYY-MM-DD`` snapshot, a provider prefix
(``openai/``) or a fine-tune (``ft:gpt-4o-mini:org::id``). Any other model, including
documented patch models whose multiplier the guide omits (gpt-5.2, gpt-5.4, codex...),
has no figure: ``image_tokens`` returns None.

Sizes come from the PNG, JPEG, GIF and WebP headers; nothing here decodes pixels, and no
function raises on any input.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from fractions import Fraction
from math import ceil, floor, isqrt

HEADER_BYTES = 64 * 1024  # decoded bytes enough for the size in any ordinary image header
FIRST_BYTES = 1024  # enough for PNG, GIF, WebP and a JPEG without large metadata
MAX_SIDE = 2048
SHORT_SIDE = 768
TILE = 512
MAX_TILES = 8  # 768 x 2048 after scaling: 2 x 4 tiles
PATCH = 32
PATCH_BUDGET = 1536
PATCH_MARGIN = 1  # measured, not in the guide: 8 patches bill 14 on gpt-4.1-mini, 21 on nano

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_B64 = bytes(sorted(set(range(256)) - set(_B64_ALPHABET)))
_MAX_URL_HEADER = 256  # "data:image/png;base64," and any parameters before the comma
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class Tiles:
    """A tile-priced family: ``base`` (all of low detail) plus ``per_tile`` per 512 px tile."""

    base: int
    per_tile: int

    def tokens(self, detail: str | None, size: tuple[int, int] | None) -> int:
        if detail == "low":
            return self.base
        tiles = MAX_TILES if size is None else _tiles(*size)
        return self.base + tiles * self.per_tile


@dataclass(frozen=True, slots=True)
class Patches:
    """A patch-priced family: 32 px patches (at most ``budget``) x ``multiplier``."""

    multiplier: Fraction
    budget: int = PATCH_BUDGET

    def tokens(self, detail: str | None, size: tuple[int, int] | None) -> int:
        patches = self.budget if size is None else _patches(*size, budget=self.budget)
        return ceil(patches * self.multiplier) + PATCH_MARGIN


_4O = Tiles(85, 170)
_O_SERIES = Tiles(75, 150)
_GPT5 = Tiles(70, 140)
_MINI = Patches(Fraction(162, 100))
_NANO = Patches(Fraction(246, 100))
FAMILIES: dict[str, Tiles | Patches] = {
    **dict.fromkeys(
        ("gpt-4o", "chatgpt-4o-latest", "gpt-4.1", "gpt-4.5-preview", "gpt-4-turbo"), _4O
    ),
    "gpt-4o-mini": Tiles(2833, 5667),
    **dict.fromkeys(("gpt-5", "gpt-5-chat-latest"), _GPT5),
    **dict.fromkeys(("o1", "o1-pro", "o3"), _O_SERIES),
    "computer-use-preview": Tiles(65, 129),
    **dict.fromkeys(("gpt-4.1-mini", "gpt-5-mini", "gpt-5.4-mini"), _MINI),
    **dict.fromkeys(("gpt-4.1-nano", "gpt-5-nano", "gpt-5.4-nano"), _NANO),
    "o4-mini": Patches(Fraction(172, 100)),
}


def family(model: str) -> Tiles | Patches | None:
    """The documented image pricing of ``model`` (snapshot, provider prefix and fine-tune
    suffix ignored), or None."""
    if not isinstance(model, str):
        return None
    bare = model.lower().rpartition("/")[2].removeprefix("ft:").partition(":")[0]
    return FAMILIES.get(_SNAPSHOT.sub("", bare))


def image_tokens(model: str, *, detail: str | None, size: tuple[int, int] | None) -> int | None:
    """Tokens one image costs on ``model``; ``size=None`` (not known) gives the most any
    image can cost at that ``detail``. None when the model's family is not documented."""
    rule = family(model)
    if rule is None:
        return None
    if size is not None and not _valid(size):
        size = None
    return rule.tokens(detail if isinstance(detail, str) else None, size)


def _valid(size: object) -> bool:
    return (
        isinstance(size, tuple)
        and len(size) == 2
        and all(isinstance(side, int) and side > 0 for side in size)
    )


def _tiles(width: int, height: int) -> int:
    """512 px tiles after fitting 2048 x 2048, then the short side to 768 (exact arithmetic:
    the tile count is then at least what any rounding of the pixel sides gives)."""
    long, short = Fraction(max(width, height)), Fraction(min(width, height))
    if long > MAX_SIDE:
        long, short = Fraction(MAX_SIDE), short * MAX_SIDE / long
    if short > SHORT_SIDE:
        long, short = long * SHORT_SIDE / short, Fraction(SHORT_SIDE)
    return ceil(long / TILE) * ceil(short / TILE)


def _patches(width: int, height: int, *, budget: int) -> int:
    """32 px patches after fitting 2048 x 2048, shrunk to the budget if over it.

    The guide fits 2048 first (the API bills a 4000 x 1474 image the 64 x 24 patches that
    gives); shrinking straight to the budget is its other reading, so the larger wins.
    """
    w, h = Fraction(width), Fraction(height)
    if max(w, h) > MAX_SIDE:
        scale = MAX_SIDE / max(w, h)
        w, h = w * scale, h * scale
    count = ceil(w / PATCH) * ceil(h / PATCH)
    if count <= budget:
        return count
    # The API shrinks whole pixels: try both roundings of a fitted side.
    fitted = max(
        _shrunk(sw, sh, budget)
        for sw in {max(floor(w), 1), ceil(w)}
        for sh in {max(floor(h), 1), ceil(h)}
    )
    original = _shrunk(width, height, budget) if _covers(width, height) > budget else 0
    return max(fitted, original)


def _covers(width: int, height: int) -> int:
    return -(-width // PATCH) * -(-height // PATCH)


def _shrunk(width: int, height: int, budget: int) -> int:
    """Patches after the guide's shrink: ``shrink_factor = sqrt(32² budget / (w h))``, then
    trimmed so the tighter side is a whole number of patches; capped at ``budget``.

    ``floor(side x shrink / 32)`` is ``isqrt(budget x side // other)``, exactly; the side with
    the smaller trim ratio sets the scale, and the other side is rounded up.
    """
    across = isqrt(budget * width // height)  # whole patches across, before the trim
    down = isqrt(budget * height // width)
    if across * height <= down * width:  # width is the tighter side
        count = across * -(-height * across // width)
    else:
        count = down * -(-width * down // height)
    return min(count, budget)


def decode_data_url(url: str, *, max_bytes: int) -> bytes | None:
    """The first ``max_bytes`` (at most) of a ``data:image/...;base64,`` URL's bytes; None
    for any other URL or a header that is not one. Decodes only that prefix."""
    if not isinstance(url, str) or url[:5].lower() != "data:":
        return None
    comma = url.find(",", 5, _MAX_URL_HEADER)
    if comma < 0:
        return None
    params = [p.strip() for p in url[5:comma].lower().split(";")]
    if len(params) < 2 or not params[0].startswith("image/") or params[-1] != "base64":
        return None
    if max_bytes <= 0:
        return b""
    chars = -(-max_bytes // 3) * 4
    chunk = url[comma + 1 : comma + 1 + chars].encode("ascii", "ignore").translate(None, _NOT_B64)
    chunk = chunk[: len(chunk) - len(chunk) % 4]
    try:
        return binascii.a2b_base64(chunk)[:max_bytes]
    except (binascii.Error, ValueError):
        return None


def data_url_size(url: str) -> tuple[int, int] | None:
    """The size of a ``data:image/...;base64,`` URL's image, decoding its first KiB, then if
    the header runs on (JPEG metadata), up to ``HEADER_BYTES``; None if not found there."""
    for limit in (FIRST_BYTES, HEADER_BYTES):
        data = decode_data_url(url, max_bytes=limit)
        if not data:
            return None
        size = image_size(data)
        if size is not None or len(data) < limit:
            return size
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, GIF or WebP header; None if unrecognised,
    malformed or cut before the size."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return _png(data)
        if data[:3] == b"\xff\xd8\xff":
            return _jpeg(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
    except (IndexError, ValueError, TypeError):  # a bounds slip must not fail a request
        return None
    return None


def _sized(width: int, height: int) -> tuple[int, int] | None:
    return (width, height) if width > 0 and height > 0 else None


def _be(data: bytes, at: int, n: int) -> int:
    if at + n > len(data):
        raise IndexError(at)
    return int.from_bytes(data[at : at + n], "big")


def _le(data: bytes, at: int, n: int) -> int:
    if at + n > len(data):
        raise IndexError(at)
    return int.from_bytes(data[at : at + n], "little")


def _png(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    return _sized(_be(data, 16, 4), _be(data, 20, 4))


_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})


def _jpeg(data: bytes) -> tuple[int, int] | None:
    """Every frame header (SOFn) up to the scan; the largest sides of any, as a decoder
    that keeps the last one might report either. Cut before the scan: None."""
    at, width, height = 2, 0, 0
    while True:
        if data[at] != 0xFF:
            return None
        while data[at] == 0xFF:  # fill bytes
            at += 1
        marker = data[at]
        at += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan
            return _sized(width, height)
        length = _be(data, at, 2)
        if length < 2:
            return None
        if marker in _SOF:
            height = max(height, _be(data, at + 3, 2))
            width = max(width, _be(data, at + 5, 2))
            if not (width and height):
                return None  # height 0: defined later by a DNL marker
        at += length


def _gif(data: bytes) -> tuple[int, int] | None:
    """The logical screen, grown to the first frame's extent as decoders grow it."""
    width, height = _le(data, 6, 2), _le(data, 8, 2)
    flags = data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while True:
        block = data[at]
        if block == 0x2C:  # image descriptor: left, top, width, height
            right = _le(data, at + 1, 2) + _le(data, at + 5, 2)
            bottom = _le(data, at + 3, 2) + _le(data, at + 7, 2)
            return _sized(max(width, right), max(height, bottom))
        if block != 0x21:  # only extensions may come before the first image
            return None
        at += 2
        while data[at]:  # data sub-blocks
            at += data[at] + 1
        at += 1


def _webp(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: key frame start code, then 14-bit sides
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        return _sized(_le(data, 26, 2) & 0x3FFF, _le(data, 28, 2) & 0x3FFF)
    if chunk == b"VP8L":  # lossless: signature, then 14-bit sides minus one
        if data[20] != 0x2F:
            return None
        bits = _le(data, 21, 4)
        return _sized((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":  # extended: 24-bit canvas sides minus one
        return _sized(_le(data, 24, 3) + 1, _le(data, 27, 3) + 1)
    return None
