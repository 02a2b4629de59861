"""Cleaning raw documents for the ingest stage, a batch at a time: newlines folded to \\n, control characters
removed, Unicode normalised, outer whitespace stripped.

Most documents of most corpora are plain printable ASCII, so a batch is screened with numpy over its UTF-8 bytes and
only the strings that may need fixing go through Python; the rest is Arrow kernels.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# C0/C1 control characters except tab and newline; DEL too. CR is folded into newlines before this applies.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _fix_one(text: str, normalization: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if normalization != "none" and not unicodedata.is_normalized(normalization, text):
        text = unicodedata.normalize(normalization, text)
    return text


def clean_batch(arr: pa.Array, normalization: str = "NFC") -> pa.Array:
    """Newlines folded to \\n, control characters removed, Unicode normalised, outer whitespace stripped.

    One numpy pass over the batch's UTF-8 bytes finds the strings that are not plain printable ASCII; only
    those go through Python (most documents of most corpora are clean). The rest is Arrow kernels.
    """
    arr = arr.cast(pa.string())
    if len(arr):
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]] if data_buf else np.empty(0, np.uint8)
        # Bytes that send a string down the slow path: C0 controls (CR included), DEL, and any non-ASCII byte
        # (C1 controls are \xc2\x80-\xc2\x9f; other non-ASCII text may need normalising). One wrapping
        # subtraction flags everything outside 0x20-0x7e; tabs and newlines are then let through.
        hits = np.flatnonzero((data - np.uint8(0x20)) >= np.uint8(0x5F))
        hits = hits[(data[hits] != 0x09) & (data[hits] != 0x0A)] + offsets[0]
        if hits.size:
            rows = np.unique(np.searchsorted(offsets, hits, side="right") - 1)
            mask = np.zeros(len(arr), dtype=bool)
            mask[rows] = True
            fixed = [_fix_one(t, normalization) for t in arr.take(pa.array(rows)).to_pylist()]
            arr = pc.replace_with_mask(arr, pa.array(mask), pa.array(fixed, pa.string()))
    return _strip(arr)


def _strip(arr: pa.Array) -> pa.Array:
    """Trim outer whitespace, copying only the strings whose first or last byte may be whitespace."""
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    nonempty = offsets[1:] > offsets[:-1]
    if not len(arr) or data_buf is None or not nonempty.any():
        return arr
    data = np.frombuffer(data_buf, dtype=np.uint8)
    first = data[offsets[:-1][nonempty]]
    last = data[offsets[1:][nonempty] - 1]
    # ASCII space, \t \n \v \f \r, or any non-ASCII byte (Unicode spaces such as U+00A0 or U+3000).
    edge = ((first <= 0x20) | (first >= 0x80)) | ((last <= 0x20) | (last >= 0x80))
    if not edge.any():
        return arr
    mask = np.zeros(len(arr), dtype=bool)
    mask[np.flatnonzero(nonempty)[edge]] = True
    m = pa.array(mask)
    return pc.replace_with_mask(arr, m, pc.utf8_trim_whitespace(arr.filter(m)))


def clean_text(text: str, normalization: str = "NFC") -> str:
    """`clean_batch` for one string."""
    return clean_batch(pa.array([text], pa.string()), normalization)[0].as_py()
