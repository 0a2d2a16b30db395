"""The per-connection quota meter and the token bucket it counts with, on a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from iotref.protocol.token_bucket import TokenBucket
from iotref.sandbox.quota_meter import ARRIVAL_SLACK_SECONDS, QuotaMeter, count_by_client

T0 = 1_800_000_000.0  # a whole second


# --------------------------------------------------------------------------- token bucket


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(100, now=0.0)
    assert bucket.take(150, 0.0) == 100
    assert bucket.take(1, 0.0) == 0
    assert bucket.take(10, 0.05) == 5  # 50 ms earn 5 tokens
    assert bucket.take(1000, 10.0) == 100  # never more than its capacity


def test_bucket_clock_going_back_earns_nothing() -> None:
    bucket = TokenBucket(10, now=5.0)
    assert bucket.take(10, 5.0) == 10
    assert bucket.take(1, 4.0) == 0
    assert bucket.take(1, 5.1) == 1


@pytest.mark.parametrize(("rate", "capacity"), [(0, None), (-1, None), (1, 0)])
def test_bucket_refuses_nonsense(rate: float, capacity: float | None) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        TokenBucket(rate, capacity)


def test_bucket_paced_at_its_rate_admits_everything() -> None:
    bucket = TokenBucket(100, capacity=100, now=0.0)
    bucket.take(100, 0.0)
    admitted = sum(bucket.take(1, i / 100) for i in range(1, 1001))
    assert admitted == 1000


# --------------------------------------------------------------------------- meter


def test_under_the_quota_nothing_is_throttled() -> None:
    meter = QuotaMeter(100, 512 * 1024)
    for i in range(600):  # 60 a second for 10 s
        meter.add("dev", 1, 1000, T0 + i / 60)
    quota = meter.snapshot("dev", T0 + 10.5)
    assert quota["messages"] == 600
    assert quota["bytes"] == 600_000
    assert quota["throttled"] == 0
    assert quota["seconds_over"] == 0
    assert quota["rate"] == 60  # the last complete second
    assert quota["peak_rate"] == 60
    assert (quota["publish_limit"], quota["throughput_limit"]) == (100, 512 * 1024)


def test_a_burst_over_the_quota_is_counted() -> None:
    meter = QuotaMeter(100, 0)
    meter.add("dev", 1000, 1000, T0)  # all at once: the full bucket's tokens, the rest over
    first = meter.snapshot("dev", T0 + 0.5)
    capacity = int(100 * (1 + ARRIVAL_SLACK_SECONDS))
    assert first["throttled"] == 1000 - capacity
    assert first["rate"] == 0  # no complete second yet
    meter.add("dev", 300, 300, T0 + 1.0)  # one second later: 100 tokens again
    quota = meter.snapshot("dev", T0 + 2.0)
    assert quota["throttled"] == 1000 - capacity + 200
    assert quota["rate"] == 300
    assert quota["peak_rate"] == 1000
    assert quota["seconds_over"] == 2


def test_throughput_over_the_quota_is_counted_in_messages_and_bytes() -> None:
    meter = QuotaMeter(100, 10_000)
    meter.add("dev", 20, 20 * 1000, T0)  # 20 kB in one go: about half fits
    quota = meter.snapshot("dev", T0 + 1.5)
    fits = int(10_000 * (1 + ARRIVAL_SLACK_SECONDS) // 1000)
    assert quota["throttled"] == 20 - fits
    assert quota["throttled_bytes"] == (20 - fits) * 1000
    assert quota["bytes_rate"] == 20_000
    assert quota["seconds_over"] == 1


def test_a_throttled_message_takes_no_token() -> None:
    meter = QuotaMeter(10, 0)
    meter.add("dev", 100, 100, T0)
    meter.add("dev", 10, 10, T0 + 1.0)  # ten seconds' worth refused did not drain it
    quota = meter.snapshot("dev", T0 + 1.0)
    assert quota["throttled"] == 100 - int(10 * (1 + ARRIVAL_SLACK_SECONDS))


def test_devices_are_metered_apart_and_limit_zero_measures_nothing() -> None:
    meter = QuotaMeter(0, 0)
    meter.add_batch(T0, {"a": [5000, 5_000_000], "b": [1, 10]})
    snapshots = meter.snapshots(T0 + 3)
    assert snapshots["a"]["throttled"] == 0
    assert snapshots["a"]["seconds_over"] == 0
    assert snapshots["b"]["messages"] == 1
    assert meter.snapshot("never-seen", T0)["messages"] == 0


def test_rate_is_zero_once_a_device_is_quiet() -> None:
    meter = QuotaMeter(100, 0)
    meter.add("dev", 50, 50, T0 + 0.2)
    assert meter.snapshot("dev", T0 + 1.1)["rate"] == 50
    assert meter.snapshot("dev", T0 + 5.0)["rate"] == 0
    meter.add("dev", 7, 7, T0 + 5.5)
    assert meter.snapshot("dev", T0 + 5.7)["rate"] == 0  # second 4 was empty
    assert meter.snapshot("dev", T0 + 6.1)["rate"] == 7


def test_late_stamps_within_the_slack_are_not_throttled() -> None:
    """A device paced like AWS's SDK (100 a second after a full burst), its messages
    stamped up to 20 ms late in batches: nothing counted."""
    meter = QuotaMeter(100, 0)
    meter.add("dev", 100, 100, T0 + 0.020)  # the burst, stamped late
    for i in range(1, 301):
        sent = T0 + i / 100
        stamped = sent + (0.0 if i % 3 else 0.004)
        meter.add("dev", 1, 1, stamped)
    assert meter.snapshot("dev", T0 + 5)["throttled"] == 0


def test_count_by_client_counts_checked_topics_only() -> None:
    def record(client_id: str, problem: str | None) -> SimpleNamespace:
        return SimpleNamespace(
            client_id=client_id, topic_problem=problem, topic=f"t/o/{client_id}", body=b"x" * 10
        )

    records = [record("a", None), record("a", None), record("b", None), record("c", "wrong org")]
    assert count_by_client(records) == {"a": [2, 2 * (5 + 10)], "b": [1, 15]}


def test_the_open_second_counts_toward_peak_and_seconds_over() -> None:
    meter = QuotaMeter(100, 0)
    meter.add("dev", 500, 500, T0 + 0.1)
    quota = meter.snapshot("dev", T0 + 0.2)  # still in that second
    assert (quota["rate"], quota["peak_rate"], quota["seconds_over"]) == (0, 500, 1)
    meter.add("dev", 1, 1, T0 + 1.1)  # closes it: counted once
    assert meter.snapshot("dev", T0 + 1.2)["seconds_over"] == 1
