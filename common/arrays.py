"""Named numpy weights <-> Flower's ArrayRecord, for both sides of the wire.

Flower's `Array` holds an array as `np.save` wrote it and reads it back with `np.load`,
whose header parser (`ast.literal_eval`) takes most of the time for a model's small
arrays: every round the server reads each client's model and each client the global
one. `array_of` reads the headers `np.save` writes for plain little-endian arrays
itself and leaves everything else (any other header, any other length, any other
serialisation) to `Array.numpy()`, so that what it returns, or raises, is always what
Flower's own reader gives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord

_MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0, as np.save writes small headers
_HEADER = re.compile(rb"\{'descr': '(<f4|<f8|<f2|<i8|<i4|<i2|\|i1|\|u1|\|b1)', "
                     rb"'fortran_order': False, 'shape': \(((?:[0-9]+, )*[0-9]*,?)\), \} *\n")


def to_array_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy weights -> ArrayRecord (names kept, so shapes can be checked by name)."""
    return ArrayRecord({name: array_from(value) for name, value in weights.items()})


@lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """What np.save writes before the data of a C-ordered array of `dtype` and `shape`."""
    buffer = BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


def array_from(value: np.ndarray) -> Array:
    """`Array(value)`: for a plain numeric array the bytes np.save writes, its header
    made once per dtype and shape (np.save's own machinery is most of the time for a
    model's small arrays)."""
    dtype = value.dtype
    if dtype.kind not in "fiub" or not dtype.isnative or not value.flags.c_contiguous:
        return Array(value)
    data = _npy_header(dtype.str, tuple(value.shape)) + value.tobytes()
    return Array(dtype=str(dtype), shape=tuple(value.shape), stype="numpy.ndarray", data=data)


def array_of(array: Array) -> np.ndarray:
    """`array.numpy()`, without its header parser for the arrays np.save writes for a
    model (a writable copy, as np.load gives)."""
    data = array.data
    if array.stype == "numpy.ndarray" and data[:8] == _MAGIC and len(data) >= 10:
        size = int.from_bytes(data[8:10], "little")
        match = _HEADER.fullmatch(data, 10, 10 + size)
        if match is not None:
            shape = tuple(int(d) for d in match.group(2).split(b",") if d.strip())
            if repr(shape).encode() == b"(" + match.group(2) + b")":
                dtype = np.dtype(match.group(1).decode())
                count = int(np.prod(shape, dtype=np.int64))
                if len(data) == 10 + size + count * dtype.itemsize:
                    return np.frombuffer(data, dtype=dtype, count=count,
                                         offset=10 + size).reshape(shape).copy()
    return array.numpy()


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ordered dict of named numpy arrays."""
    return {name: array_of(record[name]) for name in record}
