"""Auto Scaling lifecycle actions: release an instance the controller held, or keep it held."""

from __future__ import annotations

from typing import Any, Protocol

from botocore.exceptions import ClientError

from tunnelnat.events import LifecycleDetail


class LifecyclePort(Protocol):
    def complete(self, action: LifecycleDetail, result: str) -> None: ...

    def heartbeat(self, action: LifecycleDetail) -> None: ...


class AutoScalingLifecycle:
    def __init__(self, autoscaling_client: Any) -> None:
        self._asg = autoscaling_client

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
