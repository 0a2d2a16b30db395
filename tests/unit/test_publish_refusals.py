"""Which failed publishes retrying cannot fix: the MQTT 5 PUBACK reason codes and awscrt
errors the publisher moves aside, and everything else it retries."""

from __future__ import annotations

import pytest

from iotref.device.connection.diagnostics import crt_error_name
from iotref.device.connection.errors import PublishFailed
from iotref.device.telemetry.publish_refusals import permanent_refusal


@pytest.mark.parametrize("code", [0x87, 0x90, 0x95, 0x99])
def test_codes_that_refuse_a_message_for_good(code: int) -> None:
    reason = permanent_refusal(PublishFailed("refused", reason_code=code))
    assert reason is not None and f"0x{code:02X}" in reason


@pytest.mark.parametrize("code", [0x80, 0x83, 0x91, 0x97, None])
def test_codes_that_are_retried(code: int | None) -> None:
    assert permanent_refusal(PublishFailed("refused", reason_code=code)) is None


@pytest.mark.parametrize(
    ("name", "permanent"),
    [
        ("AWS_ERROR_MQTT5_PACKET_VALIDATION", True),
        ("AWS_ERROR_MQTT5_PUBLISH_OPTIONS_VALIDATION", True),
        ("AWS_ERROR_MQTT5_OPERATION_FAILED_DUE_TO_OFFLINE_QUEUE_POLICY", False),
        ("AWS_ERROR_MQTT5_USER_REQUESTED_STOP", False),
        (None, False),
    ],
)
def test_library_errors(name: str | None, permanent: bool) -> None:
    failure = PublishFailed("failed", error_name=name)
    assert (permanent_refusal(failure) is not None) is permanent


def test_anything_without_a_code_or_name_is_retried() -> None:
    assert permanent_refusal(ConnectionError("lost")) is None
    assert permanent_refusal(TimeoutError()) is None


def test_the_error_name_of_what_awscrt_raises_at_once() -> None:
    raised = RuntimeError(
        "5143 (AWS_ERROR_MQTT5_PUBLISH_OPTIONS_VALIDATION): Invalid mqtt5 publish packet "
        "options value."
    )
    assert crt_error_name(raised) == "AWS_ERROR_MQTT5_PUBLISH_OPTIONS_VALIDATION"
    assert crt_error_name(RuntimeError("no name here")) == "RuntimeError"
    assert crt_error_name(ValueError("(AWS_ERROR_X)")) == "ValueError"
