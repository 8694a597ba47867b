"""The SQS FIFO queue of the `sqs` engine, against moto's server (with atomic receives)."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import Moto
from tfserver.runs.sqs import SqsQueue, message_group
from tfserver.storage.base import BackendError


def fifo(moto: Moto, *, dlq_after: int | None = None) -> str:
    sqs = moto.client("sqs")
    name = f"runs-{uuid.uuid4().hex[:8]}"
    attrs = {"FifoQueue": "true"}
    if dlq_after is not None:
        dead = sqs.create_queue(QueueName=f"{name}-dead.fifo", Attributes={"FifoQueue": "true"})
        arn = sqs.get_queue_attributes(QueueUrl=dead["QueueUrl"], AttributeNames=["QueueArn"]
                                       )["Attributes"]["QueueArn"]
        attrs["RedrivePolicy"] = json.dumps({"deadLetterTargetArn": arn,
                                             "maxReceiveCount": str(dlq_after)})
    return str(sqs.create_queue(QueueName=f"{name}.fifo", Attributes=attrs)["QueueUrl"])


def queue(moto: Moto, url: str) -> SqsQueue:
    return SqsQueue(url, endpoint=moto.url, region="us-east-1", wait_seconds=1)


@pytest.fixture(autouse=True)
def _aws_env(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in moto.aws_env().items():
        monkeypatch.setenv(k, v)


def test_one_run_of_an_instance_at_a_time_in_order(moto: Moto) -> None:
    q = queue(moto, fifo(moto))
    group = message_group("demo", "local.one")
    for run_id in ("r1", "r2", "r3"):
        q.send(run_id, group)
    q.send("r1", group)  # a second send of one run is dropped (deduplication id)
    # Two consumers waiting at once get one message of the group between them.
    with ThreadPoolExecutor(2) as pool:
        got = [m for ms in pool.map(lambda _: q.receive(1, visibility=30, wait=1), range(2))
               for m in ms]
    assert [m.run_id for m in got] == ["r1"]
    assert q.depth().in_flight == 1
    q.delete(got[0])
    nxt = q.receive(1, visibility=30, wait=1)
    assert [m.run_id for m in nxt] == ["r2"] and nxt[0].receives == 1
    q.release(nxt[0])  # handed back: the same run comes again, counted
    again = q.receive(1, visibility=30, wait=1)
    assert [m.run_id for m in again] == ["r2"] and again[0].receives == 2
    q.extend(again[0], 60)
    q.delete(again[0])
    assert [m.run_id for m in q.receive(1, visibility=30, wait=1)] == ["r3"]


def test_other_instances_are_not_held_up(moto: Moto) -> None:
    q = queue(moto, fifo(moto))
    q.send("a1", message_group("demo", "local.a"))
    q.send("a2", message_group("demo", "local.a"))
    q.send("b1", message_group("demo", "local.b"))
    first = [m.run_id for _ in range(3) for m in q.receive(1, visibility=30, wait=0)]
    assert sorted(first) == ["a1", "b1"]  # a2 waits for a1, b1 does not


def test_a_message_that_keeps_coming_back_goes_to_the_dead_letter_queue(moto: Moto) -> None:
    url = fifo(moto, dlq_after=2)
    q = queue(moto, url)
    q.send("poison", message_group("demo", "local.p"))
    for _ in range(2):
        (m,) = q.receive(1, visibility=30, wait=1)
        q.release(m)
    assert q.receive(1, visibility=30, wait=0) == []
    dead = queue(moto, url.replace(".fifo", "-dead.fifo"))
    assert [m.run_id for m in dead.receive(1, visibility=30, wait=1)] == ["poison"]


def test_long_group_names_are_digested_and_errors_translated(moto: Moto) -> None:
    group = message_group("m" * 63, "0" * 24 + "." + "i" * 63)
    assert len(group) <= 128 and group.startswith("sha256:")
    assert message_group("demo", "local.x") == "demo/local.x"
    gone = queue(moto, moto.url + "/000000000000/missing.fifo")
    with pytest.raises(BackendError) as e:
        gone.send("r", "g")
    assert "SQS cannot queue the run" in e.value.detail


def test_consumers_already_waiting_get_one_message_of_a_group(moto: Moto) -> None:
    # moto's own long poll hands both waiting consumers a message of one group; the
    # launcher (tests/moto_launcher.py) makes receives atomic, as real SQS's are.
    import threading
    import time

    q = queue(moto, fifo(moto))
    group = message_group("demo", "local.w")
    got: list[str] = []
    receivers = [threading.Thread(target=lambda: got.extend(
        m.run_id for m in q.receive(1, visibility=30, wait=3))) for _ in range(2)]
    for t in receivers:
        t.start()
    time.sleep(0.5)  # let both polls begin (if they have not, the test is only weaker)
    q.send("w1", group)
    q.send("w2", group)
    for t in receivers:
        t.join(10)
    assert got == ["w1"]
