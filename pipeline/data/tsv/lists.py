"""Multi-hot fields of raw rows: ``id,id,...`` or ``id:weight,...`` -> ids, weights and lengths.

A compiled kernel parses one list column of a chunk straight from pyarrow's binary column (offsets and
bytes); :func:`parse_list_field` is the same rule in Python, which the line checks use to name what is
wrong, and which parses the rare weight the kernel cannot round exactly (more than 15 significant
digits, or an exponent beyond 10^22).
"""

from __future__ import annotations

import re

import numpy as np

from pipeline.data.compiled import compiled
from pipeline.data.tsv.scanner import NIBBLE

_POW10 = np.array([10.0**k for k in range(23)], dtype=np.float64)


@compiled
def _parse_weight(data, p, end, pow10):  # pragma: no cover
    """A float at data[p:end] as ``[+-]?(d+[.d*]|.d+)([eE][+-]?d+)?`` -> (value, ok); ok = 0 malformed, 2 exact
    parse impossible here (too many digits or too large an exponent: the caller parses it in Python)."""
    neg = False
    if p < end and (data[p] == 43 or data[p] == 45):
        neg = data[p] == 45
        p += 1
    mant = 0
    digits = 0  # significant digits (leading zeros do not count)
    frac = 0  # digits after the point kept in mant
    seen = 0
    while p < end and 48 <= data[p] <= 57:
        if mant or data[p] != 48:
            digits += 1
        if digits <= 18:
            mant = mant * 10 + (data[p] - 48)
        seen += 1
        p += 1
    if p < end and data[p] == 46:
        p += 1
        while p < end and 48 <= data[p] <= 57:
            if mant or data[p] != 48:
                digits += 1
            if digits <= 18:
                mant = mant * 10 + (data[p] - 48)
                frac += 1
            seen += 1
            p += 1
    if seen == 0:
        return 0.0, 0
    exp = 0
    if p < end and (data[p] == 101 or data[p] == 69):
        p += 1
        eneg = False
        if p < end and (data[p] == 43 or data[p] == 45):
            eneg = data[p] == 45
            p += 1
        k = 0
        while p < end and 48 <= data[p] <= 57:
            if exp < 100000:
                exp = exp * 10 + (data[p] - 48)
            k += 1
            p += 1
        if k == 0:
            return 0.0, 0
        if eneg:
            exp = -exp
    if p != end:
        return 0.0, 0
    e = exp - frac
    if mant == 0:
        return -0.0 if neg else 0.0, 1
    if digits > 15 or e > 22 or e < -22:
        return 0.0, 2
    v = float(mant)
    v = v * pow10[e] if e >= 0 else v / pow10[-e]
    return -v if neg else v, 1


@compiled
def _parse_lists(
    data, offsets, valid, hex_ids, sep, weighted, cap, nibble, pow10, values, weights, lengths
):  # pragma: no cover
    """Parse each field ``data[offsets[i]:offsets[i+1]]`` (null when not ``valid[i]``: no ids) into
    ``values``/``weights`` (row after row), ``lengths[i]``; keep the last ``cap`` ids of longer lists.
    Returns -1, or the first row it cannot parse (malformed, or a weight to parse in Python) as
    ``row * 2 + (1 if only the weight's precision)``."""
    pos = 0
    for i in range(offsets.shape[0] - 1):
        if not valid[i]:
            lengths[i] = 0
            continue
        p = offsets[i]
        end = offsets[i + 1]
        first = pos
        while True:
            # One id: up to the separator, a ':' (weighted) or the field's end.
            v = 0
            if hex_ids:
                # Exactly 8 digits, then the end, the separator or a ':': read the 8 bytes without looking
                # for the end first (4x faster). The separator and ':' are not hex digits (the config
                # forbids an alphanumeric separator), so an id cut short by them fails the digit check.
                q = p + 8
                if q > end or (q < end and data[q] != sep and data[q] != 58):
                    return i * 2
                bad = 0
                for t in range(p, q):
                    d = nibble[data[t]]
                    bad |= d
                    v = (v << 4) | d
                if bad > 15:
                    return i * 2
            else:
                q = p
                while q < end and data[q] != sep and data[q] != 58:
                    q += 1
                if q == p:
                    return i * 2
                if q - p > 19:
                    return i * 2
                for t in range(p, q):
                    c = data[t]
                    if c < 48 or c > 57:
                        return i * 2
                    if q - p == 19 and v > (9223372036854775807 - (c - 48)) // 10:
                        return i * 2
                    v = v * 10 + (c - 48)
            values[pos] = v
            if weighted:
                if q >= end or data[q] != 58:
                    return i * 2
                w0 = q + 1
                q = w0
                while q < end and data[q] != sep:
                    q += 1
                w, ok = _parse_weight(data, w0, q, pow10)
                if ok == 0:
                    return i * 2
                if ok == 2:
                    return i * 2 + 1
                weights[pos] = w
            elif q < end and data[q] == 58:
                return i * 2
            pos += 1
            if q >= end:
                break
            p = q + 1  # past the separator
            if p >= end:
                return i * 2  # a trailing separator: an empty id
        k = pos - first
        if cap > 0 and k > cap:
            for t in range(cap):
                values[first + t] = values[pos - cap + t]
                if weighted:
                    weights[first + t] = weights[pos - cap + t]
            pos = first + cap
            k = cap
        lengths[i] = k
    return -1


