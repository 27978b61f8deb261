from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from itertools import accumulate, pairwise

import pytest

from proxy.sse import Frame, ServerSentEvent, SSEDecoder

BOM = b"\xef\xbb\xbf"


def decode(chunks: Iterable[bytes]) -> tuple[list[Frame], bytes]:
    """Feed ``chunks`` to a fresh decoder, then flush; checks the raw-bytes invariant."""
    decoder = SSEDecoder()
    frames: list[Frame] = []
    fed = b""
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
        fed += chunk
        assert b"".join(f.raw for f in frames) + fed[len(fed) - decoder.buffered :] == fed
    tail, leftover = decoder.flush()
    frames.extend(tail)
    assert decoder.buffered == 0
    assert b"".join(f.raw for f in frames) + leftover == fed
    return frames, leftover


def split(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in pairwise(bounds)]


def events(frames: Sequence[Frame]) -> list[ServerSentEvent]:
    return [f.event for f in frames if f.event is not None]


def msg(data: str, *, event: str = "message", id: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(event=event, data=data, id=id)


def assert_split_independent(stream: bytes) -> tuple[list[Frame], bytes]:
    """Same frames and leftover for the whole stream, every 2-way split, and 1-byte chunks."""
    expected = decode([stream])
    for i in range(len(stream) + 1):
        assert decode(split(stream, [i])) == expected, f"split at {i}"
    assert decode([stream[i : i + 1] for i in range(len(stream))]) == expected
    return expected


# --- OpenAI-shaped streams ------------------------------------------------------------------


def openai_chunk(**fields: object) -> bytes:
    body = {
        "id": "chatcmpl-9x",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_0ba0d124f1",
        **fields,
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def delta(content: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}
    return openai_chunk(choices=[choice], usage=None)


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
OPENAI_STREAM = b"".join(
    [
        delta(""),
        delta("Hé"),
        delta("llo ☃"),
        delta("", finish="stop"),
        openai_chunk(choices=[], usage=USAGE),
        b"data: [DONE]\n\n",
    ]
)


def test_openai_stream_split_at_every_byte() -> None:
    frames, leftover = assert_split_independent(OPENAI_STREAM)
    assert leftover == b""
    assert [f.raw for f in frames] == [f + b"\n\n" for f in OPENAI_STREAM.split(b"\n\n")[:-1]]
    *chunks, done = events(frames)
    assert done == msg("[DONE]")
    bodies = [json.loads(e.data) for e in chunks]
    text = "".join(c["delta"]["content"] for b in bodies for c in b["choices"])
    assert text == "Héllo ☃"
    assert bodies[-1]["usage"] == USAGE


def test_openai_stream_with_crlf_matches_lf() -> None:
    crlf = OPENAI_STREAM.replace(b"\n", b"\r\n")
    frames, leftover = assert_split_independent(crlf)
    assert leftover == b""
    assert events(frames) == events(decode([OPENAI_STREAM])[0])
    assert frames[-1].raw == b"data: [DONE]\r\n\r\n"


def test_typical_chunking_keeps_frames_whole() -> None:
    decoder = SSEDecoder()
    frame = delta("hi")
    assert [f.raw for f in decoder.feed(frame)] == [frame]
    assert decoder.buffered == 0
    assert decoder.feed(frame[:50]) == []
    assert decoder.buffered == 50
    [whole] = decoder.feed(frame[50:] + b": keep")
    assert whole.raw == frame
    assert decoder.buffered == len(b": keep")


# --- line endings ---------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = eol.join([b"event: add", b"data: a", b"data: b", b"", b"data: c", b"", b""])
    frames, leftover = assert_split_independent(stream)
    assert leftover == b""
    assert [f.raw for f in frames] == [
        b"event: add" + eol + b"data: a" + eol + b"data: b" + eol + eol,
        b"data: c" + eol + eol,
    ]
    assert events(frames) == [msg("a\nb", event="add"), msg("c")]


def test_mixed_line_endings() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    frames, leftover = assert_split_independent(stream)
    assert [f.raw for f in frames] == [b"data: a\r\ndata: b\rdata: c\n\r\n", b"data: d\r\r"]
    assert events(frames) == [msg("a\nb\nc"), msg("d")]
    assert leftover == b""


def test_crlf_split_between_cr_and_lf_waits_for_next_byte() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r\n\r") == []
    assert decoder.buffered == len(b"data: a\r\ndata: b\r\n\r")
    [frame] = decoder.feed(b"\n")
    assert frame.raw == b"data: a\r\ndata: b\r\n\r\n"
    assert frame.event == msg("a\nb")
    assert decoder.buffered == 0
    assert decoder.flush() == ([], b"")


def test_lone_cr_at_chunk_end_resolved_by_other_byte() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == []
    [frame] = decoder.feed(b"d")
    assert frame == Frame(b"data: a\r\r", msg("a"))
    assert decoder.buffered == 1


def test_final_cr_completes_frame_at_end_of_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\r") == []
    assert decoder.flush() == ([Frame(b"data: a\n\r", msg("a"))], b"")


def test_final_cr_ends_a_line_but_not_a_frame() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\r") == [Frame(b"data: a\n\n", msg("a"))]
    assert decoder.flush() == ([], b"data: b\r")


# --- fields ---------------------------------------------------------------------------------


def test_comments_and_keepalives_are_frames_without_events() -> None:
    stream = b": keepalive\n\n:\n\n\ndata: x\n: inside an event\ndata: y\n\n"
    frames, leftover = assert_split_independent(stream)
    assert frames == [
        Frame(b": keepalive\n\n", None),
        Frame(b":\n\n", None),
        Frame(b"\n", None),
        Frame(b"data: x\n: inside an event\ndata: y\n\n", msg("x\ny")),
    ]
    assert leftover == b""


def test_multiline_data_and_empty_data_lines() -> None:
    stream = b"data: YHOO\ndata: +2\ndata: 10\n\ndata\n\ndata\ndata\n\ndata:\n\ndata:"
    frames, leftover = assert_split_independent(stream)
    assert events(frames) == [msg("YHOO\n+2\n10"), msg(""), msg("\n"), msg("")]
    assert leftover == b"data:"


def test_one_leading_space_is_stripped() -> None:
    stream = b"data:test\n\ndata: test\n\ndata:  third\n\ndata: a: b\n\n"
    assert events(decode([stream])[0]) == [msg("test"), msg("test"), msg(" third"), msg("a: b")]


def test_event_field_sets_type_for_one_frame() -> None:
    stream = b"event: add\ndata: 1\n\ndata: 2\n\nevent: x\n\ndata: 3\n\nevent:\ndata: 4\n\n"
    got = events(assert_split_independent(stream)[0])
    assert got == [msg("1", event="add"), msg("2"), msg("3"), msg("4")]


def test_id_persists_until_replaced() -> None:
    stream = (
        b"data: a\nid: 1\n\ndata: b\n\nid: 2\n\ndata: c\n\n"
        b"data: d\nid: 3\x00\n\ndata: e\nid\n\ndata: f\nid: \xc3\xa9\n\n"
    )
    got = events(assert_split_independent(stream)[0])
    assert [(e.data, e.id) for e in got] == [
        ("a", "1"),
        ("b", "1"),
        ("c", "2"),  # an id-only frame dispatches nothing but still sets the ID
        ("d", "2"),  # an id containing NUL is ignored
        ("e", ""),
        ("f", "é"),
    ]


@pytest.mark.parametrize(
    ("value", "retry"),
    [
        (b"10000", 10000),
        (b"0", 0),
        (b"1667a", None),
        (b"-1", None),
        (b" 5", None),
        (b"", None),
        (b"1.5", None),
        ("٣".encode(), None),  # a digit, but not an ASCII one
        (b"9" * 5000, None),  # more digits than int() parses
    ],
)
def test_retry_only_ascii_digits(value: bytes, retry: int | None) -> None:
    [event] = events(decode([b"retry: " + value + b"\ndata: x\n\n"])[0])
    assert event.retry == retry


def test_retry_belongs_to_its_frame() -> None:
    stream = b"retry: 5\n\ndata: a\n\ndata: b\nretry: 7\n\ndata: c\n\n"
    frames, _ = decode([stream])
    assert frames[0] == Frame(b"retry: 5\n\n", None)
    assert [(e.data, e.retry) for e in events(frames)] == [("a", None), ("b", 7), ("c", None)]


def test_unknown_and_malformed_fields_are_ignored() -> None:
    stream = b"something: x\nData: no\n data: no\nevent\ndata: kept\nfoo\n\nbar: 1\n\n"
    frames, _ = decode([stream])
    assert frames == [
        Frame(b"something: x\nData: no\n data: no\nevent\ndata: kept\nfoo\n\n", msg("kept")),
        Frame(b"bar: 1\n\n", None),
    ]


# --- BOM and encoding -----------------------------------------------------------------------


def test_leading_bom_ignored_for_parsing_kept_in_raw() -> None:
    stream = BOM + b"data: a\n\n" + BOM + b"data: b\n\ndata: c\n\n"
    frames, leftover = assert_split_independent(stream)
    assert frames[0] == Frame(BOM + b"data: a\n\n", msg("a"))
    # only the stream's first BOM is ignored: the second makes an unknown field name
    assert frames[1] == Frame(BOM + b"data: b\n\n", None)
    assert frames[2] == Frame(b"data: c\n\n", msg("c"))
    assert leftover == b""


def test_bom_alone_then_blank_line() -> None:
    assert decode([BOM, b"\n"]) == ([Frame(BOM + b"\n", None)], b"")


def test_partial_bom_is_not_a_bom() -> None:
    frames, _ = assert_split_independent(b"\xef\xbbdata: a\n\ndata: b\n\n")
    assert frames[0].event is None
    assert events(frames) == [msg("b")]


@pytest.mark.parametrize("stream", [b"", b"\xef", b"\xef\xbb", BOM, BOM + b"da"])
def test_short_stream_is_all_leftover(stream: bytes) -> None:
    assert decode(split(stream, range(1, len(stream)))) == ([], stream)


def test_non_ascii_split_mid_character() -> None:
    text = "data: héllo ☃ 世界 😀\nevent: ünï\ndata: ∑\n\n"
    stream = text.encode()
    frames, _ = assert_split_independent(stream)
    assert events(frames) == [msg("héllo ☃ 世界 😀\n∑", event="ünï")]


def test_invalid_utf8_is_replaced() -> None:
    stream = b"data: \xff ok \xe2\x82\ndata: \xe2\x82\xac\n\n"
    assert events(assert_split_independent(stream)[0]) == [msg("\ufffd ok \ufffd\n€")]


# --- end of stream and buffering -------------------------------------------------------------


def test_unterminated_final_event_is_leftover() -> None:
    decoder = SSEDecoder()
    [frame] = decoder.feed(b'data: {"a":1}\n\ndata: {"usage"')
    assert frame.event == msg('{"a":1}')
    assert decoder.feed(b": 1}\n") == []
    assert decoder.buffered == len(b'data: {"usage": 1}\n')
    assert decoder.flush() == ([], b'data: {"usage": 1}\n')
    assert decoder.buffered == 0


def test_flush_resets_for_a_new_stream() -> None:
    decoder = SSEDecoder()
    decoder.feed(BOM + b"id: 1\nevent: x\ndata: partial\n")
    assert decoder.flush() == ([], BOM + b"id: 1\nevent: x\ndata: partial\n")
    [frame] = decoder.feed(BOM + b"data: new\n\n")
    assert frame == Frame(BOM + b"data: new\n\n", msg("new"))


def test_empty_chunks_change_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == [Frame(b"data: a\n\n", msg("a"))]


def test_large_event_in_small_chunks() -> None:
    payload = b"x" * 200_000
    stream = b"data: " + payload + b"\r\ndata: " + payload + b"\r\n\r\n"
    chunks = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]
    decoder = SSEDecoder()
    held: list[int] = []
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
        held.append(decoder.buffered)
    assert held == [1000 * (i + 1) for i in range(len(chunks) - 1)] + [0]
    assert frames == [Frame(stream, msg(f"{'x' * 200_000}\n{'x' * 200_000}"))]


# --- split independence against a whole-stream reference --------------------------------------


def reference(stream: bytes) -> tuple[list[Frame], bytes]:
    """Whole-stream decoding written straight from the spec, for comparison."""
    body = stream[3:] if stream.startswith(BOM) else stream
    raws: list[bytes] = []
    frame_start = 0
    for m in re.finditer(rb"[^\r\n]*(?:\r\n|\r|\n)", body):
        if m.group() in (b"\r\n", b"\r", b"\n"):
            raws.append(body[frame_start : m.end()])
            frame_start = m.end()
    if body is not stream and raws:
        raws[0] = BOM + raws[0]

    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    found: list[ServerSentEvent | None] = []
    event_type, data, retry, last_id = "", "", None, None
    for line in re.findall(r"([^\r\n]*)(?:\r\n|\r|\n)", text):
        if line == "":
            if data:
                found.append(ServerSentEvent(event_type or "message", data[:-1], last_id, retry))
            else:
                found.append(None)
            event_type, data, retry = "", "", None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    assert len(found) == len(raws)
    used = sum(map(len, raws))
    return [Frame(r, e) for r, e in zip(raws, found, strict=True)], stream[used:]


LINES = [
    b'data: {"choices":[{"delta":{"content":"h\xc3\xa9"}}]}',
    b"data: [DONE]",
    b"data:",
    b"data",
    b"data:  two spaces",
    b"data: \xf0\x9f\x98\x80 \xe4\xb8\x96",
    b"data: \xff\xe2\x82",
    b"event: delta",
    b"event",
    b"id: 42",
    b"id: a\x00b",
    b"id",
    b"retry: 3000",
    b"retry: 3x",
    b": keepalive",
    b":",
    b"unknown: field",
    b"",
    b"",
    b"",
]


def random_stream(rng: random.Random) -> bytes:
    eols = [b"\n", b"\r\n", b"\r"] if rng.random() < 0.6 else [b"\n"]
    parts = [BOM] if rng.random() < 0.2 else []
    for _ in range(rng.randint(0, 30)):
        parts += [rng.choice(LINES), rng.choice(eols)]
    if rng.random() < 0.5:
        parts.append(rng.choice(LINES))  # unterminated tail
    return b"".join(parts)


@pytest.mark.parametrize("seed", range(300))
def test_random_streams_and_splits_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    stream = random_stream(rng)
    expected = reference(stream)
    assert decode([stream]) == expected
    for _ in range(20):
        positions = range(1, len(stream))
        cuts = rng.sample(positions, min(len(positions), rng.randint(1, 12)))
        assert decode(split(stream, cuts)) == expected, (stream, sorted(cuts))


def test_openai_stream_random_splits() -> None:
    rng = random.Random(20240718)
    stream = BOM + OPENAI_STREAM.replace(b"\n\n", b"\n: ping\n\n", 2)
    expected = reference(stream)
    for _ in range(500):
        cuts = rng.sample(range(1, len(stream)), rng.randint(1, 40))
        assert decode(split(stream, cuts)) == expected


# --- chunks of whole frames (the one-line fast path) ---------------------------------------

FRAMES = [
    b'data: {"choices":[{"delta":{"content":"h\xc3\xa9"}}]}\n\n',
    b"data: [DONE]\n\n",
    b"data:\n\n",
    b"data:x\n\n",
    b"data: \xff\xe2\x82\n\n",
    b": ping\n\n",
    b":\n\n",
    b"data: a\ndata: b\n\n",
    b"event: delta\ndata: y\n\n",
    b"id: 7\n\n",
    b"id: 9\ndata: z\n\n",
    b"retry: 5\ndata: r\n\n",
    b"data\n\n",
    b"\n",
    b"data: cr\r\n\r\n",
]


@pytest.mark.parametrize("seed", range(200))
def test_chunks_of_whole_frames_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    frames = [rng.choice(FRAMES) for _ in range(rng.randint(1, 25))]
    stream = (BOM if rng.random() < 0.2 else b"") + b"".join(frames)
    ends = list(accumulate(len(f) for f in frames))[:-1]
    cuts = rng.sample(ends, rng.randint(0, len(ends)))
    assert decode(split(stream, cuts)) == reference(stream)


def test_chunks_of_one_line_frames_take_the_fast_path() -> None:
    decoder = SSEDecoder()
    decoder.feed(b": open\n\n")  # past the check for a leading BOM
    chunk = b'data: {"a":1}\n\n: ping\n\ndata:x\n\n'
    assert (
        decoder._simple(chunk)
        == decoder.feed(chunk)
        == [
            Frame(b'data: {"a":1}\n\n', msg('{"a":1}')),
            Frame(b": ping\n\n", None),
            Frame(b"data:x\n\n", msg("x")),
        ]
    )
    for other in (b"data: a\ndata: b\n\n", b"event: e\ndata: y\n\n", b"\n\n\n\n", b"id: 1\n\n"):
        assert decoder._simple(other) is None


@pytest.mark.parametrize("seed", range(200))
def test_a_lone_data_chunk_is_the_one_frame_feed_would_give(seed: int) -> None:
    rng = random.Random(seed)
    frames = [rng.choice(FRAMES) for _ in range(rng.randint(1, 25))]
    stream = (BOM if rng.random() < 0.2 else b"") + b"".join(frames)
    ends = list(accumulate(len(f) for f in frames))[:-1]
    cuts = rng.sample(ends, rng.randint(0, len(ends)))
    cuts += rng.sample(range(1, len(stream)), rng.randint(0, 3))  # and some mid-frame
    decoder = SSEDecoder()
    lone_seen = 0
    for chunk in split(stream, sorted(set(cuts))):
        lone = decoder.lone_data(chunk)
        fed = decoder.feed(chunk)
        if lone is not None:
            lone_seen += 1
            assert len(fed) == 1
            assert fed[0].raw == chunk
            assert fed[0].event is not None
            assert (fed[0].event.event, fed[0].event.data) == ("message", lone)
            assert decoder.buffered == 0
    assert lone_seen <= len(frames)


def test_only_a_whole_one_line_data_frame_is_lone() -> None:
    decoder = SSEDecoder()
    first = b'data: {"a":1}\n\n'
    assert decoder.lone_data(first) is None  # the stream's start: a BOM is still possible
    decoder.feed(first)
    assert decoder.lone_data(b'data: {"a":"\xc3\xa9"}\n\n') == '{"a":"\xe9"}'
    assert decoder.lone_data(b"data: [DONE]\n\n") == "[DONE]"
    for other in (
        b"data: a\ndata: b\n\n",
        b"event: e\ndata: y\n\n",
        b"id: 1\ndata: y\n\n",
        b"data: cr\r\n\r\n",
        b"data:x\n\n",  # no space: read by feed
        b": ping\n\n",
        b"data: a\n\ndata: b\n\n",
        b"data: partial",
    ):
        assert decoder.lone_data(other) is None, other
    decoder.feed(b"data: par")  # a frame in progress: nothing is lone until it ends
    assert decoder.lone_data(b"data: x\n\n") is None
