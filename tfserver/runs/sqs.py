"""The SQS FIFO queue runs travel on between API replicas and workers (the `sqs` engine).

One message a run: its `MessageGroupId` is the instance (so SQS hands out one run of an
instance at a time, in order, across the fleet), its `MessageDeduplicationId` the run id,
its body the run id alone (the spec, inputs and plan stay in the state backend). A worker
keeps a running message invisible (`ChangeMessageVisibility`) as its heartbeat and
deletes it once the run's final record is stored. Every AWS error is translated here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..storage.base import BackendError

#: SQS's longest `MessageGroupId`.
_GROUP_MAX = 128


def message_group(module: str, workspace: str) -> str:
    """The FIFO group of an instance's runs (a digest when the name would be too long)."""
    group = f"{module}/{workspace}"
    if len(group) <= _GROUP_MAX:
        return group
    return "sha256:" + hashlib.sha256(group.encode()).hexdigest()


@dataclass(frozen=True)
class Message:
    """One received message: the run it names and the handle to extend or delete it."""

    run_id: str
    receipt: str
    #: How often SQS has handed this message out (1 the first time).
    receives: int


@dataclass(frozen=True)
class QueueDepth:
    """What the queue holds: messages waiting, and messages a worker holds."""

    waiting: int
    in_flight: int


class SqsQueue:
    """A FIFO queue at `url` (boto3, every call bounded by `timeout` seconds)."""

    def __init__(self, url: str, *, endpoint: str | None = None, region: str | None = None,
                 timeout: float = 10.0, wait_seconds: int = 20) -> None:
        self.url = url
        self.wait_seconds = wait_seconds
        # A long poll holds its connection for up to `wait_seconds`: the read timeout
        # must outlast it.
        # boto3 only when the queue is used: a server of the `local` engine never loads it.
        import boto3
        from botocore.config import Config as BotoConfig

        config = BotoConfig(connect_timeout=timeout, read_timeout=timeout + wait_seconds,
                            retries={"max_attempts": 3, "mode": "standard"})
        region = region or _region_of(url) or os.environ.get("AWS_REGION") \
            or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self._sqs: Any = boto3.client("sqs", endpoint_url=endpoint, region_name=region,
                                      config=config)

    def send(self, run_id: str, group: str) -> None:
        """Queue the run (a second send of one run id within 5 minutes is dropped by SQS)."""
        with _aws("SQS cannot queue the run"):
            self._sqs.send_message(QueueUrl=self.url, MessageBody=run_id,
                                   MessageGroupId=group, MessageDeduplicationId=run_id)

    def receive(self, count: int, *, visibility: int, wait: int | None = None
                ) -> list[Message]:
        """Up to `count` (1-10) messages, waiting up to `wait` seconds (a long poll) for
        the first; each stays invisible to others for `visibility` seconds. One answer may
        hold several messages of one group (in order): a worker that runs each message at
        once asks for one."""
        with _aws("SQS cannot receive"):
            answer = self._sqs.receive_message(
                QueueUrl=self.url, MaxNumberOfMessages=max(1, min(10, count)),
                WaitTimeSeconds=self.wait_seconds if wait is None else wait,
                VisibilityTimeout=visibility,
                MessageSystemAttributeNames=["ApproximateReceiveCount"])
        return [Message(str(m.get("Body", "")), str(m["ReceiptHandle"]),
                        int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)))
                for m in answer.get("Messages", [])]

    def extend(self, message: Message, visibility: int) -> None:
        """Keep the message invisible for `visibility` more seconds (the heartbeat)."""
        with _aws("SQS cannot extend a message"):
            self._sqs.change_message_visibility(QueueUrl=self.url,
                                                ReceiptHandle=message.receipt,
                                                VisibilityTimeout=visibility)

    def release(self, message: Message) -> None:
        """Hand the message back at once (a stopping worker's unstarted run)."""
        self.extend(message, 0)

    def delete(self, message: Message) -> None:
        """The run is done with: remove its message."""
        with _aws("SQS cannot delete a message"):
            self._sqs.delete_message(QueueUrl=self.url, ReceiptHandle=message.receipt)

    def depth(self) -> QueueDepth:
        """Approximate counts of waiting and held messages (also the readiness check)."""
        with _aws("SQS cannot be read"):
            attrs = self._sqs.get_queue_attributes(
                QueueUrl=self.url, AttributeNames=[
                    "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
            ).get("Attributes", {})
        return QueueDepth(int(attrs.get("ApproximateNumberOfMessages", 0)),
                          int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)))

    def close(self) -> None:
        """Release the client's connections."""
        self._sqs.close()


def _region_of(url: str) -> str | None:
    """The region in an AWS queue URL (`https://sqs.<region>.amazonaws.com/...`)."""
    host = url.split("://", 1)[-1].split("/", 1)[0]
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "sqs" and parts[-2:] == ["amazonaws", "com"]:
        return parts[1]
    return None


@contextmanager
def _aws(what: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as e:
        error = e.response.get("Error", {})
        raise BackendError(f"{what}: {error.get('Code', 'error')}") from e
    except BotoCoreError as e:
        raise BackendError(f"{what}: {type(e).__name__}") from e
