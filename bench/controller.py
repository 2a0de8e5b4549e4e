"""Part 3: what the controller costs — one enrolment, and a burst of N launches.

The real Lambda handler (``tunnelnat.handlers.controller.handler``) runs in-process against moto's
server on loopback, fed the EventBridge events through SQS-shaped batches of ``batch_size``
messages (the stack's event source uses 10), one invocation after the other. Commands go through
``BenchFleet``: each one is really sent with the production ``SsmCommands`` adapter to moto's SSM
(SendCommand + GetCommandInvocation, so they are counted), and its effect is then applied the way
the documents do (tests/lambdas' fake fleet does the same): routes in memory, and for
SyncNatTable the gateway program's own reader pulls the table from DynamoDB.

Every AWS API call the controller makes is counted with botocore's ``before-call`` hook on the
session the controller is built from (``before-send`` counts HTTP attempts, retries included).
The gateway's own DynamoDB reads are counted apart: they are the gateway's, not the Lambda's.

No SSM latency is simulated by default (``ssm_latency``): wall times are the controller's own
cost plus moto's; every command the controller waits for adds a real SSM round trip in AWS.

Reusable: ``ControllerBench(...).one_enrolment()`` / ``.burst(n)`` work with whatever the
handler does today (inline syncs, batch convergence, coalescing) and report what it issued.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.common import REPO

REGION = "us-east-1"
TABLE = "tunnelnat-bench"
DEPLOYMENT = "bench"
QUEUE_ARN = f"arn:aws:sqs:{REGION}:123456789012:tunnelnat-bench-events"
TAG = ("tunnelnat", "enabled")
VPC_CIDR = "10.10.0.0/16"
SUBNET_CIDR = "10.10.0.0/20"
GATEWAY_PRIMARY = "10.10.0.10"
GATEWAY_ENI = "10.10.0.5"
PARTNER = "192.0.2.0/24"
# Documentation ranges only: 203.0.113.0/24 first, then 198.51.100.0/24.
POOL = [f"203.0.113.{k}" for k in range(1, 255)] + [f"198.51.100.{k}" for k in range(1, 255)]
MAX_BURST = len(POOL)


def default_config(quick: bool = False, burst: int = 20) -> dict:
    return {"burst": burst, "batch_size": 10, "ssm_latency": 0.0, "max_passes": 20}


def controller_config() -> dict:
    return {
        "partner_endpoint": "198.51.100.254",
        "partner_networks": [PARTNER],
        "nat_mode": "dedicated",
        "address_pool": POOL,
        "enrolment_tag_key": TAG[0],
        "enrolment_tag_value": TAG[1],
        "gateway_private_ip": GATEWAY_ENI,
        "gateway_subnet_cidr": SUBNET_CIDR,
    }


def instance_ip(k: int) -> str:
    """k = 0.. : 10.10.1.0 upwards, inside the gateway's subnet."""
    base = (10 << 24) | (10 << 16) | (1 << 8)
    n = base + k + 20
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


# ------------------------------------------------------------------------------------------------


