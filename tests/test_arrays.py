"""Reading Flower Arrays: dpfl's reader gives exactly what Flower's gives, or fails as it does."""

import numpy as np
import pytest
from flwr.app import Array

from common.arrays import array_of, from_array_record, to_array_record


def _same(a, b):
    nan = a.dtype.kind in "fc"
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=nan)


@pytest.mark.parametrize("value", [
    np.arange(7850, dtype=np.float32).reshape(10, 785), np.array(3.5, np.float32),
    np.zeros(0, np.float32), np.zeros((0, 3), np.float64), np.array([np.nan, np.inf, -0.0]),
    np.arange(12, dtype=np.int64).reshape(2, 3, 2), np.arange(5, dtype=np.uint8),
    np.array([True, False]), np.arange(6, dtype=np.float16), np.arange(4, dtype=np.int32),
    np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian: Flower's reader
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),  # Fortran order: Flower's reader
    np.array([1 + 2j]), np.array(["ab", "c"]),  # other kinds: Flower's reader
])
def test_every_array_reads_back_as_flower_reads_it(value):
    array = Array(value)
    got = array_of(array)
    assert _same(got, array.numpy()) and _same(got, np.asarray(value))
    got[...] = got  # writable, as np.load's arrays are


def test_a_tampered_array_is_read_or_refused_as_flower_does():
    good = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    header_end = 10 + int.from_bytes(good.data[8:10], "little")
    variants = {
        "short": good.data[:-4], "long": good.data + b"\0" * 4, "empty": b"",
        "magic": b"\x00" + good.data[1:],
        "shape": good.data.replace(b"(2, 3)", b"(3, 3)"),
        "odd shape": good.data.replace(b"(2, 3), }", b"(2,3),  }"),
        "dtype": good.data.replace(b"'<f4'", b"'<f8'"),
        "header": good.data[:header_end - 3] + b"x \n" + good.data[header_end:],
    }
    for name, data in variants.items():
        bad = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data)
        try:
            want = bad.numpy()
        except Exception as exc:  # noqa: BLE001 - whatever Flower raises, ours raises too
            with pytest.raises(type(exc)):
                array_of(bad)
        else:
            assert _same(array_of(bad), want), name


def test_named_weights_round_trip_in_order():
    weights = {"b": np.ones(3, np.float32), "a": np.zeros((2, 2), np.float32)}
    back = from_array_record(to_array_record(weights))
    assert list(back) == ["b", "a"] and all(_same(back[k], weights[k]) for k in weights)


def test_a_model_s_arrays_skip_flower_s_header_parser(monkeypatch):
    arrays = [Array(np.ones((10, 784), np.float32)), Array(np.ones(10, np.float32)),
              Array(np.ones((32, 1, 5, 5), np.float64)), Array(np.arange(3))]
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("Flower's reader was used"))
    assert [a.shape for a in map(array_of, arrays)] == [(10, 784), (10,), (32, 1, 5, 5), (3,)]


@pytest.mark.parametrize("value", [
    np.zeros((10, 784), np.float32), np.arange(3), np.array(2.0), np.zeros((0, 3)),
    np.array([True]), np.arange(5, dtype=np.uint8), np.zeros(2, np.float16),
    np.arange(6, dtype=">f4"), np.asfortranarray(np.ones((2, 3))), np.arange(8.0)[::2],
    np.array(["x"]),
])
def test_arrays_are_written_as_flower_writes_them(value):
    from common.arrays import array_from

    ours, theirs = array_from(value), Array(value)
    assert (ours.dtype, tuple(ours.shape), ours.stype) == (theirs.dtype, tuple(theirs.shape),
                                                           theirs.stype)
    assert ours.data == theirs.data
