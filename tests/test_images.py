from __future__ import annotations

import base64
import random
import struct
import zlib
from collections.abc import Callable
from math import ceil

import pytest

from proxy import images
from proxy.images import (
    FAMILIES,
    HEADER_BYTES,
    MAX_TILES,
    PATCH_BUDGET,
    PATCH_MARGIN,
    Patches,
    Tiles,
    data_url_size,
    decode_data_url,
    family,
    image_size,
    image_tokens,
)

# --- image headers, built by hand ---------------------------------------------------------------

Builder = Callable[[int, int], bytes]


def png(width: int, height: int) -> bytes:
    """A valid PNG of the given size (1-bit grayscale, every pixel black)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\x00" * (1 + (width + 7) // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * min(height, 64)))
        + chunk(b"IEND", b"")
    )


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def sof(marker: int, width: int, height: int) -> bytes:
    return segment(marker, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")


def jpeg(
    width: int, height: int, *, metadata: int = 0, sof_marker: int = 0xC0, extra: bytes = b""
) -> bytes:
    """A baseline JPEG's headers: JFIF, ``metadata`` bytes of APP1 segments, DQT, the frame
    header, DHT, then the scan."""
    out = b"\xff\xd8" + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    while metadata > 0:
        size = min(metadata, 65_000)
        out += segment(0xE1, b"Exif\x00\x00" + b"\x00" * size)
        metadata -= size
    out += segment(0xDB, b"\x00" + bytes(range(64)))
    out += sof(sof_marker, width, height) + extra
    out += segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00")
    out += segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\x34\xff\x00\x56" + b"\xff\xd9"
    return out


def gif(
    width: int,
    height: int,
    *,
    frame: tuple[int, int, int, int] | None = None,
    palette: bool = True,
    extensions: int = 1,
) -> bytes:
    flags = 0x80 | 0x01 if palette else 0  # a 4-color global palette
    out = b"GIF89a" + struct.pack("<HHBBB", width, height, flags, 0, 0)
    out += b"\x00\x00\x00\xff\xff\xff\x80\x80\x80\x40\x40\x40" if palette else b""
    for _ in range(extensions):
        out += b"\x21\xf9\x04\x00\x00\x00\x00\x00"  # graphic control
        out += b"\x21\xfe\x05hello\x03abc\x00"  # comment in two sub-blocks
    left, top, w, h = frame or (0, 0, width, height)
    out += b"\x2c" + struct.pack("<HHHHB", left, top, w, h, 0)
    return out + b"\x02\x02\x44\x01\x00\x3b"


def riff(chunk: bytes, payload: bytes) -> bytes:
    body = b"WEBP" + chunk + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_lossy(width: int, height: int) -> bytes:
    return riff(b"VP8 ", b"\x30\x01\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\0")


def webp_lossless(width: int, height: int) -> bytes:
    bits = (width - 1) | (height - 1) << 14
    return riff(b"VP8L", b"\x2f" + struct.pack("<I", bits) + b"\0\0")


def webp_extended(width: int, height: int) -> bytes:
    sides = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return riff(b"VP8X", b"\x10\0\0\0" + sides) + b"ALPH\0\0\0\0"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# --- image_size ---------------------------------------------------------------------------------

BUILDERS: list[Builder] = [png, jpeg, gif, webp_lossy, webp_lossless, webp_extended]
SIZES = [(1, 1), (1024, 1024), (640, 480), (4000, 1474), (16383, 3), (3, 16383)]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_size_is_read_from_each_format(build: Builder, size: tuple[int, int]) -> None:
    assert image_size(build(*size)) == size


def test_large_sides() -> None:
    assert image_size(png(100_000, 70_000)) == (100_000, 70_000)
    assert image_size(jpeg(65_535, 65_535)) == (65_535, 65_535)
    assert image_size(gif(65_535, 2)) == (65_535, 2)
    assert image_size(webp_extended(1 << 24, 5)) == (1 << 24, 5)


@pytest.mark.parametrize("marker", [0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF])
def test_every_jpeg_frame_kind(marker: int) -> None:
    assert image_size(jpeg(300, 200, sof_marker=marker)) == (300, 200)


def test_jpeg_segments_that_are_not_frames_are_skipped() -> None:
    # DHT (C4), JPG (C8) and DAC (CC) share the C0-CF range without being frame headers.
    tricky = segment(0xC4, struct.pack(">BHHB", 8, 9999, 9999, 1))
    tricky += segment(0xCC, struct.pack(">BHHB", 8, 9999, 9999, 1))
    assert image_size(jpeg(300, 200, extra=tricky)) == (300, 200)
    # Fill bytes before a marker and restart markers are allowed.
    data = jpeg(300, 200)
    assert image_size(data[:2] + b"\xff\xff\xff\xd0" + data[2:]) == (300, 200)


def test_jpeg_with_two_frame_headers_reports_the_larger_sides() -> None:
    # Decoders keep the last frame header; one that keeps the first is as likely: either way
    # the sides reported are at least what either would bill.
    assert image_size(jpeg(300, 200, extra=sof(0xC0, 100, 900))) == (300, 900)


def test_jpeg_without_a_frame_or_with_height_defined_later_is_unsized() -> None:
    assert image_size(jpeg(300, 0)) is None  # height 0: set by a DNL marker after the scan
    no_frame = jpeg(300, 200).replace(sof(0xC0, 300, 200), b"")
    assert image_size(no_frame) is None
    assert image_size(b"\xff\xd8\xff\xd9") is None
    assert image_size(b"\xff\xd8\xff\xe0\x00\x01") is None  # segment length below 2


def test_jpeg_cut_before_the_scan_is_unsized() -> None:
    # A second, larger frame header could follow: the size is known only at the scan.
    data = jpeg(300, 200)
    scan = data.index(b"\xff\xda")
    assert image_size(data[: scan + 2]) == (300, 200)
    assert image_size(data[:scan]) is None


def test_gif_grows_to_its_first_frame() -> None:
    assert image_size(gif(10, 10, frame=(5, 7, 100, 50))) == (105, 57)
    assert image_size(gif(200, 100, frame=(0, 0, 20, 20))) == (200, 100)
    assert image_size(gif(0, 0, frame=(0, 0, 64, 32))) == (64, 32)
    assert image_size(gif(64, 32, palette=False, extensions=0)) == (64, 32)
    assert image_size(gif(64, 32, extensions=5)) == (64, 32)


def test_gif_without_a_frame_is_unsized() -> None:
    header = gif(64, 32)
    assert image_size(header[: header.index(b"\x2c")] + b"\x3b") is None
    assert image_size(header[: header.index(b"\x2c")]) is None


def test_webp_with_bad_signatures_is_unsized() -> None:
    lossy = bytearray(webp_lossy(64, 32))
    lossy[23] = 0
    assert image_size(bytes(lossy)) is None
    lossless = bytearray(webp_lossless(64, 32))
    lossless[20] = 0
    assert image_size(bytes(lossless)) is None
    assert image_size(riff(b"VP9 ", b"\0" * 20)) is None
    assert image_size(webp_lossy(0, 32)) is None


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_every_truncated_header_is_unsized(build: Builder) -> None:
    data = build(640, 480)
    complete = min(n for n in range(len(data) + 1) if image_size(data[:n]) is not None)
    for n in range(complete):
        assert image_size(data[:n]) is None, n
    # Past that point the answer never changes.
    for n in range(complete, len(data) + 1):
        assert image_size(data[:n]) == (640, 480), n


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x89PNG",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDX\x00\x00\x01\x00\x00\x00\x01\x00",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00\x00\x00\x00\x00\x01\x00",
        b"GIF87a",
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x99",
        b"RIFF\x00\x00\x00\x00WEBP",
        b"BM" + b"\x00" * 40,
        b"<svg width='10' height='10'/>",
        b"\x00\x00\x00\x1cftypavif",
        bytes(100),
        b"\xff" * 100,
        b"\xff\xd8" + b"\xff" * 100,
    ],
)
def test_garbage_is_unsized(data: bytes) -> None:
    assert image_size(data) is None


def test_random_and_mutated_bytes_never_raise() -> None:
    rng = random.Random(2024)
    prefixes = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP"]
    for _ in range(5000):
        data = rng.choice(prefixes) + rng.randbytes(rng.randrange(64))
        size = image_size(data)
        assert size is None or (size[0] > 0 and size[1] > 0)
    valid = [build(rng.randrange(1, 5000), rng.randrange(1, 5000)) for build in BUILDERS]
    for _ in range(5000):
        mutated = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        size = image_size(bytes(mutated[: rng.randrange(len(mutated) + 1)]))
        assert size is None or (size[0] > 0 and size[1] > 0)


# --- decode_data_url ----------------------------------------------------------------------------


def test_decodes_a_data_url() -> None:
    data = png(33, 17)
    assert decode_data_url(data_url(data), max_bytes=1 << 20) == data
    assert decode_data_url(data_url(data, "image/jpeg"), max_bytes=1 << 20) == data
    upper = "DATA:IMAGE/PNG;BASE64," + base64.b64encode(data).decode()
    assert decode_data_url(upper, max_bytes=1 << 20) == data
    params = "data:image/png;name=x.png;charset=binary;base64," + base64.b64encode(data).decode()
    assert decode_data_url(params, max_bytes=1 << 20) == data


def test_decodes_only_the_prefix() -> None:
    data = png(4000, 3000) + bytes(range(256)) * 40_000  # about 10 MB
    url = data_url(data)
    for limit in (1, 2, 3, 4, 1000, 1024, HEADER_BYTES):
        assert decode_data_url(url, max_bytes=limit) == data[:limit]
    assert decode_data_url(url, max_bytes=0) == b""


def test_whitespace_and_stray_characters_are_skipped() -> None:
    data = png(100, 50)
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert decode_data_url("data:image/png;base64," + wrapped, max_bytes=1 << 20) == data
    assert decode_data_url("data:image/png;base64,  " + text, max_bytes=1 << 20) == data
    assert decode_data_url("data:image/png;base64,iVBORw0KGgo", max_bytes=100) == data[:6]


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a.png",
        "data:text/plain;base64,aGVsbG8=",
        "data:image/png,rawbytes",
        "data:image/png;base64",
        "data:;base64,iVBORw0KGgo=",
        "data:base64,iVBORw0KGgo=",
        "data:image/png;" + "x" * 1000 + ";base64,iVBORw0KGgo=",
        "",
        "data:",
    ],
)
def test_other_urls_are_not_decoded(url: str) -> None:
    assert decode_data_url(url, max_bytes=100) is None


def test_malformed_base64_never_raises() -> None:
    rng = random.Random(9)
    alphabet = "AZaz09+/=-_ \n%é\x00,;"
    for _ in range(2000):
        url = "data:image/png;base64," + "".join(rng.choice(alphabet) for _ in range(40))
        decoded = decode_data_url(url, max_bytes=rng.randrange(1, 40))
        assert decoded is None or isinstance(decoded, bytes)
    padded_early = decode_data_url("data:image/png;base64,A=A=A=A=", max_bytes=10)
    assert padded_early is None or len(padded_early) <= 10
    assert decode_data_url(None, max_bytes=10) is None  # type: ignore[arg-type]


def test_data_url_size_reads_past_large_jpeg_metadata() -> None:
    assert data_url_size(data_url(png(1920, 1080))) == (1920, 1080)
    assert data_url_size(data_url(jpeg(1920, 1080, metadata=20_000), "image/jpeg")) == (
        1920,
        1080,
    )
    # Past HEADER_BYTES of metadata the size is not looked for: the caller holds the most.
    assert data_url_size(data_url(jpeg(1920, 1080, metadata=70_000), "image/jpeg")) is None
    assert data_url_size(data_url(b"not an image")) is None
    assert data_url_size("https://example.com/a.png") is None
    assert data_url_size("data:image/png;base64,") is None


# --- image_tokens: tile models ------------------------------------------------------------------


def test_documented_gpt_4o_examples() -> None:
    # OpenAI "Images and vision", "Calculating costs": the three gpt-4o examples.
    assert image_tokens("gpt-4o", detail="high", size=(1024, 1024)) == 765  # 4 tiles
    assert image_tokens("gpt-4o", detail="high", size=(2048, 4096)) == 1105  # 6 tiles
    assert image_tokens("gpt-4o", detail="low", size=(4096, 8192)) == 85


@pytest.mark.parametrize("detail", ["auto", None, "high", "original", "HIGH", ""])
def test_anything_but_low_is_priced_as_high(detail: str | None) -> None:
    assert image_tokens("gpt-4o", detail=detail, size=(1024, 1024)) == 765
    assert image_tokens("gpt-4o", detail=detail, size=None) == 85 + 8 * 170


@pytest.mark.parametrize(
    ("model", "base", "per_tile"),
    [
        ("gpt-4o", 85, 170),
        ("chatgpt-4o-latest", 85, 170),
        ("gpt-4.1", 85, 170),
        ("gpt-4.5-preview", 85, 170),
        ("gpt-4-turbo", 85, 170),
        ("gpt-4o-mini", 2833, 5667),
        ("gpt-5", 70, 140),
        ("gpt-5-chat-latest", 70, 140),
        ("o1", 75, 150),
        ("o1-pro", 75, 150),
        ("o3", 75, 150),
        ("computer-use-preview", 65, 129),
    ],
)
def test_tile_families(model: str, base: int, per_tile: int) -> None:
    assert image_tokens(model, detail="low", size=(4096, 8192)) == base
    assert image_tokens(model, detail="low", size=None) == base
    assert image_tokens(model, detail="high", size=(1024, 1024)) == base + 4 * per_tile
    assert image_tokens(model, detail="high", size=(2048, 4096)) == base + 6 * per_tile
    assert image_tokens(model, detail="high", size=(512, 512)) == base + per_tile
    assert image_tokens(model, detail="high", size=(64, 32)) == base + per_tile  # not enlarged
    assert image_tokens(model, detail="high", size=None) == base + MAX_TILES * per_tile


def test_gpt_4o_mini_bills_2833_plus_5667_a_tile() -> None:
    assert image_tokens("gpt-4o-mini", detail="high", size=(1024, 1024)) == 2833 + 4 * 5667
    assert image_tokens("gpt-4o-mini", detail="auto", size=None) == 2833 + 8 * 5667


def test_tiles_after_scaling() -> None:
    tokens = {
        (768, 2048): 8,  # the largest: 2 x 4
        (2048, 768): 8,
        (5000, 1875): 8,  # fit 2048 -> 2048 x 768
        (4000, 100): 4,  # fit 2048 -> 2048 x 51.2
        (100, 4000): 4,
        (1536, 1536): 4,  # -> 768 x 768
        (513, 512): 2,
        (1025, 10): 3,
        (2049, 513): 8,  # measured: the API bills 8 tiles
        (2050, 513): 8,  # exact 512.4995 rounds up here; the API rounds it to 4 tiles
    }
    for (width, height), tiles in tokens.items():
        assert image_tokens("gpt-4o", detail="high", size=(width, height)) == 85 + 170 * tiles


def test_no_size_is_the_most_a_tile_image_can_cost() -> None:
    most = image_tokens("gpt-4o", detail="high", size=None)
    seen = 0
    rng = random.Random(3)
    sides = [*range(1, 40), *range(500, 530), *range(760, 780), *range(2040, 2060), 10**6]
    sizes = [(w, h) for w in sides for h in sides]
    sizes += [(rng.randrange(1, 20_000), rng.randrange(1, 20_000)) for _ in range(20_000)]
    for size in sizes:
        tokens = image_tokens("gpt-4o", detail="high", size=size)
        assert tokens is not None and tokens <= (most or 0), size
        seen = max(seen, tokens)
    assert seen == most


# --- image_tokens: patch models -----------------------------------------------------------------


def test_documented_patch_examples() -> None:
    # OpenAI "Images and vision", "Calculating costs": 1024 x 1024 is 1024 patches;
    # 1800 x 2400 is over the 1536 budget, shrinks to 1056 x 1408: 33 x 44 = 1452 patches.
    assert images._patches(1024, 1024, budget=1536) == 1024
    assert images._patches(1800, 2400, budget=1536) == 1452
    assert images._patches(2400, 1800, budget=1536) == 1452
    assert image_tokens("gpt-4.1-mini", detail=None, size=(1024, 1024)) == ceil(1024 * 1.62) + 1
    assert image_tokens("gpt-4.1-mini", detail=None, size=(1800, 2400)) == ceil(1452 * 1.62) + 1
    assert image_tokens("gpt-4.1-nano", detail=None, size=(1024, 1024)) == ceil(1024 * 2.46) + 1
    assert image_tokens("o4-mini", detail=None, size=(1024, 1024)) == ceil(1024 * 1.72) + 1


def test_measured_patch_bills() -> None:
    # A 128 x 64 image (8 patches) billed 14 on gpt-4.1-mini and 21 on gpt-4.1-nano: one
    # over the rounded product, hence PATCH_MARGIN.
    assert image_tokens("gpt-4.1-mini", detail="high", size=(128, 64)) == 14
    assert image_tokens("gpt-4.1-nano", detail="high", size=(128, 64)) == 21
    # 4000 x 1474 on gpt-4.1-mini billed 1536 x 1.62: fit 2048 first (2048 x 755, 64 x 24
    # patches), not straight to the budget (1449 patches).
    assert images._patches(4000, 1474, budget=1536) == 1536


@pytest.mark.parametrize(
    ("model", "multiplier"),
    [
        ("gpt-4.1-mini", 1.62),
        ("gpt-4.1-nano", 2.46),
        ("gpt-5-mini", 1.62),
        ("gpt-5-nano", 2.46),
        ("gpt-5.4-mini", 1.62),
        ("gpt-5.4-nano", 2.46),
        ("o4-mini", 1.72),
    ],
)
def test_patch_families(model: str, multiplier: float) -> None:
    most = ceil(PATCH_BUDGET * multiplier - 1e-9) + PATCH_MARGIN
    for detail in ("low", "high", "auto", None):  # no low-detail figure: low is priced as high
        assert image_tokens(model, detail=detail, size=None) == most
        assert image_tokens(model, detail=detail, size=(32, 32)) == ceil(multiplier) + 1
        assert image_tokens(model, detail=detail, size=(2048, 768)) == most  # 64 x 24


def test_no_size_is_the_most_a_patch_image_can_cost() -> None:
    rng = random.Random(4)
    sides = [*range(1, 40), *range(1000, 1300, 7), *range(2040, 2060), 10**6]
    sizes = [(w, h) for w in sides for h in sides]
    sizes += [(rng.randrange(1, 20_000), rng.randrange(1, 20_000)) for _ in range(20_000)]
    for size in sizes:
        patches = images._patches(*size, budget=PATCH_BUDGET)
        assert 1 <= patches <= PATCH_BUDGET, size
        # Within 2048 x 2048, over the budget: the guide's shrink, exactly.
        if max(size) <= 2048 and images._covers(*size) > PATCH_BUDGET:
            assert patches == images._shrunk(*size, PATCH_BUDGET), size


def test_shrink_matches_the_guides_float_formula() -> None:
    rng = random.Random(5)
    for _ in range(5000):
        width, height = rng.randrange(100, 2049), rng.randrange(100, 2049)
        if images._covers(width, height) <= PATCH_BUDGET:
            continue
        shrink = (32**2 * PATCH_BUDGET / (width * height)) ** 0.5
        adjusted = shrink * min(
            (width * shrink // 32) / (width * shrink / 32),
            (height * shrink // 32) / (height * shrink / 32),
        )
        expected = ceil(round(width * adjusted) / 32) * ceil(round(height * adjusted) / 32)
        assert images._shrunk(width, height, PATCH_BUDGET) >= min(expected, PATCH_BUDGET)


# --- image_tokens: model names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "rule"),
    [
        ("gpt-4o-2024-08-06", FAMILIES["gpt-4o"]),
        ("openai/gpt-4o-mini", FAMILIES["gpt-4o-mini"]),
        ("azure/openai/gpt-4o-mini-2024-07-18", FAMILIES["gpt-4o-mini"]),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", FAMILIES["gpt-4o-mini"]),
        ("GPT-4O", FAMILIES["gpt-4o"]),
        ("gpt-4.1-mini-2025-04-14", FAMILIES["gpt-4.1-mini"]),
        ("gpt-5-2025-08-07", FAMILIES["gpt-5"]),
        ("o3-2025-04-16", FAMILIES["o3"]),
        ("computer-use-preview-2025-03-11", FAMILIES["computer-use-preview"]),
    ],
)
def test_snapshots_and_prefixes_match(model: str, rule: Tiles | Patches) -> None:
    assert family(model) is rule


@pytest.mark.parametrize(
    "model",
    [
        "test-chat",
        "",
        "gpt-4",
        "gpt-3.5-turbo",
        "gpt-4o-mini-tts",
        "gpt-4o-audio-preview",
        "o3-mini",
        "o1-mini",
        "gpt-5.1",
        "gpt-5.2",  # patch-based, but the guide gives no multiplier
        "gpt-5.4",
        "gpt-5-pro",
        "gpt-5-codex",
        "gpt-4o-latest-preview",
        "gpt-4o-2024",
        "my-gpt-4o",
    ],
)
def test_undocumented_models_have_no_figure(model: str) -> None:
    assert family(model) is None
    assert image_tokens(model, detail="low", size=(10, 10)) is None
    assert image_tokens(model, detail="high", size=None) is None


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (1.5, 2), ("a", 3), (1, 2, 3), [1, 2]])
def test_invalid_sizes_count_as_unknown(size: object) -> None:
    assert image_tokens("gpt-4o", detail="high", size=size) == 85 + 8 * 170  # type: ignore[arg-type]


def test_sized_data_urls_end_to_end() -> None:
    for build, mime in ((png, "image/png"), (jpeg, "image/jpeg"), (webp_lossy, "image/webp")):
        size = data_url_size(data_url(build(1024, 1024), mime))
        assert image_tokens("gpt-4o", detail="auto", size=size) == 765