class CallCounter:
    """Counts API calls (``before-call``) and HTTP attempts (``before-send``) on a session."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.sends = 0
        self.lock = threading.Lock()

    def attach(self, session: Any) -> None:
        session.events.register("before-call", self._on_call, unique_id=f"bench-{id(self)}-c")
        session.events.register("before-send", self._on_send, unique_id=f"bench-{id(self)}-s")

    def _on_call(self, model: Any = None, **_kw: Any) -> None:
        name = f"{model.service_model.service_name}:{model.name}" if model else "unknown"
        with self.lock:
            self.calls[name] += 1

    def _on_send(self, **_kw: Any) -> None:
        with self.lock:
            self.sends += 1

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.sends = 0

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "total": sum(self.calls.values()),
                "http_requests": self.sends,
                "by_operation": dict(sorted(self.calls.items())),
            }


@dataclass
class BenchFleet:
    """The command port: real SsmCommands calls against moto, then the documents' effects."""

    ssm: Any  # tunnelnat.adapters.commands.SsmCommands, or None to skip SSM
    gateway_db: Any  # the gateway's own DynamoDB client (counted apart)
    gateway_id: str = ""
    ssm_latency: float = 0.0
    routes: dict[str, set[str]] = field(default_factory=dict)
    applied_generation: int = -1
    applied_pairs: set[tuple[str, str]] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, instance_id: str, document: str, parameters: Any) -> Any:
        from tunnelnat.adapters.commands import CommandResult

        if self.ssm is not None:
            sent = self.ssm.run(instance_id, document, dict(parameters))
            if not sent.ok:
                return sent
        if self.ssm_latency:
            time.sleep(self.ssm_latency)
        with self.lock:
            self.calls.append((instance_id, document))
            if document == "AddHostRoute":
                self.routes[instance_id] = set(parameters["Destinations"].split(","))
                return CommandResult(instance_id, document, "Success", stdout="{}")
            if document == "RemoveHostRoute":
                self.routes.pop(instance_id, None)
                return CommandResult(instance_id, document, "Success", stdout="{}")
            if document == "SyncNatTable":
                if instance_id != self.gateway_id:
                    return CommandResult(instance_id, document, "Failed", stderr="not the gateway")
                gw = _gateway_module()
                table = gw.read_desired(self.gateway_db, parameters["TableName"], "dedicated")
                full = parameters.get("Full") == "true"
                if full or table.generation > self.applied_generation:
                    self.applied_generation = table.generation
                    self.applied_pairs = {
                        (str(m.private_ip), str(m.public_ip)) for m in table.mappings
                    }
                report = {"applied_generation": self.applied_generation, "action": "updated"}
                return CommandResult(instance_id, document, "Success", stdout=json.dumps(report))
        return CommandResult(instance_id, document, "Failed", stderr=f"unknown {document}")

    def count(self, document: str) -> int:
        return sum(1 for _, d in self.calls if d == document)


def _gateway_module() -> Any:
    gw_dir = str(REPO / "gateway")
    if gw_dir not in sys.path:
        sys.path.insert(0, gw_dir)
    import tunnelnat_gateway

    return tunnelnat_gateway


@dataclass
class Context:
    function_name: str = "tunnelnat-controller"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:123456789012:function:tunnelnat"
    aws_request_id: str = "bench"


def state_change(instance_id: str, state: str = "running") -> dict:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": REGION,
        "resources": [f"arn:aws:ec2:{REGION}:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "state": state},
    }


def sqs_batch(bodies: list[dict], receive_count: int = 1) -> dict:
    return {
        "Records": [
            {
                "messageId": f"m-{i}",
                "receiptHandle": f"r-{i}",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": str(receive_count)},
                "messageAttributes": {},
                "md5OfBody": "x",
                "eventSource": "aws:sqs",
                "eventSourceARN": QUEUE_ARN,
                "awsRegion": REGION,
            }
            for i, body in enumerate(bodies)
        ]
    }


ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",  # moto's dummy credentials
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "POWERTOOLS_TRACE_DISABLED": "1",
    "POWERTOOLS_LOG_LEVEL": "WARNING",
    "POWERTOOLS_METRICS_NAMESPACE": "tunnelnat",
    "POWERTOOLS_SERVICE_NAME": "tunnelnat",
    "TUNNELNAT_TABLE_NAME": TABLE,
    "TUNNELNAT_DEPLOYMENT": DEPLOYMENT,
    "TUNNELNAT_DOCUMENT_PREFIX": "tunnelnat-",
}


