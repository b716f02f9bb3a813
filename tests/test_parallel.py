import numpy as np
import pytest

from chronotope.parallel import describe_scheduler, parallel_map


def _square(i, offset=0.0, arr=None):
    return float(i * i + offset + (arr.sum() if arr is not None else 0))


def test_inprocess():
    assert parallel_map(_square, range(4), shared={"offset": 1.0}) == [1, 2, 5, 10]


def test_describe():
    assert describe_scheduler(None) == "in-process"
    assert describe_scheduler("local:2") == "local:2"


def test_bad():
    for bad in ["local:0", "local:x", "", 3]:
        with pytest.raises(ValueError):
            parallel_map(_square, [1], scheduler=bad)


def test_local():
    pytest.importorskip("distributed")
    arr = np.ones(1000)
    got = parallel_map(_square, range(7), scheduler="local:2", shared={"arr": arr}, max_in_flight=3)
    assert got == [_square(i, arr=arr) for i in range(7)]
