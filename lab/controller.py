"""The real controller Lambda handler, driven in-process against the lab.

The handler module builds its AWS clients from the environment (AWS_ENDPOINT_URL points boto3 at
moto); its commands go through ``LabCommands`` via ``build_controller(commands=...)`` and
``use_controller``, the handler's seam for other adapters; its Auto Scaling lifecycle calls go to
``lab.autoscaling.LabLifecycle``. ``LabController`` sets that environment for its lifetime only and
restores it on close.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from lab import aws as lab_aws
from lab import topology as topo
from lab.autoscaling import LabLifecycle
from lab.constants import ENROLMENT_TAG

# Read by Powertools when the handler module is imported: quiet logs, no EMF metric blobs on
# stdout, no X-Ray. The demo reports what happened itself.
QUIET = {
    "POWERTOOLS_LOG_LEVEL": "WARNING",
    "POWERTOOLS_METRICS_DISABLED": "true",
    "POWERTOOLS_TRACE_DISABLED": "true",
    "POWERTOOLS_SERVICE_NAME": "tunnelnat",
    "POWERTOOLS_METRICS_NAMESPACE": "tunnelnat",
}


@dataclass
class FakeContext:
    """What Powertools' inject_lambda_context reads from a Lambda context."""

    function_name: str = "tunnelnat-controller-lab"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = (
        f"arn:aws:lambda:{topo.REGION}:123456789012:function:tunnelnat-controller-lab"
    )
    aws_request_id: str = "lab"


class LabController:
    def __init__(self, lab: topo.Lab) -> None:
        self.lab = lab
        self._saved: dict[str, str | None] = {}
        # The VPC the controller serves and G's ENI, as the stack sets them (instances in another
        # VPC: other-vpc; in another subnet of ours: route-table mode).
        environ = {**QUIET, **lab_aws.controller_environ(lab.aws_env(), lab.aws)}
        for key, value in environ.items():
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value
        # Imported once the environment is set: Powertools reads it at import.
        from tunnelnat.handlers import controller as handler_module
        from tunnelnat.settings import ControllerSettings

        self.module = handler_module
        settings = ControllerSettings.from_environ()
        self.controller = handler_module.build_controller(settings, commands=lab.commands)
        # moto does not implement CompleteLifecycleAction: the lab's port checks and records it.
        self.lifecycle = LabLifecycle(lab.aws)
        handler_module.use_controller(self.controller, lifecycle=self.lifecycle)

    def close(self) -> None:
        self.module.use_controller(None)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def __enter__(self) -> LabController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        """Call the Lambda handler as Lambda would, with one event."""
        context = FakeContext(aws_request_id=str(uuid.uuid4()))
        return self.module.handler(event, context)

    def tag_changed(self, name: str, *, enrol: bool) -> dict[str, Any]:
        """Tag (or untag) instance ``name`` in EC2, then deliver EventBridge's tag-change event."""
        instance_id = self.lab.aws.instance_ids[name]
        key = ENROLMENT_TAG[0]
        if enrol:
            self.lab.aws.tag(instance_id)
        else:
            self.lab.aws.untag(instance_id)
        event = lab_aws.tag_change_event(
            instance_id, {key: ""}, self.lab.aws.tags(instance_id), event_id=str(uuid.uuid4())
        )
        return self.invoke(event)