def parse_list_field(field: bytes, hex_ids: bool, sep: bytes, weighted: bool) -> tuple[list[int], list[float]]:
    """One raw list field parsed in Python (the reference the compiled parser agrees with; the line checks
    and rare weights the compiled parser leaves use it). Raises ValueError when malformed."""
    if not field:
        return [], []
    ids, weights = [], []
    for token in field.split(sep):
        key, colon, w = token.partition(b":")
        if weighted != bool(colon):
            raise ValueError("a weight (id:weight) on every id" if weighted else "no ':' (the column is not weighted)")
        ids.append(parse_id(key, hex_ids))
        if weighted:
            weights.append(parse_weight(w))
    return ids, weights


def parse_id(token: bytes, hex_ids: bool) -> int:
    """One categorical id (8 hex digits, or a decimal id below 2^63); raises ValueError when malformed."""
    if hex_ids:
        if len(token) != 8 or not all(c in b"0123456789abcdefABCDEF" for c in token):
            raise ValueError(f"{token[:20]!r} is not 8 hex digits")
        return int(token, 16)
    if not token.isdigit() or not token.isascii() or int(token) >= 2**63:
        raise ValueError(f"{token[:20]!r} is not a decimal id in [0, 2^63)")
    return int(token)


def parse_weight(token: bytes) -> float:
    """A weight as the compiled parser reads it: a plain decimal float (no inf, nan, '_' or spaces)."""
    if not re.fullmatch(rb"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", token):
        raise ValueError(f"weight {token[:20]!r} is not a decimal number")
    return float(token)


def parse_column(
    data: np.ndarray,
    offsets: np.ndarray,
    valid: np.ndarray,
    hex_ids: bool,
    sep: bytes,
    weighted: bool,
    cap: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | int:
    """One list column of a chunk (pyarrow's binary column as bytes, offsets [n + 1], validity [n]) ->
    (ids uint32 (hex) / int64, weights float32 or None, lengths int32 [n]); the first malformed row's index
    when a field is malformed."""
    n = len(offsets) - 1
    if hex_ids:
        # An id the kernel writes takes its 8 digits and, but for a field's last, one more byte: a field of
        # L bytes holds at most (L + 1) // 9. Bounding by size spares a pass over the bytes.
        bound = (len(data) + n) // 9 + 1
    else:
        bound = int(np.count_nonzero(data == sep[0])) + n + 1  # ids <= separators + fields
    values = np.empty(bound, np.uint32 if hex_ids else np.int64)
    weights = np.empty(bound if weighted else 0, np.float32)
    lengths = np.empty(n, np.int32)
    while True:
        bad = _parse_lists(
            data, offsets.astype(np.int64, copy=False), valid, hex_ids, sep[0], weighted, cap, NIBBLE, _POW10,
            values, weights, lengths,
        )  # fmt: skip
        if bad < 0:
            total = int(lengths.sum(dtype=np.int64))
            return values[:total], (weights[:total] if weighted else None), lengths
        row, precision_only = divmod(bad, 2)
        if not precision_only:
            return row
        # A weight the compiled parser cannot round exactly: this column's rows are parsed in Python.
        return _parse_column_python(data, offsets, valid, hex_ids, sep, weighted, cap)


def _parse_column_python(data, offsets, valid, hex_ids, sep, weighted, cap):
    ids_all, w_all, lengths = [], [], np.zeros(len(offsets) - 1, np.int32)
    raw = data.tobytes()
    for i in range(len(offsets) - 1):
        if not valid[i]:
            continue
        try:
            ids, ws = parse_list_field(raw[offsets[i] : offsets[i + 1]], hex_ids, sep, weighted)
        except ValueError:
            return i
        if cap > 0:
            ids, ws = ids[-cap:], ws[-cap:]
        ids_all.extend(ids)
        w_all.extend(ws)
        lengths[i] = len(ids)
    values = np.asarray(ids_all, dtype=np.uint32 if hex_ids else np.int64)
    return values, (np.asarray(w_all, dtype=np.float32) if weighted else None), lengths
