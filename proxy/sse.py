r"""Server-Sent Events decoding that keeps every byte, fed in whatever chunks arrive.

    >>> decoder = SSEDecoder()
    >>> frames = decoder.feed(b'data: {"n": 1}\n\n: ping\n\ndata: [DO')
    >>> [(frame.raw, frame.event and frame.event.data) for frame in frames]
    [(b'data: {"n": 1}\n\n', '{"n": 1}'), (b': ping\n\n', None)]
    >>> decoder.buffered
    9
    >>> [frame] = decoder.feed(b"NE]\n\n")
    >>> frame.raw, frame.event
    (b'data: [DONE]\n\n', ServerSentEvent(event='message', data='[DONE]', id=None, retry=None))
    >>> decoder.flush()
    ([], b'')

Sans-IO: plain bytes in, frames out. Joining every ``Frame.raw`` and the ``flush`` leftover
gives back the input exactly, and frame boundaries and events do not depend on how the input
was split, so a relay can forward bytes untouched while it reads the events beside them.
Fields are interpreted as the WHATWG "event stream interpretation" says: lines end in CRLF,
LF or CR; one leading BOM is ignored; ``:`` starts a comment; a blank line ends a frame, which
dispatches an event only if it had a ``data`` line.
"""

from __future__ import annotations

from contextlib import suppress
from typing import NamedTuple

__all__ = ["Frame", "SSEDecoder", "ServerSentEvent"]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_SPACE = 0x20
_COLON = 0x3A


class ServerSentEvent(NamedTuple):
    """One dispatched event, as an ``EventSource`` would deliver it.

    ``id`` is the last event ID in force (it carries over to later events until a new ``id``
    field replaces it); ``retry`` is a valid ``retry`` field sent in this event's own frame.
    """

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


class Frame(NamedTuple):
    """The exact bytes from the previous frame's end through the blank line that ends this one.

    ``event`` is ``None`` when the frame dispatches nothing: a comment-only keepalive, or any
    frame without a ``data`` line.
    """

    raw: bytes
    event: ServerSentEvent | None