class ControllerBench:
    """``with ControllerBench() as cb: cb.one_enrolment(); cb.burst(200)``."""

    def __init__(self, *, batch_size: int = 10, ssm_latency: float = 0.0, use_ssm: bool = True,
                 max_passes: int = 20) -> None:  # fmt: skip
        self.batch_size = batch_size
        self.ssm_latency = ssm_latency
        self.use_ssm = use_ssm
        self.max_passes = max_passes
        self._server: Any = None
        self._saved_env: dict[str, str | None] = {}
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> ControllerBench:
        from tools.moto_server import SerialMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = SerialMotoServer()
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        env = {**ENV, "AWS_ENDPOINT_URL": self.url,
               "TUNNELNAT_CONFIG": json.dumps(controller_config())}  # fmt: skip
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            from tunnelnat.handlers import controller as handler_module

            handler_module.use_controller(None)
        except Exception:  # noqa: BLE001, S110 - best effort on the way out
            pass
        if self._server is not None:
            self._server.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # -- a fresh AWS world ----------------------------------------------------------------------
    def _client(self, service: str) -> Any:
        import boto3

        return boto3.session.Session().client(service, region_name=REGION, endpoint_url=self.url)

    def _world(self) -> dict:
        import boto3

        from tunnelnat.adapters.autoscaling import AutoScalingLifecycle
        from tunnelnat.adapters.commands import DOCUMENTS, SsmCommands
        from tunnelnat.handlers import controller as handler_module
        from tunnelnat.settings import ControllerSettings

        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request).read()  # noqa: S310 - moto on loopback
        ec2, db, ssm = self._client("ec2"), self._client("dynamodb"), self._client("ssm")
        db.create_table(
            TableName=TABLE,
            KeySchema=[
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        for name in DOCUMENTS:
            path = REPO / "ssm_documents" / f"{name}.yaml"
            if path.exists():
                ssm.create_document(Content=path.read_text(), Name=f"tunnelnat-{name}",
                                    DocumentType="Command", DocumentFormat="YAML")  # fmt: skip
        vpc = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=SUBNET_CIDR)["Subnet"]["SubnetId"]
        gateway = self._launch(ec2, subnet, GATEWAY_PRIMARY, {
            "tunnelnat:role": "gateway", "tunnelnat:deployment": DEPLOYMENT})  # fmt: skip
        session = boto3.session.Session(region_name=REGION)
        counter = CallCounter()
        counter.attach(session)
        gateway_session = boto3.session.Session(region_name=REGION)
        gateway_counter = CallCounter()
        gateway_counter.attach(gateway_session)
        ssm_port = None
        if self.use_ssm:
            from tunnelnat.handlers.controller import AWS_CONFIG

            ssm_port = SsmCommands(session.client("ssm", config=AWS_CONFIG),
                                   document_prefix="tunnelnat-", poll_seconds=0.05)  # fmt: skip
        fleet = BenchFleet(ssm_port, gateway_session.client("dynamodb"), gateway,
                           ssm_latency=self.ssm_latency)  # fmt: skip
        settings = ControllerSettings.from_environ()
        controller = handler_module.build_controller(settings, commands=fleet, session=session)
        lifecycle = AutoScalingLifecycle(session.client("autoscaling"))
        handler_module.use_controller(controller, lifecycle=lifecycle)
        return {"ec2": ec2, "db": db, "subnet": subnet, "gateway": gateway, "fleet": fleet,
                "counter": counter, "gateway_counter": gateway_counter}  # fmt: skip

    @staticmethod
    def _launch(ec2: Any, subnet: str, ip: str, tags: dict[str, str]) -> str:
        reply = ec2.run_instances(
            ImageId="ami-12345678", MinCount=1, MaxCount=1, SubnetId=subnet,
            PrivateIpAddress=ip, TagSpecifications=[{"ResourceType": "instance",
            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        )  # fmt: skip
        return reply["Instances"][0]["InstanceId"]

    def _state(self, db: Any, ids: list[str]) -> dict:
        def query(pk: str) -> dict[str, dict]:
            items: dict[str, dict] = {}
            kwargs: dict = {"TableName": TABLE, "KeyConditionExpression": "pk = :pk",
                            "ExpressionAttributeValues": {":pk": {"S": pk}},
                            "ConsistentRead": True}  # fmt: skip
            while True:
                reply = db.query(**kwargs)
                items.update({i["sk"]["S"]: i for i in reply["Items"]})
                if "LastEvaluatedKey" not in reply:
                    return items
                kwargs["ExclusiveStartKey"] = reply["LastEvaluatedKey"]

        records = query("instance")
        meta = query("meta")
        desired = int(meta.get("generation", {}).get("generation", {}).get("N", "0"))
        applied = int(meta.get("gateway", {}).get("applied_generation", {}).get("N", "-1"))
        enrolled = [i for i in ids if records.get(i, {}).get("status", {}).get("S") == "enrolled"]
        return {"enrolled": len(enrolled), "desired_generation": desired,
                "applied_generation": applied}  # fmt: skip

    # -- the measurements -----------------------------------------------------------------------
    def burst(self, n: int) -> dict:
        """Launch ``n`` tagged instances, deliver their 'running' events in SQS batches, one
        invocation at a time, redelivering failed messages, until converged."""
        from tunnelnat.handlers.controller import handler

        if not 1 <= n <= MAX_BURST:
            raise ValueError(f"burst must be 1..{MAX_BURST} (the documentation-range pool)")
        w = self._world()
        ids = [self._launch(w["ec2"], w["subnet"], instance_ip(k), dict([TAG])) for k in range(n)]
        w["counter"].reset()
        w["gateway_counter"].reset()
        pending = [state_change(i) for i in ids]
        passes, invocations, failures = 0, 0, 0
        sink = io.StringIO()
        started = time.perf_counter()
        while pending and passes < self.max_passes:
            passes += 1
            retry = []
            for k in range(0, len(pending), self.batch_size):
                bodies = pending[k : k + self.batch_size]
                with contextlib.redirect_stdout(sink):  # Powertools' EMF metrics lines
                    reply = handler(sqs_batch(bodies, passes), Context())
                invocations += 1
                for item in reply.get("batchItemFailures", []):
                    retry.append(bodies[int(item["itemIdentifier"].split("-")[1])])
            failures += len(retry)
            pending = retry
        wall = time.perf_counter() - started
        state = self._state(w["db"], ids)
        fleet: BenchFleet = w["fleet"]
        converged = (
            not pending
            and state["enrolled"] == n
            and state["applied_generation"] >= state["desired_generation"]
            and len(fleet.applied_pairs) == n
        )
        api = w["counter"].snapshot()
        gateway_api = w["gateway_counter"].snapshot()
        return {
            "instances": n,
            "batch_size": self.batch_size,
            "invocations": invocations,
            "passes": passes,
            "redelivered_messages": failures,
            "wall_seconds": wall,
            "converged": converged,
            "state": state,
            "gateway_syncs": fleet.count("SyncNatTable"),
            "commands": dict(Counter(d for _, d in fleet.calls)),
            "api_calls": api,
            "api_calls_per_enrolment": api["total"] / n,
            "gateway_api_calls": gateway_api,
            "ssm_latency_simulated": self.ssm_latency,
        }

    def one_enrolment(self) -> dict:
        return self.burst(1)


def run(config: dict) -> dict:
    with ControllerBench(batch_size=config["batch_size"], ssm_latency=config["ssm_latency"],
                         max_passes=config["max_passes"]) as cb:  # fmt: skip
        one = cb.one_enrolment()
        sys.stderr.write(
            f"  [controller] one enrolment: {one['wall_seconds']:.3f}s, "
            f"{one['api_calls']['total']} API calls, {one['gateway_syncs']} sync(s)\n"
        )
        burst = cb.burst(config["burst"])
        sys.stderr.write(
            f"  [controller] burst of {config['burst']}: {burst['wall_seconds']:.2f}s, "
            f"{burst['gateway_syncs']} syncs, {burst['api_calls_per_enrolment']:.1f} API "
            f"calls/enrolment, converged={burst['converged']}\n"
        )
    return {"config": config, "one": one, "burst": burst}
