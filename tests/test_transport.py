"""The binary frame codec: round trips, strict validation with typed errors, and a decoder fuzz."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtedit.errors import ConfigError, InvalidRequest
from rtedit.transport import (
    FrameError,
    FrameLimits,
    PayloadTooLarge,
    RequestMeta,
    decode_frame,
    decode_reply,
    encode_frame,
    error_reply,
    parse_request_meta,
)

JPEG_ISH = b"\xff\xd8\xff\xe0fake-image-bytes"


def raw_frame(meta_bytes: bytes, image: bytes = JPEG_ISH, length: int | None = None) -> bytes:
    n = len(meta_bytes) if length is None else length
    return struct.pack(">I", n) + meta_bytes + image


def test_round_trip_keeps_every_field():
    meta = RequestMeta(id=7, prompt="make it blue", steps=2, seed=123, width=128, height=64, format="png")
    frame = decode_frame(encode_frame(meta, JPEG_ISH))
    assert frame.meta == meta
    assert frame.image == JPEG_ISH


def test_layout_is_big_endian_length_then_json_then_image():
    data = encode_frame({"id": 1}, b"IMG")
    (n,) = struct.unpack(">I", data[:4])
    assert json.loads(data[4:4 + n]) == {"id": 1}
    assert data[4 + n:] == b"IMG"


def test_reply_round_trip_and_nan_timings_become_null():
    data = encode_frame({"id": 3, "dropped": 2, "timings": {"total": float("nan")}}, b"OUT")
    reply = decode_reply(data)
    assert reply.id == 3 and reply.meta["dropped"] == 2 and reply.meta["timings"]["total"] is None
    assert reply.image == b"OUT"
    assert reply.error is None


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "bad_header"),
        (b"\x00\x00\x01", "bad_header"),
        (raw_frame(b"", length=0), "bad_header"),
        (raw_frame(b'{"id": 1}', length=10_000), "bad_header"),
        (raw_frame(b'{"id": 1}', length=2**32 - 1), "bad_header"),
        (raw_frame(b"[1, 2]"), "not_object"),
        (raw_frame(b'"text"'), "not_object"),
        (raw_frame(b"{nope"), "bad_json"),
        (raw_frame(b"\xff\xfe{}"), "bad_json"),
        (raw_frame(b'{"id": NaN}'), "bad_json"),
        (raw_frame(b'{"id": 1, "colour": "red"}'), "unknown_field"),
        (raw_frame(b'{"prompt": "x"}'), "missing_field"),
        (raw_frame(b'{"id": "1"}'), "wrong_type"),
        (raw_frame(b'{"id": true}'), "wrong_type"),
        (raw_frame(b'{"id": 1.0}'), "wrong_type"),
        (raw_frame(b'{"id": -1}'), "out_of_range"),
        (raw_frame(b'{"id": 1, "steps": 0}'), "out_of_range"),
        (raw_frame(b'{"id": 1, "steps": 99}'), "out_of_range"),
        (raw_frame(b'{"id": 1, "width": 8}'), "out_of_range"),
        (raw_frame(b'{"id": 1, "prompt": 5}'), "wrong_type"),
        (raw_frame(b'{"id": 1, "prompt": "  "}'), "out_of_range"),
        (raw_frame(b'{"id": 1, "format": "gif"}'), "out_of_range"),
        (raw_frame(b'{"id": 1}', image=b""), "no_image"),
    ],
)
def test_malformed_frames_raise_frame_error_with_code(data, code):
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert info.value.code == code
    assert isinstance(info.value, InvalidRequest)


def test_error_keeps_the_id_when_it_was_readable():
    with pytest.raises(FrameError) as info:
        decode_frame(raw_frame(b'{"id": 41, "steps": "two"}'))
    assert info.value.frame_id == 41
    meta = error_reply(info.value, None)
    assert meta["id"] == 41 and meta["error"]["code"] == "wrong_type" and "steps" in meta["error"]["message"]


def test_oversize_frame_is_refused_before_parsing():
    limits = FrameLimits(max_frame_bytes=1024, max_meta_bytes=256)
    with pytest.raises(PayloadTooLarge) as info:
        decode_frame(encode_frame({"id": 1}, b"x" * 2000), limits)
    assert info.value.code == "too_large"
    assert decode_frame(encode_frame({"id": 1}, b"x" * 900), limits).meta.id == 1


def test_prompt_length_limit():
    limits = FrameLimits(max_prompt_chars=10)
    with pytest.raises(FrameError, match="at most 10"):
        decode_frame(encode_frame({"id": 1, "prompt": "a" * 11}, JPEG_ISH), limits)


def test_http_bodies_may_omit_the_id():
    assert parse_request_meta({"prompt": "x"}, FrameLimits(), require_id=False).id is None


@pytest.mark.parametrize(
    "kwargs",
    [{"max_frame_bytes": 16 * 2**20}, {"max_frame_bytes": 0}, {"max_meta_bytes": 2**30}, {"min_side": 512, "max_side": 256},
     {"max_steps": float("nan")}, {"max_references": -1}],
)
def test_limits_validate(kwargs):
    with pytest.raises(ConfigError):
        FrameLimits(**kwargs).validate()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
metadata_objects = st.dictionaries(
    st.sampled_from(["id", "prompt", "steps", "seed", "width", "height", "format", "extra"]), json_values, max_size=6
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_only_raise_frame_error(data):
    try:
        frame = decode_frame(data)
    except FrameError:
        return
    assert isinstance(frame.meta.id, int) and frame.image


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metadata_objects, image=st.binary(max_size=16), length_delta=st.integers(-3, 3) | st.just(0))
def test_fuzz_structured_frames_only_raise_frame_error(meta, image, length_delta):
    body = json.dumps(meta).encode()
    data = struct.pack(">I", max(0, len(body) + length_delta)) + body + image
    try:
        frame = decode_frame(data)
    except FrameError as exc:
        assert exc.code and str(exc)
        return
    assert frame.image and frame.meta.id == meta["id"]


@settings(max_examples=200, deadline=None)
@given(meta=json_values, image=st.binary(max_size=8))
def test_fuzz_any_json_metadata(meta, image):
    body = json.dumps(meta).encode()
    data = struct.pack(">I", len(body)) + body + image
    try:
        decode_frame(data)
    except FrameError:
        pass
