"""Compressed input files (`corpus.jsonl.gz`, `chat.jsonl.zst`, ...) read as plain byte streams.

A file is decompressed on the fly by its last suffix and never unpacked to disk, so a compressed corpus costs
no more disk or memory than a plain one. The format of the data inside is named by the suffix before the
compression suffix (`data_suffix`).

A truncated or corrupt archive only shows while reading, possibly after many good records: reads from
`open_binary` then raise `CorruptArchive` (naming the file and the decoder's error), so a reader can keep what
it read before and report the record where reading broke.

gzip, bz2 and xz use the standard library, zstd the `zstandard` package: they hand back every byte that decodes
before a cut, which is what lets a reader keep the documents before the break (Arrow's stream decoders, no
faster here, drop the last block decoded before a cut). Concatenated members/frames read as one stream, as with
the command-line tools.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from pathlib import Path
from typing import BinaryIO

import zstandard

COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")

_BUFFER = 1 << 20  # decompressed bytes per read: large enough that per-call overhead vanishes, small next to a shard


# A cut raises EOFError in every decoder; corrupt data raises gzip.BadGzipFile (an OSError) or zlib.error, OSError
# from bz2, LZMAError, ZstdError.
_DECODER_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, lzma.LZMAError,
                                                     zstandard.ZstdError)


class CorruptArchive(Exception):
    """A compressed file could not be decoded (truncated, corrupt, or not compressed the way its suffix says)."""

    def __init__(self, path: str | Path, error: BaseException) -> None:
        self.path, self.error = str(path), error
        super().__init__(f"{path}: {type(error).__name__}: {error}")


def archive_errors() -> tuple[type[BaseException], ...]:
    """What reading a truncated or corrupt archive can raise, for callers that catch them around their own reads.

    Streams from `open_binary` already turn the decoders' errors into `CorruptArchive`; the decoders' own types
    are listed too for code that decodes archives itself.
    """
    return (CorruptArchive, *_DECODER_ERRORS)


def compression_of(path: str | Path) -> str | None:
    """The compression suffix of `path` ('.gz', '.zst', ...), or None for a plain file."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in COMPRESSION_SUFFIXES else None


def data_suffix(path: str | Path) -> str:
    """The lowercase suffix naming the data format, under any compression suffix ('a.jsonl.gz' -> '.jsonl')."""
    p = Path(path)
    if compression_of(p):
        p = p.with_suffix("")
    return p.suffix.lower()


class _Decoded(io.RawIOBase):
    """A decompressing stream whose decoder errors become `CorruptArchive`.

    Wrapped in a BufferedReader, so `readline` runs in C over large decoded blocks and the error translation
    costs one Python call per block, not per line.
    """

    def __init__(self, stream: BinaryIO, path: Path) -> None:
        self._stream, self._path = stream, path
        # One decoding step per call: a buffered `readinto` fills the whole buffer over several steps, and if a
        # later step hits the cut, the bytes decoded by the earlier ones are lost with the exception.
        self._read = getattr(stream, "readinto1", stream.readinto)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        try:
            return self._read(b)
        except _DECODER_ERRORS as e:
            raise CorruptArchive(self._path, e) from e

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


class _ZstdFrames(io.RawIOBase):
    """zstd frames decoded one after another from `path`, a cut inside a frame raising EOFError.

    zstandard's own stream reader ends silently where a file is cut, so a truncated corpus would pass as a
    shorter one; a decompression object says whether its frame ended. Compressed input goes in 64 KiB steps,
    which bounds the decoded bytes held at once to 64 KiB times the compression ratio.
    """

    STEP = 1 << 16

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._fed = False  # the current frame has been given input and has not ended
        self._pending = b""  # input after the end of the last frame: the start of the next one
        self._out, self._pos = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while self._pos >= len(self._out):
            data = self._pending or self._file.read(self.STEP)
            if not data:
                if self._fed:
                    raise EOFError("zstd: compressed file ended before the end of a frame")
                return 0
            self._out, self._pos, self._fed = memoryview(self._frame.decompress(data)), 0, True
            self._pending = b""
            if self._frame.eof:
                self._pending, self._fed = self._frame.unused_data, False
                self._frame = self._dctx.decompressobj()
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def _decoder(path: Path, suffix: str) -> BinaryIO:
    if suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if suffix == ".bz2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if suffix == ".xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    return _ZstdFrames(path)  # type: ignore[return-value]


def open_binary(path: str | Path) -> BinaryIO:
    """Open `path` for reading bytes, decompressing by its last suffix (COMPRESSION_SUFFIXES); a plain file else.

    Decoding errors while reading a compressed file raise `CorruptArchive`. Opening does not read, so a corrupt
    archive shows on the first read, not here.
    """
    p = Path(path)
    suffix = compression_of(p)
    if suffix is None:
        return open(p, "rb")
    return io.BufferedReader(_Decoded(_decoder(p, suffix), p), buffer_size=_BUFFER)  # type: ignore[return-value]
