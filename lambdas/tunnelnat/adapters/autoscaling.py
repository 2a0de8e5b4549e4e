"""Auto Scaling lifecycle actions: release an instance the controller held, or keep it held.

How long an action may still be held is the action's own business: whether it is still open
(the instance's lifecycle state, ``Pending:Wait`` or ``Terminating:Wait``) and its hook's
timeouts (``HeartbeatTimeout``; ``GlobalTimeout``, the most a hook may hold in all), never the
time in the event, which a delayed delivery or a dead-letter redrive leaves far behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import ClientError

from tunnelnat.events import LifecycleDetail

WAIT_STATES = {True: "Pending:Wait", False: "Terminating:Wait"}  # by ``launching``


@dataclass(frozen=True)
class ActionState:
    """An open lifecycle action as Auto Scaling reports it."""

    waiting: bool  # the instance is still held at this transition
    heartbeat_timeout: float  # seconds a heartbeat (or the start) keeps it held
    global_timeout: float  # the most the hook may hold it in all, heartbeats included


class LifecyclePort(Protocol):
    def complete(self, action: LifecycleDetail, result: str) -> None: ...

    def heartbeat(self, action: LifecycleDetail) -> None: ...

    def describe(self, action: LifecycleDetail) -> ActionState:
        """Whether the action is still open, and its hook's timeouts."""
        ...


class AutoScalingLifecycle:
    def __init__(self, autoscaling_client: Any) -> None:
        self._asg = autoscaling_client
        self._hooks: dict[tuple[str, str], tuple[float, float]] = {}

    def describe(self, action: LifecycleDetail) -> ActionState:
        """Two reads: the instance's lifecycle state, and the hook's timeouts (once per hook
        and container: they change only when the hook is edited)."""
        members = self._asg.describe_auto_scaling_instances(InstanceIds=[action.instance_id])
        states = {
            m.get("LifecycleState")
            for m in members.get("AutoScalingInstances", [])
            if m.get("AutoScalingGroupName") == action.group_name
        }
        key = (action.group_name, action.hook_name)
        if key not in self._hooks:
            hooks = self._asg.describe_lifecycle_hooks(
                AutoScalingGroupName=action.group_name, LifecycleHookNames=[action.hook_name]
            ).get("LifecycleHooks", [])
            heartbeat = float(hooks[0].get("HeartbeatTimeout", 3600)) if hooks else 3600.0
            # AWS: GlobalTimeout is 100 x HeartbeatTimeout, at most 48 hours.
            limit = float(hooks[0].get("GlobalTimeout", 0)) if hooks else 0.0
            self._hooks[key] = (heartbeat, limit or min(100 * heartbeat, 172800.0))
        heartbeat, limit = self._hooks[key]
        return ActionState(WAIT_STATES[action.launching] in states, heartbeat, limit)

    def complete(self, action: LifecycleDetail, result: str) -> None:
        """CONTINUE or ABANDON; an action that already ended (token expired) is not an error."""
        try:
            self._asg.complete_lifecycle_action(
                LifecycleHookName=action.hook_name,
                AutoScalingGroupName=action.group_name,
                LifecycleActionToken=action.token,
                InstanceId=action.instance_id,
                LifecycleActionResult=result,
            )
        except ClientError as exc:
            if not _action_gone(exc):
                raise

    def heartbeat(self, action: LifecycleDetail) -> None:
        try:
            self._asg.record_lifecycle_action_heartbeat(
                LifecycleHookName=action.hook_name,
                AutoScalingGroupName=action.group_name,
                LifecycleActionToken=action.token,
                InstanceId=action.instance_id,
            )
        except ClientError as exc:
            if not _action_gone(exc):
                raise


def _action_gone(exc: ClientError) -> bool:
    # A duplicate delivery after completion, or a hook that timed out on its own.
    message = exc.response["Error"].get("Message", "")
    return exc.response["Error"]["Code"] == "ValidationError" and "No active Lifecycle" in message
