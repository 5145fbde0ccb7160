import json

import pytest

from features.events import InteractionEvent, InvalidEvent, parse_event

NOW = 1_800_000_000_000


def good(**over):
    d = {"event_id": "e1", "user_id": 1, "item_id": 2, "event_type": "listen", "timestamp_ms": NOW - 1000,
         "played_ratio": 0.8}
    d.update(over)
    return json.dumps(d).encode()


def test_valid_event_round_trips():
    e = parse_event(good(), now_ms=NOW)
    assert isinstance(e, InteractionEvent)
    assert parse_event(e.to_json_bytes(), now_ms=NOW) == e


@pytest.mark.parametrize(
    "payload, kind, fragment",
    [
        (b"{nope", "not_json", "not valid JSON"),
        (b"[1,2]", "not_object", "expected a JSON object"),
        (b"\xff\xfe", "not_json", "not valid JSON"),
        (good(event_type="zap"), "schema", "event_type"),
        (good(user_id="abc"), "schema", "user_id"),
        (good(user_id=True), "schema", "user_id"),
        (good(item_id=1.5), "schema", "item_id"),
        (good(user_id=-3), "schema", "user_id"),
        (good(timestamp_ms=-5), "schema", "timestamp_ms"),
        (good(timestamp_ms=1_700_000_000), "schema", "timestamp_ms"),  # seconds, not ms
        (good(played_ratio=1.5), "schema", "played_ratio"),
        (good(extra_field=1), "schema", "extra_field"),
        (good(timestamp_ms=NOW + 10 * 86_400_000), "future_timestamp", "in the future"),
        (b"{" + b" " * 70_000 + b"}", "oversized", "exceeds"),
        (None, "not_json", "tombstone"),
    ],
)
def test_invalid_payloads_get_a_precise_reason(payload, kind, fragment):
    result = parse_event(payload, now_ms=NOW)
    assert isinstance(result, InvalidEvent)
    assert result.error_type == kind
    assert fragment in result.reason


def test_missing_fields_are_named():
    result = parse_event(b'{"event_id": "x"}', now_ms=NOW)
    assert isinstance(result, InvalidEvent)
    for field in ("user_id", "item_id", "event_type", "timestamp_ms"):
        assert field in result.reason


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (good(user_id=2**64), "user_id"),  # beyond int64: no store can hold it
        (good(item_id=2**63), "item_id"),
        (good(timestamp_ms=2**63), "timestamp_ms"),
        (good(event_id="x" * 129), "event_id"),
        (good(variant="v" * 129), "variant"),
        (b'{"event_id": "e1", "user_id": 1, "item_id": 2, "event_type": "listen", "timestamp_ms": 1799999999000, '
         b'"played_ratio": NaN}', "played_ratio"),
        (b'{"event_id": "e1", "user_id": 1, "item_id": 2, "event_type": "listen", "timestamp_ms": 1799999999000, '
         b'"played_ratio": Infinity}', "played_ratio"),
    ],
)
def test_values_no_store_can_hold_are_rejected(payload, fragment):
    result = parse_event(payload, now_ms=NOW, max_future_skew_s=10**12)  # the bounds, not the skew check
    assert isinstance(result, InvalidEvent)
    assert result.error_type == "schema"
    assert fragment in result.reason


def test_the_largest_ids_a_store_can_hold_are_accepted():
    result = parse_event(good(user_id=2**63 - 1, item_id=2**63 - 1), now_ms=NOW)
    assert isinstance(result, InteractionEvent) and result.user_id == 2**63 - 1


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 2000 + b"]" * 2000,
        b'{"event_id": ' + b"[" * 2000 + b"]" * 2000 + b"}",  # about 4 KB, far below the size limit
        b'{"a": ' * 2000 + b"1" + b"}" * 2000,
        b"[" * 150 + b"]" * 150,  # below the JSON parser's own depth limit, still no event
    ],
)
def test_deeply_nested_json_is_rejected_not_raised(payload):
    result = parse_event(payload, now_ms=NOW)
    assert isinstance(result, InvalidEvent)
