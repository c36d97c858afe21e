"""One table of request bounds (common.bounds) for the API and the engine: a value past a bound is
refused by both with the same words, and one within it is taken by both."""
from __future__ import annotations

import pytest

from common.bounds import REQUEST_BOUNDS, Bound
from model_server.api.errors import ApiError
from model_server.api.params import sampling_fields


def test_bound_kinds() -> None:
    b = Bound(0, 2)
    assert b.holds(0) and b.holds(2.0) and not b.holds(2.01) and not b.holds(True)
    assert not b.holds(float("nan")) and not b.holds("1") and b.describe() == "between 0 and 2"
    i = Bound(1, 4, integer=True)
    assert i.holds(4) and not i.holds(4.0) and not i.holds(5) and not i.holds(3, hi=2)


@pytest.mark.parametrize("key,bad", [("temperature", 2.5), ("temperature", -0.1), ("top_p", 1.01),
                                     ("presence_penalty", 2.5), ("frequency_penalty", -3),
                                     ("repetition_penalty", 0.0), ("top_k", -2)])
def test_api_refuses_past_the_table(key: str, bad: float) -> None:
    with pytest.raises(ApiError) as e:
        sampling_fields({key: bad}, vocab_size=100, max_n=8)
    assert e.value.status == 400 and e.value.param == key
    assert REQUEST_BOUNDS[key].describe() in e.value.message


def test_api_takes_the_table_edges() -> None:
    edges = {k: REQUEST_BOUNDS[k].hi for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                                  "repetition_penalty")}
    got = sampling_fields(edges, vocab_size=100, max_n=8)
    assert {k: got[k] for k in edges} == edges
    assert sampling_fields({"top_p": 0.0}, vocab_size=100, max_n=8)["top_p"] == 0.0  # OpenAI's lower edge
