"""Saga signals from the wire are hostile until checked: anything unreadable is rejected with the reason."""

from __future__ import annotations

import pytest
from conveyor import envelope, errors
from conveyor.sagas import wire


def event(type_: str, **extensions: str) -> envelope.Envelope:
    return envelope.create(type_, None, source="t", extensions=extensions)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (event("orders.placed", sagaid="o1"), "not a saga signal"),
        (event(wire.START), "without a valid sagaid"),
        (event(wire.START, sagaid="x" * 201), "without a valid sagaid"),
        (event(wire.START, sagaid="a\u0000b"), "without a valid sagaid"),
        (event(wire.REPLY, sagaid="o1", sagaresult="ok"), "sagatoken=None"),
        (event(wire.REPLY, sagaid="o1", sagatoken="-1", sagaresult="ok"), "sagatoken='-1'"),
        (event(wire.REPLY, sagaid="o1", sagatoken="9" * 19, sagaresult="ok"), "sagatoken="),
        (event(wire.REPLY, sagaid="o1", sagatoken="1", sagaresult="maybe"), "sagaresult='maybe'"),
        (event(wire.TIMER, sagaid="o1", sagatoken="1", sagatimer="never"), "sagatimer='never'"),
        (event(wire.CONTROL, sagaid="o1", sagaaction="delete"), "sagaaction='delete'"),
    ],
)
def test_an_unreadable_signal_is_rejected_with_the_reason(message: envelope.Envelope, reason: str) -> None:
    with pytest.raises(errors.Reject, match=reason.replace("(", r"\(")):
        wire.signal(message)


def test_a_reply_is_read_with_its_token_and_result() -> None:
    signal = wire.signal(event(wire.REPLY, sagaid="o1", sagatoken="3", sagaresult="failed"))
    assert (signal.kind, signal.instance, signal.token, signal.ok) == ("reply", "o1", "3", False)


def test_only_a_saga_command_can_be_replied_to() -> None:
    with pytest.raises(errors.ConfigurationError, match="is not a saga command"):
        wire.reply_to(event("billing.charge"), failed=False)
    topic, extensions = wire.reply_to(event("billing.charge", **wire.command("o1", "2", "sagas.shop")), failed=True)
    assert (topic, extensions) == ("sagas.shop", {"sagaid": "o1", "sagatoken": "2", "sagaresult": "failed"})


def test_an_extension_with_an_invalid_name_is_refused_when_publishing() -> None:
    with pytest.raises(errors.ConfigurationError, match="invalid CloudEvents extension"):
        envelope.create("t", None, source="t", extensions={"Bad-Name": "x"})
    with pytest.raises(errors.ConfigurationError, match="invalid CloudEvents extension"):
        envelope.create("t", None, source="t", extensions={"id": "x"})


def test_a_dead_lettered_saga_command_gives_one_notice_to_its_saga_and_other_messages_none() -> None:
    from conveyor.sagas import dead_letters

    extensions = {**wire.command("o1", "3", "sagas.shop.checkout"), "tenant": "acme"}
    command = envelope.create("billing.charge", {"amount": 1}, source="shop", key="o1", extensions=extensions)
    wire_command = envelope.to_binary(command, "ce_")
    found = dead_letters.notice(wire_command, "billing.charge", "billing", "Rejected: no card")
    assert found is not None
    topic, notice = found
    assert topic == "sagas.shop.checkout"
    assert wire.signal(notice) == wire.Signal("reply", "o1", "3", ok=False, detail=wire.DEAD_LETTERED)
    assert (notice.tenant, notice.causationid, notice.partitionkey) == ("acme", command.id, "o1")
    assert notice.json() == {"reason": "dead-lettered by billing.charge: Rejected: no card"}
    again = dead_letters.notice(wire_command, "billing.charge", "billing", "TooManyDeliveries: 6")
    assert again is not None and again[1].id == notice.id  # the same command dead-lettered twice: one notice
    reply = event(wire.REPLY, sagaid="o1", sagatoken="3", sagaresult="ok")  # no sagareply: nobody waits on it
    plain = envelope.WireMessage(body=b"not a cloudevent", headers={})
    for other in (envelope.to_binary(reply, "ce_"), plain, envelope.to_binary(event("orders.placed"), "ce_")):
        assert dead_letters.notice(other, "h", "t", "Rejected") is None


async def test_a_notice_the_broker_refuses_is_logged_and_never_stops_the_dead_letter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from conveyor.sagas import dead_letters

    class Refusing:
        binary_prefix = "ce_"
        tries = 0

        async def publish(self, topic: str, message: envelope.WireMessage) -> None:
            self.tries += 1
            raise errors.TransportError("no such topic")

    command = envelope.create("billing.charge", {}, source="shop", extensions=wire.command("o1", "3", "sagas.s"))
    transport = Refusing()
    await dead_letters.tell_saga(transport, envelope.to_binary(command, "ce_"), "h", "t", "Rejected")  # type: ignore[arg-type]
    assert transport.tries == 1  # a refusal is not retried; an outage would be
    assert "could not tell the saga" in caplog.text