class SSEDecoder:
    """Incremental decoder for one ``text/event-stream`` body.

    Call ``feed`` with each chunk as it arrives and ``flush`` once at the end of the stream::

        decoder = SSEDecoder()
        async for chunk in upstream.content.iter_any():
            await client.write(chunk)
            for frame in decoder.feed(chunk):
                if frame.event is not None:
                    inspect(frame.event)
            if decoder.buffered > limit:
                ...  # one event is too large: cut the stream
        frames, leftover = decoder.flush()

    Bytes after the last blank line are held (``buffered`` counts them) until a later chunk
    completes the frame; at the end of the stream ``flush`` hands back those not forming a
    complete frame, and per the standard their unterminated event is discarded.  A CR at the
    end of a chunk is held until the next byte shows whether it is half of a CRLF.  After
    ``flush`` the decoder is ready for a new stream.
    """

    __slots__ = (
        "_bom_pending",
        "_buf",
        "_data",
        "_event",
        "_last_id",
        "_pos",
        "_retry",
        "_scanned",
    )

    _buf: bytearray  # bytes of the frame in progress, from the previous frame's end
    _pos: int  # offset in _buf of the first line not yet parsed
    _scanned: int  # no line ending lies in _buf[_pos:_scanned]
    _bom_pending: bool  # the stream start has not yet been checked for a BOM
    _event: str  # event type buffer
    _data: list[str]  # data lines of the frame in progress
    _retry: int | None  # retry field of the frame in progress
    _last_id: str | None  # last event ID buffer; survives across frames

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._scanned = 0
        self._bom_pending = True
        self._event = ""
        self._data = []
        self._retry = None
        self._last_id = None

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the blank line that ends their frame."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Frame]:
        """Take the next chunk of the stream; return the frames it completes, in order."""
        if not chunk:
            return []
        buf = self._buf
        if not buf and not self._bom_pending and chunk[-2:] == b"\n\n" and b"\r" not in chunk:
            frames = self._simple(chunk)
            if frames is not None:
                return frames
        data: bytes | bytearray
        if buf:
            buf += chunk
            data = buf
        else:
            data = chunk
        if self._bom_pending:
            if len(data) < len(_BOM) and _BOM.startswith(data):
                if data is chunk:
                    buf += chunk
                return []
            self._bom_pending = False
            if data.startswith(_BOM):
                self._pos = self._scanned = len(_BOM)
        frames, used = self._scan(data, final=False)
        if data is buf:
            del buf[:used]
        elif used < len(chunk):
            buf += memoryview(chunk)[used:]
        return frames

    def lone_data(self, chunk: bytes) -> str | None:
        """The data of ``chunk`` when it is one whole frame of a single ``data: `` line and
        nothing is held from before (what LLM APIs send, one event a chunk): ``feed``
        would return that one frame, a message event with this data, and hold nothing.
        None for anything else, which is to be fed. Nothing is consumed either way."""
        if (
            chunk[:6] != b"data: "
            or chunk[-2:] != b"\n\n"
            or chunk.count(b"\n") != 2
            or b"\r" in chunk
            or self._buf
            or self._bom_pending
        ):
            return None
        return chunk[6:-2].decode("utf-8", "replace")

    def _simple(self, chunk: bytes) -> list[Frame] | None:
        """The frames of ``chunk`` when it is whole frames of one line each, a ``data``
        line or a comment, ended by LF (what LLM APIs send); None for anything else,
        which the general parser reads. Both give the same frames."""
        parts = chunk.split(b"\n\n")
        parts.pop()  # what follows the last blank line: nothing
        if chunk.count(b"\n") != 2 * len(parts):
            return None  # a frame of several lines, or blank lines of their own
        frames: list[Frame] = []
        last_id = self._last_id
        for part in parts:
            if part[:5] == b"data:":
                value = part[6:] if part[5:6] == b" " else part[5:]
                event = ServerSentEvent("message", value.decode("utf-8", "replace"), last_id)
                frames.append(Frame(part + b"\n\n", event))
            elif part[:1] == b":":
                frames.append(Frame(part + b"\n\n", None))
            else:
                return None  # another field, or an empty line
        return frames

    def flush(self) -> tuple[list[Frame], bytes]:
        """End the stream: return any frame a final CR completes, and the leftover bytes."""
        buf = self._buf
        frames: list[Frame] = []
        if buf and not self._bom_pending:
            frames, used = self._scan(buf, final=True)
            del buf[:used]
        leftover = bytes(buf)
        self._reset()
        return frames, leftover

    def _scan(self, data: bytes | bytearray, *, final: bool) -> tuple[list[Frame], int]:
        """Parse the complete lines of ``data`` from ``_pos``; return frames and bytes used.

        ``data`` starts at the previous frame's end.  Two cursors, one per line-ending byte,
        keep every search a single C-level ``find``; a stream without CR never searches twice.
        """
        frames: list[Frame] = []
        size = len(data)
        pos = self._pos
        start = 0  # first byte of the frame in progress
        lf = data.find(b"\n", self._scanned)
        cr = data.find(b"\r", self._scanned)
        while lf >= 0 or cr >= 0:
            if cr < 0 or 0 <= lf < cr:
                eol = lf
                end = lf + 1
            elif cr + 1 < size:
                eol = cr
                end = cr + 2 if data[cr + 1] == _LF else cr + 1
            elif final:
                eol = cr
                end = size
            else:
                break  # CR is the last byte so far: CRLF or a lone CR, the next byte decides
            if eol == pos:
                frames.append(Frame(bytes(data[start:end]), self._dispatch()))
                start = end
            elif data.startswith(b"data:", pos, eol):
                pos += 5
                if data[pos] == _SPACE:  # at worst data[eol], the line ending itself
                    pos += 1
                self._data.append(data[pos:eol].decode("utf-8", "replace"))
            elif data[pos] != _COLON:
                self._field(data[pos:eol])
            pos = end
            if 0 <= lf < pos:
                lf = data.find(b"\n", pos)
            if 0 <= cr < pos:
                cr = data.find(b"\r", pos)
        self._pos = pos - start
        self._scanned = (cr if cr >= 0 else size) - start
        return frames, start

    def _field(self, line: bytes | bytearray) -> None:
        """Apply one non-comment, non-blank line other than ``data:...`` to the frame."""
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():  # bytes.isdigit: ASCII digits, non-empty
            with suppress(ValueError):  # more digits than int() will parse
                self._retry = int(value)
        # any other field name is ignored

    def _dispatch(self) -> ServerSentEvent | None:
        """End the frame in progress: its event if it had data, else None; reset the buffers."""
        data = self._data
        event = self._event
        retry = self._retry
        self._event = ""
        self._retry = None
        if not data:
            return None
        self._data = []
        return ServerSentEvent(event or "message", "\n".join(data), self._last_id, retry)
