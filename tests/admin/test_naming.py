from __future__ import annotations

import pytest

from common.naming import (InvalidArgument, check_checkpoint, check_model_path, check_replicas, parse_cell,
                           parse_model_id)
from common.overrides import check_overrides


def test_model_ids() -> None:
    mid = parse_model_id("/sax/test/lm-2_b")
    assert (mid.cell, mid.model, str(mid), mid.cell_path) == ("test", "lm-2_b", "/sax/test/lm-2_b", "/sax/test")
    for bad in ["sax/test/lm", "/sax/test", "/sax/Test/lm", "/sax/test/LM", "/sax/test/1lm",
                "/sax/test/lm/x", "/foo/test/lm", "/sax//lm", 7, None, "/sax/test/l m"]:
        with pytest.raises(InvalidArgument):
            parse_model_id(bad)


def test_cells() -> None:
    assert parse_cell("/sax/test") == "test"
    assert parse_cell("test") == "test"
    for bad in ["/sax", "/sax/te st", "/x/test", "", None]:
        with pytest.raises(InvalidArgument):
            parse_cell(bad)


def test_model_path_and_checkpoint() -> None:
    assert check_model_path("lm.hf") == "lm.hf"
    with pytest.raises(InvalidArgument):
        check_model_path("1lm")
    assert check_checkpoint("None") is None
    assert check_checkpoint(None) is None
    assert check_checkpoint("gs://bucket/ckpt/step_1") == "gs://bucket/ckpt/step_1"
    for bad in ["../etc/passwd", "/data/../etc", "gs://b/../x", "a b", "", "x;rm -rf /"]:
        with pytest.raises(InvalidArgument):
            check_checkpoint(bad)
    roots = ("/models", "gs://bucket/ckpts")
    assert check_checkpoint("/models/gpt2", roots) == "/models/gpt2"
    assert check_checkpoint("gs://bucket/ckpts/a", roots) == "gs://bucket/ckpts/a"
    for outside in ["/etc/passwd", "/modelsx/a", "gs://other/a"]:
        with pytest.raises(InvalidArgument, match="outside the allowed roots"):
            check_checkpoint(outside, roots)


def test_replicas() -> None:
    assert check_replicas(0, 10) == 0
    assert check_replicas("3", 10) == 3
    for bad in [-1, 11, True, 1.5, "x", None]:
        with pytest.raises(InvalidArgument):
            check_replicas(bad, 10)


def test_overrides() -> None:
    assert check_overrides(None) == {}
    got = check_overrides({"num_slots": 8, "max_seq_len": "512", "prefill_buckets": [32, 64],
                           "dtype": "bfloat16", "ram": 1 << 30, "constraints": ["a"], "alias": "tiny"})
    assert got["max_seq_len"] == 512 and got["prefill_buckets"] == [32, 64]
    with pytest.raises(InvalidArgument, match="unknown override 'bogus'"):
        check_overrides({"bogus": 1})
    for bad in [{"num_slots": 0}, {"num_slots": True}, {"dtype": "fp8"}, {"prefill_buckets": [64, 32]},
                {"max_seq_len": "{"}, {"alias": "bad alias"}]:
        with pytest.raises(InvalidArgument):
            check_overrides(bad)
    with pytest.raises(InvalidArgument):
        check_overrides([1])
