"""AWS as strict as AWS: the refusals and delays of EC2 (and a few others) that moto lacks.

A WSGI middleware around moto's server app (``tools/moto_server.py``'s ``SerialMotoServer`` wraps
every request in it, so tests/lambdas, tests/cli, tests/unit and the lab all meet it). It reads
the request (service and access key from the SigV4 ``Authorization`` header, the action from the
query protocol's ``Action=`` or the JSON protocol's ``X-Amz-Target``), may refuse it as AWS would,
delay it, throttle it, or let moto answer and then rewrite moto's XML. moto runs in this process,
so the rules read moto's EC2 backend directly to decide.

Always on (AWS's own error codes and messages; sources beside each rule and in docs/parity.md):

- ``ModifyInstanceAttribute`` with ``SourceDestCheck`` on an instance with several network
  interfaces -> ``InvalidInstanceID`` (the attribute is the primary interface's; EC2 wants the
  interface named).
- ``AttachNetworkInterface`` of an interface that is attached, attaching or detaching ->
  ``InvalidNetworkInterface.InUse``; at a device index the instance already uses, or one a
  *forced* detach left unusable (until the instance is stopped) -> ``InvalidParameterValue``.
- ``DetachNetworkInterface`` of a device-index-0 interface -> ``OperationNotPermitted``.
- ``CreateRoute`` of an IPv4 destination the table already has (its local route included) ->
  ``RouteAlreadyExists``: moto checks only when the target is not an interface, and our routes
  target G's interface.

Off until asked (the control API below, or ``StrictClient``): attach/detach taking seconds,
stale ``DescribeNetworkInterfaces`` reads, slow calls for one access key, throttling.

moto implements neither CloudFormation ``SignalResource`` nor Auto Scaling
``CompleteLifecycleAction`` (moto 5.2: "not been implemented", HTTP 500); the middleware answers
both as AWS does and records them (``signals()``, ``lifecycle_actions()``).

Control API (JSON; served under ``/_strict/`` on the moto server's port):
``POST /_strict/configure`` ``{"attach_seconds", "detach_seconds", "stale_reads"}``,
``POST /_strict/slow`` ``{"access_key", "seconds", "duration", "services"}``,
``POST /_strict/throttle`` ``{"action", "count", "access_key"}``, ``POST /_strict/reset``
(moto's ``/moto-api/reset`` does it too), ``GET /_strict/config``, ``/_strict/log``,
``/_strict/signals``, ``/_strict/lifecycle_actions``, ``/_strict/blocked``.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import threading
import time
import urllib.request
import uuid
import xml.etree.ElementTree as ET  # noqa: S405 - moto's own replies, in this process
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15"
CFN_NS = "http://cloudformation.amazonaws.com/doc/2010-05-15/"
ASG_NS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
PREFIX = "/_strict/"
CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")

# The EC2 actions whose answer the rules read or change: they run one at a time (under
# ``ec2_lock``), so a check and moto's change are one step, as EC2's attachment is one record
# (two standbys attaching at once: one wins, the other is refused InUse).
EC2_TOUCHED = {
    "AttachNetworkInterface",
    "DetachNetworkInterface",
    "ModifyInstanceAttribute",
    "DescribeNetworkInterfaces",
    "DescribeInstances",
    "StopInstances",
    "StartInstances",
    "CreateRoute",
}

# DynamoDB's data-plane calls are throttled as ProvisionedThroughputExceededException (also for
# on-demand tables beyond their peak); its control plane as ThrottlingException
# (https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Programming.Errors.html).
DYNAMODB_DATA = {
    "GetItem",
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "Query",
    "Scan",
    "BatchGetItem",
    "BatchWriteItem",
    "TransactGetItems",
    "TransactWriteItems",
}

try:  # keep moto's EC2 namespace the default one when a reply is written back
    ET.register_namespace("", EC2_NS)
except ValueError:  # pragma: no cover - a registry that refuses the default prefix
    pass


def _q(tag: str) -> str:
    return f"{{{EC2_NS}}}{tag}"


@dataclass
class Call:
    """One request, as the rules see it."""

    environ: dict[str, Any]
    path: str
    service: str
    region: str
    access_key: str
    action: str
    params: dict[str, str]
    body: bytes
    json_protocol: bool

    def account(self) -> str:
        """The moto account the request lands in, found as moto finds it."""
        if "MOTO_ACCOUNT_ID" in os.environ:
            return os.environ["MOTO_ACCOUNT_ID"]
        header = self.environ.get("HTTP_X_MOTO_ACCOUNT_ID")
        if header:
            return str(header)
        from moto.iam.models import get_account_id_from

        return get_account_id_from(self.access_key)


@dataclass
class Reply:
    status: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class PendingDetach:
    eni_id: str
    attachment_id: str
    instance_id: str
    device_index: int
    account: str
    region: str
    due: float
    force: bool


@dataclass
class Slow:
    access_key: str
    seconds: float
    until: float
    services: tuple[str, ...]


@dataclass
class Throttle:
    action: str
    left: int
    access_key: str | None


@dataclass
class Stale:
    item: bytes  # the networkInterfaceSet <item> as it was served before the change
    left: int


@dataclass
class StrictState:
    """Everything the middleware keeps; ``reset()`` empties it."""

    attach_seconds: float = 0.0
    detach_seconds: float = 0.0
    stale_reads: int = 0
    slows: list[Slow] = field(default_factory=list)
    throttles: list[Throttle] = field(default_factory=list)
    attaching: dict[str, tuple[str, float]] = field(default_factory=dict)  # eni -> (att, until)
    detaching: dict[str, PendingDetach] = field(default_factory=dict)  # eni -> pending
    blocked: dict[tuple[str, str, str, int], str] = field(default_factory=dict)
    stale: dict[str, Stale] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    signals: list[dict[str, Any]] = field(default_factory=list)
    lifecycle_actions: list[dict[str, Any]] = field(default_factory=list)

    def config(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "attach_seconds": self.attach_seconds,
            "detach_seconds": self.detach_seconds,
            "stale_reads": self.stale_reads,
            "slow": [
                {
                    "access_key": s.access_key,
                    "seconds": s.seconds,
                    "remaining": max(0.0, s.until - now),
                    "services": list(s.services),
                }
                for s in self.slows
                if s.until > now
            ],
            "throttle": [
                {"action": t.action, "left": t.left, "access_key": t.access_key}
                for t in self.throttles
                if t.left > 0
            ],
        }


class StrictMiddleware:
    """Wrap ``app`` (moto's WSGI app) with AWS's refusals and delays; see the module's doc."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.state = StrictState()
        self.lock = threading.RLock()  # the state
        self.ec2_lock = threading.RLock()  # a check and moto's change as one step

    # -- the WSGI entry ---------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "") or ""
        if path.startswith(PREFIX):
            return self._control(environ, start_response, path[len(PREFIX) :])
        if path.startswith("/moto-api/reset"):
            self.reset()
            return self.app(environ, start_response)
        call = self._parse(environ, path)
        if call is None:
            return self.app(environ, start_response)
        self._settle()
        self._delay(call)  # before any lock: a slow caller holds nobody else up
        throttled = self._throttled(call)
        if throttled is not None:
            return self._send(start_response, throttled)
        special = self._special(call)
        if special is not None:
            return self._send(start_response, special)
        if call.service == "ec2" and call.action in EC2_TOUCHED:
            with self.ec2_lock:
                self._settle()
                reply = self._ec2(call)
            return self._send(start_response, reply)
        return self.app(environ, start_response)

    # -- parsing ----------------------------------------------------------------------------------

    def _parse(self, environ: dict[str, Any], path: str) -> Call | None:
        auth = str(environ.get("HTTP_AUTHORIZATION", ""))
        match = CREDENTIAL.search(auth)
        access_key, region, service = match.groups() if match else ("", "us-east-1", "")
        target = str(environ.get("HTTP_X_AMZ_TARGET", ""))
        ctype = str(environ.get("CONTENT_TYPE", ""))
        body = b""
        params: dict[str, str] = {}
        if target:
            action = target.rsplit(".", 1)[-1]
        elif (
            "x-www-form-urlencoded" in ctype or environ.get("QUERY_STRING", "").find("Action=") >= 0
        ):
            if "x-www-form-urlencoded" in ctype:
                body = self._body(environ)
            raw = body.decode("utf-8", "replace") + "&" + str(environ.get("QUERY_STRING", ""))
            params = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
            action = params.get("Action", "")
        else:
            return None
        if not service:  # unsigned: nothing to tell a caller by, nothing to delay or throttle
            return None
        return Call(environ, path, service, region, access_key, action, params, body, bool(target))

    @staticmethod
    def _body(environ: dict[str, Any]) -> bytes:
        """Read the body once and put it back for moto."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return body

    # -- delays and throttles ---------------------------------------------------------------------

    def _delay(self, call: Call) -> None:
        now = time.monotonic()
        with self.lock:
            self.state.slows = [s for s in self.state.slows if s.until > now]
            seconds = max(
                (
                    s.seconds
                    for s in self.state.slows
                    if s.access_key == call.access_key and call.service in s.services
                ),
                default=0.0,
            )
        if seconds > 0:
            self._log(call, "delay", f"{call.service} delayed {seconds:g} s")
            time.sleep(seconds)

    def _throttled(self, call: Call) -> Reply | None:
        with self.lock:
            for rule in self.state.throttles:
                if rule.left <= 0 or rule.action != call.action:
                    continue
                if rule.access_key is not None and rule.access_key != call.access_key:
                    continue
                rule.left -= 1
                break
            else:
                return None
        reply = throttle_reply(call)
        self._log(call, _error_code(reply), f"throttled ({rule.left} left)")
        return reply

    # -- CloudFormation and Auto Scaling calls moto lacks -----------------------------------------

    def _special(self, call: Call) -> Reply | None:
        p = call.params
        if call.service == "cloudformation" and call.action == "SignalResource":
            # https://docs.aws.amazon.com/AWSCloudFormation/latest/APIReference/API_SignalResource.html
            status = p.get("Status", "")
            if status not in ("SUCCESS", "FAILURE"):
                return query_error(
                    "ValidationError",
                    f"1 validation error detected: Value '{status}' at 'status' failed to "
                    "satisfy constraint: Member must satisfy enum value set: [SUCCESS, FAILURE]",
                )
            record = {
                "at": time.time(),
                "stack": p.get("StackName", ""),
                "logical_resource_id": p.get("LogicalResourceId", ""),
                "unique_id": p.get("UniqueId", ""),
                "status": status,
                "access_key": call.access_key,
            }
            with self.lock:
                self.state.signals.append(record)
            self._log(call, "signal", json.dumps(record, sort_keys=True))
            return xml_reply(
                f'<SignalResourceResponse xmlns="{CFN_NS}"><ResponseMetadata><RequestId>'
                f"{uuid.uuid4()}</RequestId></ResponseMetadata></SignalResourceResponse>"
            )
        if call.service == "autoscaling" and call.action == "CompleteLifecycleAction":
            # https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_CompleteLifecycleAction.html
            result = p.get("LifecycleActionResult", "")
            if result not in ("CONTINUE", "ABANDON"):
                return query_error(
                    "ValidationError", f"Invalid LifecycleActionResult value: {result}"
                )
            record = {
                "at": time.time(),
                "hook": p.get("LifecycleHookName", ""),
                "group": p.get("AutoScalingGroupName", ""),
                "instance": p.get("InstanceId", ""),
                "token": p.get("LifecycleActionToken", ""),
                "result": result,
                "access_key": call.access_key,
            }
            with self.lock:
                self.state.lifecycle_actions.append(record)
            self._log(call, "lifecycle-action", json.dumps(record, sort_keys=True))
            return xml_reply(
                f'<CompleteLifecycleActionResponse xmlns="{ASG_NS}">'
                "<CompleteLifecycleActionResult/>"
                f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
                "</CompleteLifecycleActionResponse>"
            )
        return None

    # -- EC2 --------------------------------------------------------------------------------------

    def _backend(self, account: str, region: str) -> Any:
        from moto.ec2.models import ec2_backends

        return ec2_backends[account][region]

    def _ec2(self, call: Call) -> Reply:
        backend = self._backend(call.account(), call.region)
        handler = getattr(self, f"_ec2_{call.action}")
        return handler(call, backend)

    def _ec2_ModifyInstanceAttribute(self, call: Call, backend: Any) -> Reply:  # noqa: N802
        p = call.params
        sdc = "SourceDestCheck.Value" in p or p.get("Attribute") == "sourceDestCheck"
        instance = _find(backend.get_instance, p.get("InstanceId", ""))
        if sdc and instance is not None and len(instance.nics) > 1:
            # The instance's sourceDestCheck is its primary interface's; with several interfaces
            # EC2 wants the interface named (ModifyNetworkInterfaceAttribute). Seen as
            # https://github.com/aws/aws-cdk/issues/13791,
            # https://github.com/hashicorp/terraform-provider-aws/issues/7107, fixed in
            # https://github.com/kubernetes/kubernetes/pull/92800 by modifying device index 0.
            return self._refuse(
                call,
                "InvalidInstanceID",
                f"There are multiple interfaces attached to instance '{instance.id}'. "
                "Please specify an interface ID for the operation instead.",
            )
        return self._moto(call)

    def _ec2_AttachNetworkInterface(self, call: Call, backend: Any) -> Reply:  # noqa: N802
        p = call.params
        eni = _find(backend.get_network_interface, p.get("NetworkInterfaceId", ""))
        instance = _find(backend.get_instance, p.get("InstanceId", ""))
        if eni is None or instance is None:
            return self._moto(call)  # moto's NotFound errors
        if eni.instance is not None:
            # One attachment per interface: attached, attaching or detaching is "in use".
            # Message as seen in https://github.com/hashicorp/terraform-provider-aws/issues/27513
            # and https://github.com/aws/aws-parallelcluster/issues/4063 (EC2 API error codes:
            # https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html).
            return self._refuse(
                call, "InvalidNetworkInterface.InUse", f"Interface: [{eni.id}] in use."
            )
        index = int(p.get("DeviceIndex", "0") or 0)
        key = (call.account(), call.region, instance.id, index)
        with self.lock:
            blocked_by = self.state.blocked.get(key)
        if index in instance.nics or blocked_by is not None:
            # moto overwrites the index; EC2 refuses it (message as in
            # https://github.com/lstoll/k8s-vpcnet/issues/71 and
            # https://github.com/cilium/cilium/pull/42512). A forced detach leaves the index
            # unusable until a stop/start: "you might not be able to attach a different network
            # interface to the same index on the instance without first stopping and starting
            # the instance" (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DetachNetworkInterface.html).
            detail = f" (force-detached {blocked_by}; stop/start clears it)" if blocked_by else ""
            return self._refuse(
                call,
                "InvalidParameterValue",
                f"Instance '{instance.id}' already has an interface attached at device index "
                f"'{index}'.",
                detail=detail,
            )
        before = self._snapshot(call, eni.id)
        reply = self._moto(call)
        if reply.status.startswith("200"):
            self._changed(call, eni.id, before)
            if self.state.attach_seconds > 0 and eni.attachment_id:
                with self.lock:
                    self.state.attaching[eni.id] = (
                        eni.attachment_id,
                        time.monotonic() + self.state.attach_seconds,
                    )
                self._log(
                    call,
                    "attaching",
                    f"{eni.id} attaching to {instance.id} for {self.state.attach_seconds:g} s",
                )
        return reply

    def _ec2_DetachNetworkInterface(self, call: Call, backend: Any) -> Reply:  # noqa: N802
        p = call.params
        attachment_id = p.get("AttachmentId", "")
        force = p.get("Force", "false").lower() == "true"
        eni = next((e for e in backend.enis.values() if e.attachment_id == attachment_id), None)
        if eni is None or eni.instance is None:
            return self._moto(call)  # InvalidAttachmentID.NotFound
        if eni.device_index == 0:
            # The primary interface never detaches (https://github.com/getmoto/moto/issues/7678;
            # moto refuses only an instance's last interface).
            return self._refuse(
                call,
                "OperationNotPermitted",
                "The network interface at device index 0 and networkCard index 0 cannot be "
                "detached.",
            )
        with self.lock:
            pending = self.state.detaching.get(eni.id)
            if pending is not None and pending.attachment_id == attachment_id:
                pending.force = pending.force or force
                return xml_reply(_detach_ok())
        before = self._snapshot(call, eni.id)
        with self.lock:
            self.state.attaching.pop(eni.id, None)
        if self.state.detach_seconds > 0:
            pending = PendingDetach(
                eni.id,
                attachment_id,
                eni.instance.id,
                int(eni.device_index or 0),
                call.account(),
                call.region,
                time.monotonic() + self.state.detach_seconds,
                force,
            )
            with self.lock:
                self.state.detaching[eni.id] = pending
            self._changed(call, eni.id, before)
            self._log(
                call,
                "detaching",
                f"{eni.id} detaching from {pending.instance_id} for "
                f"{self.state.detach_seconds:g} s (force={force})",
            )
            return xml_reply(_detach_ok())
        instance_id, index = eni.instance.id, int(eni.device_index or 0)
        reply = self._moto(call)
        if reply.status.startswith("200"):
            self._changed(call, eni.id, before)
            if force:
                self._block(call.account(), call.region, instance_id, index, eni.id, call)
        return reply

    def _ec2_StopInstances(self, call: Call, backend: Any) -> Reply:  # noqa: N802
        reply = self._moto(call)
        if reply.status.startswith("200"):
            # A stop hands the instance to new hardware state: the forced detach's leftovers go
            # (the API reference's "without first stopping and starting the instance").
            ids = {v for k, v in call.params.items() if k.startswith("InstanceId.")}
            with self.lock:
                for key in [k for k in self.state.blocked if k[2] in ids]:
                    eni = self.state.blocked.pop(key)
                    self._log(call, "unblocked", f"{key[2]} index {key[3]} (was {eni})")
        return reply

    def _ec2_CreateRoute(self, call: Call, backend: Any) -> Reply:  # noqa: N802
        p = call.params
        destination = p.get("DestinationCidrBlock")
        table = _find(backend.get_route_table, p.get("RouteTableId", ""))
        if destination and table is not None:
            try:
                wanted = ipaddress.IPv4Network(destination, strict=False)
            except ValueError:
                return self._moto(call)  # moto's InvalidDestinationCIDRBlock
            for route in table.routes:
                cidr = route.destination_cidr_block
                if cidr and ipaddress.IPv4Network(cidr, strict=False) == wanted:
                    # A destination identifies a route: EC2 refuses a second one, whatever its
                    # target (moto 5.2 checks only non-interface targets and otherwise overwrites).
                    # Seen as https://github.com/clouddrove/terraform-aws-vpc-peering/issues/10;
                    # the local route counts too.
                    return self._refuse(
                        call,
                        "RouteAlreadyExists",
                        f"The route identified by {destination} already exists.",
                    )
        return self._moto(call)

    def _ec2_StartInstances(self, call: Call, backend: Any) -> Reply:  # noqa: N802
        return self._moto(call)

    def _ec2_DescribeNetworkInterfaces(self, call: Call, backend: Any) -> Reply:  # noqa: N802
        return self._rewrite(call, self._moto(call), stale=True)

    def _ec2_DescribeInstances(self, call: Call, backend: Any) -> Reply:  # noqa: N802
        return self._rewrite(call, self._moto(call), stale=False)

    # -- attachment states ------------------------------------------------------------------------

    def _settle(self) -> None:
        """Finish the detaches whose time has come (lazily: at the next request, any caller)."""
        now = time.monotonic()
        with self.lock:
            due = [d for d in self.state.detaching.values() if d.due <= now]
        if not due:
            return
        with self.ec2_lock:
            for d in due:
                with self.lock:
                    if self.state.detaching.get(d.eni_id) is not d:
                        continue
                    del self.state.detaching[d.eni_id]
                try:
                    backend = self._backend(d.account, d.region)
                    eni = backend.get_network_interface(d.eni_id)
                    if eni.attachment_id != d.attachment_id:
                        continue
                    backend.detach_network_interface(d.attachment_id)
                except Exception as exc:  # noqa: BLE001 - reset or deleted under us: nothing to do
                    self._log_raw("DetachNetworkInterface", "detach-lost", "", f"{d}: {exc}")
                    continue
                self._log_raw(
                    "DetachNetworkInterface",
                    "detached",
                    "",
                    f"{d.eni_id} detached from {d.instance_id} (force={d.force})",
                )
                if d.force:
                    self._block(d.account, d.region, d.instance_id, d.device_index, d.eni_id, None)

    def _block(
        self,
        account: str,
        region: str,
        instance_id: str,
        index: int,
        eni_id: str,
        call: Call | None,
    ) -> None:
        with self.lock:
            self.state.blocked[(account, region, instance_id, index)] = eni_id
        self._log_raw(
            "DetachNetworkInterface",
            "index-blocked",
            call.access_key if call else "",
            f"{instance_id} device index {index} unusable until stop/start (forced {eni_id})",
        )

    def _status(self, eni_id: str, attachment_id: str | None) -> str | None:
        now = time.monotonic()
        with self.lock:
            pending = self.state.detaching.get(eni_id)
            if pending is not None and pending.attachment_id == attachment_id:
                return "detaching"
            attaching = self.state.attaching.get(eni_id)
            if attaching is not None:
                if attaching[0] == attachment_id and attaching[1] > now:
                    return "attaching"
                if attaching[1] <= now:
                    del self.state.attaching[eni_id]
        return None

    def _snapshot(self, call: Call, eni_id: str) -> bytes | None:
        """The interface as DescribeNetworkInterfaces serves it now (for stale reads later)."""
        if self.state.stale_reads <= 0:
            return None
        body = f"Action=DescribeNetworkInterfaces&Version=2016-11-15&NetworkInterfaceId.1={eni_id}"
        environ = dict(call.environ)
        environ["wsgi.input"] = io.BytesIO(body.encode())
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["CONTENT_TYPE"] = "application/x-www-form-urlencoded; charset=utf-8"
        reply = self._call_app(environ)
        if not reply.status.startswith("200"):
            return None
        root = ET.fromstring(reply.body)  # noqa: S314 - moto's reply, in this process
        for item in _interface_items(root):
            if _text(item, "networkInterfaceId") == eni_id:
                self._mark(item)
                return ET.tostring(item)
        return None

    def _changed(self, call: Call, eni_id: str, before: bytes | None) -> None:
        if before is None or self.state.stale_reads <= 0:
            return
        with self.lock:
            self.state.stale[eni_id] = Stale(before, self.state.stale_reads)

    def _mark(self, item: ET.Element) -> None:
        """Show attaching/detaching on an interface item whose attachment is in between."""
        eni_id = _text(item, "networkInterfaceId")
        attachment = item.find(_q("attachment"))
        if eni_id is None or attachment is None:
            return
        status = self._status(eni_id, _text(attachment, "attachmentId"))
        node = attachment.find(_q("status"))
        if status is not None and node is not None:
            node.text = status

    def _rewrite(self, call: Call, reply: Reply, *, stale: bool) -> Reply:
        if not reply.status.startswith("200"):
            return reply
        with self.lock:
            busy = bool(self.state.attaching or self.state.detaching or self.state.stale)
        if not busy:
            return reply
        root = ET.fromstring(reply.body)  # noqa: S314 - moto's reply, in this process
        for parent in root.iter(_q("networkInterfaceSet")):
            for position, item in enumerate(list(parent)):
                eni_id = _text(item, "networkInterfaceId")
                old = None
                if stale and eni_id:
                    with self.lock:
                        entry = self.state.stale.get(eni_id)
                        if entry is not None:
                            entry.left -= 1
                            old = entry.item
                            if entry.left <= 0:
                                del self.state.stale[eni_id]
                if old is not None:
                    parent.remove(item)
                    parent.insert(position, ET.fromstring(old))  # noqa: S314 - our own copy
                    self._log(call, "stale-read", f"{eni_id}: the view from before its change")
                else:
                    self._mark(item)
        body = b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root)
        return Reply(reply.status, _with_length(reply.headers, body), body)

    # -- calling moto, refusing, answering -------------------------------------------------------

    def _moto(self, call: Call) -> Reply:
        call.environ["wsgi.input"] = io.BytesIO(call.body)
        call.environ["CONTENT_LENGTH"] = str(len(call.body))
        return self._call_app(call.environ)

    def _call_app(self, environ: dict[str, Any]) -> Reply:
        seen: dict[str, Any] = {}

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            seen["status"], seen["headers"] = status, list(headers)
            return lambda data: None

        result = self.app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return Reply(seen.get("status", "500 INTERNAL SERVER ERROR"), seen.get("headers", []), body)

    def _refuse(self, call: Call, code: str, message: str, detail: str = "") -> Reply:
        self._log(call, code, message + detail)
        return ec2_error(code, message)

    @staticmethod
    def _send(start_response: Callable[..., Any], reply: Reply) -> list[bytes]:
        start_response(reply.status, _with_length(reply.headers, reply.body))
        return [reply.body]

    # -- the record -------------------------------------------------------------------------------

    def _log(self, call: Call, code: str, detail: str) -> None:
        self._log_raw(call.action, code, call.access_key, detail)

    def _log_raw(self, action: str, code: str, access_key: str, detail: str) -> None:
        with self.lock:
            self.state.log.append(
                {
                    "at": time.time(),
                    "action": action,
                    "code": code,
                    "access_key": access_key,
                    "detail": detail,
                }
            )

    # -- control ----------------------------------------------------------------------------------

    def reset(self) -> None:
        with self.lock:
            self.state = StrictState()

    def configure(
        self,
        attach_seconds: float | None = None,
        detach_seconds: float | None = None,
        stale_reads: int | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            if attach_seconds is not None:
                self.state.attach_seconds = max(0.0, float(attach_seconds))
            if detach_seconds is not None:
                self.state.detach_seconds = max(0.0, float(detach_seconds))
            if stale_reads is not None:
                self.state.stale_reads = max(0, int(stale_reads))
            return self.state.config()

    def slow(
        self,
        access_key: str,
        seconds: float,
        duration: float,
        services: Iterable[str] = ("ec2", "dynamodb"),
    ) -> dict[str, Any]:
        with self.lock:
            self.state.slows.append(
                Slow(
                    access_key, float(seconds), time.monotonic() + float(duration), tuple(services)
                )
            )
            return self.state.config()

    def throttle(self, action: str, count: int, access_key: str | None = None) -> dict[str, Any]:
        with self.lock:
            self.state.throttles.append(Throttle(action, int(count), access_key))
            return self.state.config()

    def blocked(self) -> list[dict[str, Any]]:
        with self.lock:
            return [
                {"instance": k[2], "device_index": k[3], "eni": v, "region": k[1]}
                for k, v in self.state.blocked.items()
            ]

    def _control(
        self, environ: dict[str, Any], start_response: Callable[..., Any], name: str
    ) -> list[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
        try:
            args = json.loads(raw) if raw.strip() else {}
            result: Any
            if name == "configure":
                result = self.configure(**args)
            elif name == "slow":
                result = self.slow(**args)
            elif name == "throttle":
                result = self.throttle(**args)
            elif name == "reset":
                self.reset()
                result = {}
            elif name == "config":
                with self.lock:
                    result = self.state.config()
            elif name in ("log", "signals", "lifecycle_actions"):
                with self.lock:
                    result = list(getattr(self.state, name))
            elif name == "blocked":
                result = self.blocked()
            else:
                return self._send(start_response, _json_reply("404 NOT FOUND", {"error": name}))
        except (TypeError, ValueError) as exc:
            return self._send(start_response, _json_reply("400 BAD REQUEST", {"error": str(exc)}))
        return self._send(start_response, _json_reply("200 OK", result))


# -- replies ------------------------------------------------------------------------------------


def xml_reply(body: str, status: str = "200 OK") -> Reply:
    data = body.encode()
    return Reply(status, [("Content-Type", "text/xml")], data)


def ec2_error(code: str, message: str, status: str = "400 Bad Request") -> Reply:
    """EC2's error document (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html)."""
    return xml_reply(
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{_esc(code)}</Code><Message>{_esc(message)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>",
        status,
    )


def query_error(code: str, message: str, status: str = "400 Bad Request") -> Reply:
    """The query protocol's error document (Auto Scaling, CloudFormation, …)."""
    return xml_reply(
        "<ErrorResponse><Error><Type>Sender</Type>"
        f"<Code>{_esc(code)}</Code><Message>{_esc(message)}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>",
        status,
    )


def throttle_reply(call: Call) -> Reply:
    """A throttling error in the caller's protocol, with the code botocore retries."""
    if call.service == "ec2":
        # RequestLimitExceeded: https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html
        # (HTTP 503, https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html).
        return ec2_error(
            "RequestLimitExceeded", "Request limit exceeded.", "503 Service Unavailable"
        )
    if call.json_protocol:
        if call.service == "dynamodb":
            if call.action in DYNAMODB_DATA:
                code = "ProvisionedThroughputExceededException"
                message = (
                    "The level of configured provisioned throughput for the table was exceeded. "
                    "Consider increasing your provisioning level with the UpdateTable API."
                )
            else:
                code, message = (
                    "ThrottlingException",
                    "Rate of requests exceeds the allowed throughput.",
                )
            kind = f"com.amazonaws.dynamodb.v20120810#{code}"
        else:
            code, message, kind = "ThrottlingException", "Rate exceeded", "ThrottlingException"
        body = json.dumps({"__type": kind, "message": message}).encode()
        return Reply(
            "400 Bad Request",
            [
                ("Content-Type", "application/x-amz-json-1.0"),
                ("x-amzn-RequestId", str(uuid.uuid4())),
            ],
            body,
        )
    return query_error("Throttling", "Rate exceeded")


def _json_reply(status: str, value: Any) -> Reply:
    return Reply(status, [("Content-Type", "application/json")], json.dumps(value).encode())


def _detach_ok() -> str:
    return (
        f'<DetachNetworkInterfaceResponse xmlns="{EC2_NS}"><requestId>{uuid.uuid4()}</requestId>'
        "<return>true</return></DetachNetworkInterfaceResponse>"
    )


def _error_code(reply: Reply) -> str:
    found = re.search(rb"<Code>([^<]+)</Code>|\"__type\": \"(?:[^#\"]*#)?([^\"]+)\"", reply.body)
    if not found:
        return "error"
    return (found.group(1) or found.group(2)).decode()


def _with_length(headers: list[tuple[str, str]], body: bytes) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in headers if k.lower() != "content-length"]
    return [*kept, ("Content-Length", str(len(body)))]


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _text(node: ET.Element, tag: str) -> str | None:
    child = node.find(_q(tag))
    return child.text if child is not None else None


def _interface_items(root: ET.Element) -> list[ET.Element]:
    return [item for parent in root.iter(_q("networkInterfaceSet")) for item in parent]


def _find(getter: Callable[[str], Any], ident: str) -> Any:
    try:
        return getter(ident)
    except Exception:  # noqa: BLE001 - moto's NotFound: let moto answer it
        return None


# -- the client -----------------------------------------------------------------------------------


class StrictClient:
    """The control API from a test or the lab: ``StrictClient("http://127.0.0.1:PORT")``."""

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout

    def _call(self, name: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(  # noqa: S310 - the moto server's own URL
            f"{self.endpoint}{PREFIX}{name}",
            data=data,
            method="GET" if payload is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as reply:  # noqa: S310
            return json.loads(reply.read() or b"null")

    def configure(
        self,
        attach_seconds: float | None = None,
        detach_seconds: float | None = None,
        stale_reads: int | None = None,
    ) -> dict[str, Any]:
        """ENI attach/detach durations (seconds) and the stale reads after a change; None keeps."""
        args = {"attach_seconds": attach_seconds, "detach_seconds": detach_seconds}
        args["stale_reads"] = stale_reads
        return self._call("configure", {k: v for k, v in args.items() if v is not None})

    def slow(
        self,
        access_key: str,
        seconds: float,
        duration: float,
        services: Iterable[str] = ("ec2", "dynamodb"),
    ) -> dict[str, Any]:
        """Delay every call of ``services`` signed with ``access_key`` by ``seconds``, for the
        next ``duration`` seconds."""
        payload = {"access_key": access_key, "seconds": seconds, "duration": duration}
        payload["services"] = list(services)
        return self._call("slow", payload)

    def throttle(self, action: str, count: int, access_key: str | None = None) -> dict[str, Any]:
        """The next ``count`` calls of ``action`` (of ``access_key``, or anyone's) are throttled."""
        return self._call("throttle", {"action": action, "count": count, "access_key": access_key})

    def reset(self) -> None:
        self._call("reset", {})

    def config(self) -> dict[str, Any]:
        return self._call("config")

    def log(self) -> list[dict[str, Any]]:
        return self._call("log")

    def signals(self) -> list[dict[str, Any]]:
        return self._call("signals")

    def lifecycle_actions(self) -> list[dict[str, Any]]:
        return self._call("lifecycle_actions")

    def blocked(self) -> list[dict[str, Any]]:
        return self._call("blocked")
