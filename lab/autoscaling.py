"""Auto Scaling in the lab: a group with a launch lifecycle hook whose events reach the real
controller handler the way they do in AWS, through EventBridge and the controller's SQS queue.

What moto 5.2.5 does not do, and what the lab does instead:

- moto gives a group's launches addresses of its own choosing, and its subnet allocator does not
  know the addresses of standalone ENIs (it would hand out G). The lab launches each burst
  instance with ``RunInstances`` at the address of the namespace it boots for it (``instance_ip``),
  tagged as the group's launch template and tag propagation would, then ``AttachInstances`` makes
  it a member of the group.
- moto never holds an instance in ``Pending:Wait`` and emits no lifecycle event. The lab puts the
  "EC2 Instance-launch Lifecycle Action" (or terminate) event into moto's EventBridge with
  ``PutEvents``; moto's rule, with the stack's event pattern, delivers it to the controller's
  queue in EventBridge's own envelope (restored with an input transformer: see ``ENVELOPE``).
- Lambda's SQS event source is not moto's: ``LambdaSqsSource`` receives up to 10 messages (the
  stack's batch size), hands them to the handler in Lambda's record shape and deletes the ones the
  partial-batch response does not list as failed, as the event source mapping does.
- moto does not implement ``CompleteLifecycleAction`` or ``RecordLifecycleActionHeartbeat``.
  ``LabLifecycle`` is the controller's lifecycle port in the lab: it checks each call as Auto
  Scaling would (the hook exists on the group, the instance is in the group, the token was issued
  for that instance and is still open) against moto and the tokens the lab issued, and records it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from lab import constants as c
from lab.aws import LabAws
from lab.constants import ENROLMENT_TAG, WEB_TEMPLATE
from tunnelnat.adapters.autoscaling import ActionState
from tunnelnat.events import LAUNCH_ACTION, TERMINATE_ACTION, LifecycleDetail, hook_names

GROUP = f"{c.DEPLOYMENT}-web"
# The controller answers only its deployment's hooks, named exactly as the stack names them
# (events.hook_names: tunnelnat-<deployment>-launch and -terminate, on each group).
HOOK, TERMINATE_HOOK = hook_names(c.DEPLOYMENT)
TEMPLATE = WEB_TEMPLATE
RULE = f"{c.DEPLOYMENT}-lifecycle"
BATCH_SIZE = 10  # the stack's SqsEventSource batch_size
LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
ATTACH_MAX = 20  # AttachInstances takes at most 20 instance IDs
PUT_EVENTS_MAX = 10  # PutEvents takes at most 10 entries


# moto's SQS delivery leaves "account" out of EventBridge's envelope (the controller's parser,
# rightly, refuses such an event). The lab's target puts the whole envelope back together with an
# input transformer; the stack's target needs none, AWS sends the event as it is.
_FIELDS = ("id", "detail-type", "source", "account", "time", "region", "resources", "detail")
ENVELOPE = {
    "InputPathsMap": {name: f"$.{name}" for name in _FIELDS},
    "InputTemplate": (
        '{"version": "0", "id": "<id>", "detail-type": "<detail-type>", "source": "<source>", '
        '"account": "<account>", "time": <time>, "region": "<region>", '
        '"resources": <resources>, "detail": <detail>}'
    ),
}


def create_group(aws: LabAws) -> None:
    """The launch template, the group (empty), its lifecycle hooks, and the EventBridge rule that
    sends lifecycle actions to the controller's queue (the stack's pattern)."""
    aws.client("ec2").create_launch_template(
        LaunchTemplateName=TEMPLATE,
        LaunchTemplateData={"ImageId": aws.image_id, "InstanceType": "t3.micro"},
    )
    asg = aws.client("autoscaling")
    asg.create_auto_scaling_group(
        AutoScalingGroupName=GROUP,
        LaunchTemplate={"LaunchTemplateName": TEMPLATE, "Version": "$Latest"},
        MinSize=0,
        MaxSize=200,
        DesiredCapacity=0,
        VPCZoneIdentifier=aws.subnet_id,
        Tags=[
            {
                "ResourceId": GROUP,
                "ResourceType": "auto-scaling-group",
                "Key": ENROLMENT_TAG[0],
                "Value": ENROLMENT_TAG[1],
                "PropagateAtLaunch": True,
            }
        ],
    )
    for name, transition in ((HOOK, LAUNCHING), (TERMINATE_HOOK, TERMINATING)):
        asg.put_lifecycle_hook(
            LifecycleHookName=name,
            AutoScalingGroupName=GROUP,
            LifecycleTransition=transition,
            HeartbeatTimeout=900,
            DefaultResult="ABANDON" if transition == LAUNCHING else "CONTINUE",
        )
    events = aws.client("events")
    events.put_rule(
        Name=RULE,
        EventPattern=json.dumps(
            {
                "source": ["aws.autoscaling"],
                "detail-type": [LAUNCH_ACTION, TERMINATE_ACTION],
                "detail": {"LifecycleHookName": list(hook_names(c.DEPLOYMENT))},
            }
        ),
        State="ENABLED",
        Description=f"{c.DEPLOYMENT}: Auto Scaling lifecycle actions (launch, terminate)",
    )
    events.put_targets(
        Rule=RULE,
        Targets=[{"Id": "controller-queue", "Arn": aws.queue_arn, "InputTransformer": ENVELOPE}],
    )


def group_arn(aws: LabAws) -> str:
    groups = aws.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])
    return groups["AutoScalingGroups"][0]["AutoScalingGroupARN"]


def launch(aws: LabAws, instances: Sequence[c.Instance]) -> list[str]:
    """Launch ``instances`` into the group at their namespaces' addresses; their IDs, in order."""
    ec2 = aws.client("ec2")
    ids = []
    for inst in instances:
        tags = [
            {"Key": "Name", "Value": inst.name},
            {"Key": ENROLMENT_TAG[0], "Value": ENROLMENT_TAG[1]},
        ]
        reply = ec2.run_instances(
            LaunchTemplate={"LaunchTemplateName": TEMPLATE, "Version": "$Latest"},
            MinCount=1,
            MaxCount=1,
            SubnetId=aws.subnet_id,
            PrivateIpAddress=inst.private_ip,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
        inst.instance_id = reply["Instances"][0]["InstanceId"]
        aws.instance_ids[inst.name] = inst.instance_id
        ids.append(inst.instance_id)
    asg = aws.client("autoscaling")
    for start in range(0, len(ids), ATTACH_MAX):
        asg.attach_instances(
            AutoScalingGroupName=GROUP, InstanceIds=ids[start : start + ATTACH_MAX]
        )
    return ids


@dataclass(frozen=True)
class LifecycleCall:
    call: str  # CompleteLifecycleAction | RecordLifecycleActionHeartbeat
    instance_id: str
    transition: str
    result: str | None  # CONTINUE | ABANDON for completions
    at: float  # time.monotonic()


def _validation(message: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": "ValidationError", "Message": message}}, operation)


@dataclass
class LabLifecycle:
    """The controller's ``LifecyclePort`` in the lab: Auto Scaling's checks, and a record."""

    aws: LabAws
    issued: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (id, transition)
    calls: list[LifecycleCall] = field(default_factory=list)

    def issue(self, instance_id: str, transition: str) -> str:
        """A token for a lifecycle action that starts now (what Auto Scaling puts in the event)."""
        token = str(uuid.uuid4())
        self.issued[token] = (instance_id, transition)
        return token

    def complete(self, action: LifecycleDetail, result: str) -> None:
        self._check(action, "CompleteLifecycleAction")
        if result not in ("CONTINUE", "ABANDON"):
            raise _validation(f"invalid LifecycleActionResult {result}", "CompleteLifecycleAction")
        del self.issued[action.token]  # an action ends once; a second completion is refused
        self.calls.append(
            LifecycleCall(
                "CompleteLifecycleAction",
                action.instance_id,
                action.transition,
                result,
                time.monotonic(),
            )
        )

    def heartbeat(self, action: LifecycleDetail) -> None:
        self._check(action, "RecordLifecycleActionHeartbeat")
        self.calls.append(
            LifecycleCall(
                "RecordLifecycleActionHeartbeat",
                action.instance_id,
                action.transition,
                None,
                time.monotonic(),
            )
        )

    def describe(self, action: LifecycleDetail) -> ActionState:
        """Open while its token is (moto never holds an instance in Pending:Wait); the hook's
        timeouts as moto's DescribeLifecycleHooks reports them."""
        hooks = self.aws.client("autoscaling").describe_lifecycle_hooks(
            AutoScalingGroupName=action.group_name, LifecycleHookNames=[action.hook_name]
        )["LifecycleHooks"]
        heartbeat = float(hooks[0]["HeartbeatTimeout"]) if hooks else 3600.0
        limit = float(hooks[0].get("GlobalTimeout") or min(100 * heartbeat, 172800.0))
        waiting = self.issued.get(action.token, ("",))[0] == action.instance_id
        return ActionState(waiting, heartbeat, limit)

    def _check(self, action: LifecycleDetail, operation: str) -> None:
        issued = self.issued.get(action.token)
        if issued is None or issued[0] != action.instance_id:
            # Auto Scaling's words for a token that is unknown or already used.
            raise _validation(
                f"No active Lifecycle Action found with token {action.token}", operation
            )
        asg = self.aws.client("autoscaling")
        hooks = asg.describe_lifecycle_hooks(
            AutoScalingGroupName=action.group_name, LifecycleHookNames=[action.hook_name]
        )["LifecycleHooks"]
        if not hooks or hooks[0]["LifecycleTransition"] != action.transition:
            raise _validation(
                f"No {action.transition} hook {action.hook_name} on group {action.group_name}",
                operation,
            )
        members = asg.describe_auto_scaling_instances(InstanceIds=[action.instance_id])
        groups = {m["AutoScalingGroupName"] for m in members["AutoScalingInstances"]}
        if action.group_name not in groups:
            raise _validation(
                f"Instance {action.instance_id} is not in group {action.group_name}", operation
            )

    def completed(self, result: str = "CONTINUE", transition: str = LAUNCHING) -> list[str]:
        """Instance IDs whose ``transition`` action was completed with ``result``, in order."""
        return [
            c.instance_id
            for c in self.calls
            if c.call == "CompleteLifecycleAction"
            and c.result == result
            and c.transition == transition
        ]


def emit_lifecycle_events(
    aws: LabAws, lifecycle: LabLifecycle, instance_ids: Sequence[str], transition: str
) -> None:
    """What Auto Scaling sends when it holds ``instance_ids`` at ``transition``: one event each,
    through moto's EventBridge (its rule delivers them to the controller's queue)."""
    arn = group_arn(aws)
    launching = transition == LAUNCHING
    entries = []
    for instance_id in instance_ids:
        detail = {
            "Origin": "EC2" if launching else "AutoScalingGroup",
            "Destination": "AutoScalingGroup" if launching else "EC2",
            "LifecycleActionToken": lifecycle.issue(instance_id, transition),
            "AutoScalingGroupName": GROUP,
            "LifecycleHookName": HOOK if launching else TERMINATE_HOOK,
            "EC2InstanceId": instance_id,
            "LifecycleTransition": transition,
        }
        entries.append(
            {
                "Source": "aws.autoscaling",
                "DetailType": LAUNCH_ACTION if launching else TERMINATE_ACTION,
                "Resources": [arn],
                "Detail": json.dumps(detail),
            }
        )
    events = aws.client("events")
    for start in range(0, len(entries), PUT_EVENTS_MAX):
        reply = events.put_events(Entries=entries[start : start + PUT_EVENTS_MAX])
        if reply.get("FailedEntryCount"):
            raise c.LabError(f"PutEvents refused lifecycle events: {reply['Entries']}")


@dataclass(frozen=True)
class BatchRun:
    size: int
    failed: int
    seconds: float


@dataclass
class LambdaSqsSource:
    """Lambda's SQS event source mapping, for the controller's queue: batches of up to
    ``batch_size`` messages to ``invoke``, partial-batch responses honoured."""

    aws: LabAws
    invoke: Callable[[dict[str, Any]], dict[str, Any]]
    batch_size: int = BATCH_SIZE
    runs: list[BatchRun] = field(default_factory=list)

    def poll_once(self) -> BatchRun | None:
        sqs = self.aws.client("sqs")
        reply = sqs.receive_message(
            QueueUrl=self.aws.queue_url,
            MaxNumberOfMessages=self.batch_size,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
            WaitTimeSeconds=0,
        )
        messages = reply.get("Messages", [])
        if not messages:
            return None
        event = {"Records": [self._record(m) for m in messages]}
        started = time.monotonic()
        response = self.invoke(event)
        failed = {f["itemIdentifier"] for f in (response or {}).get("batchItemFailures", [])}
        done = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
            for i, m in enumerate(messages)
            if m["MessageId"] not in failed
        ]
        if done:
            sqs.delete_message_batch(QueueUrl=self.aws.queue_url, Entries=done)
        run = BatchRun(len(messages), len(failed), time.monotonic() - started)
        self.runs.append(run)
        return run

    def drain(self, timeout: float = 120.0) -> list[BatchRun]:
        """Deliver until the queue is empty (failed messages come back after their delay)."""
        deadline = time.monotonic() + timeout
        runs: list[BatchRun] = []
        while time.monotonic() < deadline:
            run = self.poll_once()
            if run is not None:
                runs.append(run)
                continue
            if self.in_queue() == 0:
                return runs
            time.sleep(0.5)
        raise c.LabError(f"the controller queue still holds {self.in_queue()} message(s)")

    def in_queue(self) -> int:
        attrs = self.aws.client("sqs").get_queue_attributes(
            QueueUrl=self.aws.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(
            attrs["ApproximateNumberOfMessagesNotVisible"]
        )

    def _record(self, message: dict[str, Any]) -> dict[str, Any]:
        # The record Lambda builds from a received message.
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": dict(message.get("Attributes", {})),
            "messageAttributes": {
                name: {"stringValue": value.get("StringValue"), "dataType": value["DataType"]}
                for name, value in message.get("MessageAttributes", {}).items()
            },
            "md5OfBody": message["MD5OfBody"],
            "eventSource": "aws:sqs",
            "eventSourceARN": self.aws.queue_arn,
            "awsRegion": c.REGION,
        }
