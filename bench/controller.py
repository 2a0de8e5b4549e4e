"""Part 3: what the controller costs — one enrolment, and a burst of N launches.

The real Lambda handler (``tunnelnat.handlers.controller.handler``) runs against moto's server on
loopback, fed the EventBridge events through SQS-shaped batches of ``batch_size`` messages (the
stack's event source uses 10). One enrolment: one invocation, in-process. A burst: ``workers``
processes, each a Lambda execution environment of its own (module state, clients, counters),
take the batches concurrently the way SQS's event source invokes several at once; what a pass
leaves failed is delivered again in the next pass (the queue's redelivery). Commands go through
``BenchFleet``: each one is really sent with the production ``SsmCommands`` adapter to moto's SSM
(SendCommand + GetCommandInvocation, so they are counted), and its effect is then applied the way
the documents do (tests/lambdas' fake fleet does the same): routes in memory, and for
SyncNatTable the gateway's own reader, imported from the built archive, pulls the table from
DynamoDB.

Every AWS API call the controller makes is counted with botocore's ``before-call`` hook on the
session the controller is built from (``before-send`` counts HTTP attempts, retries included).
The gateway's own DynamoDB reads are counted apart: they are the gateway's, not the Lambda's.

``ssm_latency`` seconds are added to every command (one SendCommand, however many instances):
what an SSM round trip costs in AWS and what makes syncs overlap, so that coalescing (one sync in
flight, the others' changes riding on it) shows in the burst's count of gateway syncs.

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
from dataclasses import dataclass
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
PARTNER_ENDPOINT = "198.51.100.254"
# Documentation ranges only: 203.0.113.0/24 first, then 198.51.100.0/24 up to T (not an S).
POOL = [f"203.0.113.{k}" for k in range(1, 255)] + [f"198.51.100.{k}" for k in range(1, 254)]
MAX_BURST = len(POOL)


def default_config(quick: bool = False, burst: int | list[int] = 20) -> dict:
    # 5 concurrent invocations: what SQS's event source starts a burst with; 1 s per command:
    # a short SSM Run Command's round trip.
    bursts = [burst] if isinstance(burst, int) else list(burst)
    return {"burst": bursts[0], "bursts": bursts, "batch_size": 10, "ssm_latency": 1.0,
            "max_passes": 20, "workers": 5}  # fmt: skip


def controller_config() -> dict:
    return {
        "partner_endpoint": PARTNER_ENDPOINT,
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
    """The command port: real SsmCommands calls against moto, then the documents' effects.

    ``state`` holds what the commands did (routes, the gateway's applied table, the calls): plain
    objects in-process, or a multiprocessing Manager's proxies shared by the burst's workers."""

    ssm: Any  # tunnelnat.adapters.commands.SsmCommands, or None to skip SSM
    gateway_db: Any  # the gateway's own DynamoDB client (counted apart)
    gateway_id: str = ""
    ssm_latency: float = 0.0
    state: Any = None

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = local_state()

    @property
    def routes(self) -> Any:
        return self.state["routes"]

    @property
    def calls(self) -> list[tuple[str, str]]:
        return list(self.state["calls"])

    @property
    def applied_pairs(self) -> set[tuple[str, str]]:
        return {tuple(p) for p in self.state["gateway"].get("pairs", [])}

    def run(self, instance_id: str, document: str, parameters: Any) -> Any:
        if self.ssm is not None:
            sent = self.ssm.run(instance_id, document, dict(parameters))
            if not sent.ok:
                return sent
        if self.ssm_latency:
            time.sleep(self.ssm_latency)
        return self._effect(instance_id, document, parameters)

    def run_many(self, instance_ids: Any, document: str, parameters: Any) -> dict:
        """One command for many instances (the production adapter's run_many against moto)."""
        sent = self.ssm.run_many(list(instance_ids), document, dict(parameters)) if self.ssm else {}
        if self.ssm_latency:
            time.sleep(self.ssm_latency)
        out = {}
        for instance_id in instance_ids:
            reply = sent.get(instance_id)
            if reply is not None and (isinstance(reply, Exception) or not reply.ok):
                out[instance_id] = reply
            else:
                out[instance_id] = self._effect(instance_id, document, parameters)
        return out

    def _effect(self, instance_id: str, document: str, parameters: Any) -> Any:
        from tunnelnat.adapters.commands import CommandResult

        self.state["calls"].append((instance_id, document))
        if document == "AddHostRoute":
            self.state["routes"][instance_id] = parameters["Destinations"]
            return CommandResult(instance_id, document, "Success", stdout="{}")
        if document == "RemoveHostRoute":
            self.state["routes"].pop(instance_id, None)
            return CommandResult(instance_id, document, "Success", stdout="{}")
        if document == "SyncNatTable":
            if instance_id != self.gateway_id:
                return CommandResult(instance_id, document, "Failed", stderr="not the gateway")
            # The real gateway serialises syncs with a flock; so does this one.
            with self.state["lock"]:
                gw = _gateway_module()
                table = gw.read_desired(self.gateway_db, parameters["TableName"], "dedicated")
                full = parameters.get("Full") == "true"
                applied = self.state["gateway"].get("generation", -1)
                if full or table.generation > applied:
                    self.state["gateway"].update(generation=table.generation,
                                                 pairs=[list(r) for r in table.rows])  # fmt: skip
                    applied = table.generation
            report = {"applied_generation": applied, "action": "updated"}
            return CommandResult(instance_id, document, "Success", stdout=json.dumps(report))
        return CommandResult(instance_id, document, "Failed", stderr=f"unknown {document}")

    def count(self, document: str) -> int:
        return sum(1 for _, d in self.calls if d == document)


def local_state() -> dict:
    return {"routes": {}, "calls": [], "gateway": {}, "lock": threading.Lock()}


def shared_state(manager: Any) -> dict:
    return {"routes": manager.dict(), "calls": manager.list(), "gateway": manager.dict(),
            "lock": manager.Lock()}  # fmt: skip


def _gateway_module() -> Any:
    """The gateway's reader (``nat_sync``) imported from the archive the stack ships
    (tools.gateway_package.build()), not from the source tree: what is benched is what ships."""
    loaded = sys.modules.get("tunnelnat_gateway.nat_sync")
    if loaded is None:
        from tools.gateway_package import build

        archive = str(build().path)
        if "tunnelnat_gateway" in sys.modules:
            raise RuntimeError("tunnelnat_gateway was imported from elsewhere before the archive")
        # Last on the path: ``tunnelnat`` stays the Lambda's (the archive carries only its pure
        # core, the same files); ``tunnelnat_gateway`` is nowhere else (checked below).
        sys.path.append(archive)
        import tunnelnat_gateway.nat_sync as loaded

        if not str(loaded.__file__).startswith(archive):
            raise RuntimeError(f"nat_sync came from {loaded.__file__}, not {archive}")
    return loaded


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
    # Events that wait for another worker's sync are sent back to the queue; the bench's passes
    # stand in for the queue's timing, so they come back at once.
    "TUNNELNAT_SYNC_PENDING_DELAY": "0",
}


class ControllerBench:
    """``with ControllerBench() as cb: cb.one_enrolment(); cb.burst(200)``."""

    def __init__(self, *, batch_size: int = 10, ssm_latency: float = 0.0, use_ssm: bool = True,
                 max_passes: int = 20, workers: int = 1) -> None:  # fmt: skip
        self.batch_size = batch_size
        self.ssm_latency = ssm_latency
        self.workers = workers
        self.use_ssm = use_ssm
        self.max_passes = max_passes
        self._server: Any = None
        self._saved_env: dict[str, str | None] = {}
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> ControllerBench:
        from tools.gateway_package import build
        from tools.moto_server import SerialMotoServer

        build()  # once, before the workers: theirs then find the same bytes and write nothing
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
            handler_module.use_queue(None)
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

    def _sent_back(self) -> list[dict]:
        """Events the handler sent to the queue again (waits for another worker's sync)."""
        sqs = self._client("sqs")
        url = sqs.get_queue_url(QueueName=QUEUE_ARN.rsplit(":", 1)[-1])["QueueUrl"]
        events: list[dict] = []
        while True:
            messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
            if not messages:
                return events
            for message in messages:
                events.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    def _world(self) -> dict:
        from tunnelnat.adapters.commands import DOCUMENTS

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
        self._client("sqs").create_queue(QueueName=QUEUE_ARN.rsplit(":", 1)[-1])
        for name in DOCUMENTS:
            path = REPO / "ssm_documents" / f"{name}.yaml"
            if path.exists():
                ssm.create_document(Content=path.read_text(), Name=f"tunnelnat-{name}",
                                    DocumentType="Command", DocumentFormat="YAML")  # fmt: skip
        vpc = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=SUBNET_CIDR)["Subnet"]["SubnetId"]
        gateway = self._launch(ec2, subnet, GATEWAY_PRIMARY, {
            "tunnelnat:role": "gateway", "tunnelnat:deployment": DEPLOYMENT})  # fmt: skip
        # The controller syncs the instance holding G (its ENI), as the stack's gateway does.
        eni = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress=GATEWAY_ENI)
        ec2.attach_network_interface(NetworkInterfaceId=eni["NetworkInterface"][
            "NetworkInterfaceId"], InstanceId=gateway, DeviceIndex=1)  # fmt: skip
        wiring = wire_handler(gateway, ssm_latency=self.ssm_latency, use_ssm=self.use_ssm)
        return {"ec2": ec2, "db": db, "subnet": subnet, "gateway": gateway, **wiring}

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
    def burst(self, n: int, *, workers: int | None = None) -> dict:
        """Launch ``n`` tagged instances and deliver their 'running' events in SQS batches, by
        ``workers`` concurrent invocations (1: in-process, one after the other), delivering
        failed messages again, pass after pass, until converged."""
        if not 1 <= n <= MAX_BURST:
            raise ValueError(f"burst must be 1..{MAX_BURST} (the documentation-range pool)")
        workers = self.workers if workers is None else workers
        w = self._world()
        ids = [self._launch(w["ec2"], w["subnet"], instance_ip(k), dict([TAG])) for k in range(n)]
        pending = [state_change(i) for i in ids]
        if workers <= 1:
            run = self._deliver_inprocess(w, pending)
            fleet: BenchFleet = w["fleet"]
            api, gateway_api = run.pop("api"), run.pop("gateway_api")
            calls, pairs = fleet.calls, fleet.applied_pairs
        else:
            run = self._deliver_concurrently(w, pending, workers)
            api, gateway_api = run.pop("api"), run.pop("gateway_api")
            calls, pairs = run.pop("calls"), run.pop("pairs")
        state = self._state(w["db"], ids)
        converged = (
            not run["left"]
            and state["enrolled"] == n
            and state["applied_generation"] >= state["desired_generation"]
            and len(pairs) == n
        )
        commands = Counter(d for _, d in calls)
        return {
            "instances": n,
            "batch_size": self.batch_size,
            "workers": workers,
            "invocations": run["invocations"],
            "passes": run["passes"],
            "redelivered_messages": run["failures"],
            "wall_seconds": run["wall"],
            "converged": converged,
            "state": state,
            "gateway_syncs": commands.get("SyncNatTable", 0),
            "commands": dict(commands),
            "api_calls": api,
            "api_calls_per_enrolment": api["total"] / n,
            "gateway_api_calls": gateway_api,
            "ssm_latency_simulated": self.ssm_latency,
        }

    def _deliver_inprocess(self, w: dict, pending: list[dict]) -> dict:
        from tunnelnat.handlers.controller import handler

        w["counter"].reset()
        w["gateway_counter"].reset()
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
            pending = retry + self._sent_back()
        return {"passes": passes, "invocations": invocations, "failures": failures,
                "wall": time.perf_counter() - started, "left": len(pending),
                "api": w["counter"].snapshot(),
                "gateway_api": w["gateway_counter"].snapshot()}  # fmt: skip

    def _deliver_concurrently(self, w: dict, pending: list[dict], workers: int) -> dict:
        import multiprocessing
        from multiprocessing.managers import SyncManager

        ctx = multiprocessing.get_context("spawn")
        # On loopback TCP, not a Unix socket: the tests allow loopback sockets only.
        with SyncManager(address=("127.0.0.1", 0), ctx=ctx) as manager:
            state = shared_state(manager)
            tasks, done = ctx.Queue(), ctx.Queue()
            procs = [
                ctx.Process(target=_worker, args=(w["gateway"], self.ssm_latency, self.use_ssm,
                                                  state, tasks, done), daemon=True)
                for _ in range(workers)
            ]  # fmt: skip
            for proc in procs:
                proc.start()
            try:
                for _ in procs:  # each worker has imported the handler and wired it
                    _expect(done.get(timeout=120), "ready")
                passes, invocations, failures = 0, 0, 0
                started = time.perf_counter()
                while pending and passes < self.max_passes:
                    passes += 1
                    batches = [pending[k : k + self.batch_size]
                               for k in range(0, len(pending), self.batch_size)]  # fmt: skip
                    for bodies in batches:
                        tasks.put((bodies, passes))
                    retry = []
                    for _ in batches:
                        reply = _expect(done.get(timeout=600), "batch")
                        invocations += 1
                        retry.extend(reply["retry"])
                    failures += len(retry)
                    pending = retry + self._sent_back()
                wall = time.perf_counter() - started
                for _ in procs:
                    tasks.put(None)
                api: Counter[str] = Counter()
                gateway_api: Counter[str] = Counter()
                sends = gateway_sends = 0
                for _ in procs:
                    reply = _expect(done.get(timeout=120), "counters")
                    api.update(reply["api"]["by_operation"])
                    gateway_api.update(reply["gateway_api"]["by_operation"])
                    sends += reply["api"]["http_requests"]
                    gateway_sends += reply["gateway_api"]["http_requests"]
                calls = list(state["calls"])
                pairs = {tuple(p) for p in state["gateway"].get("pairs", [])}
            finally:
                for proc in procs:
                    proc.join(timeout=30)
                    if proc.is_alive():
                        proc.kill()
        return {
            "passes": passes, "invocations": invocations, "failures": failures, "wall": wall,
            "left": len(pending), "calls": calls, "pairs": pairs,
            "api": {"total": sum(api.values()), "http_requests": sends,
                    "by_operation": dict(sorted(api.items()))},
            "gateway_api": {"total": sum(gateway_api.values()), "http_requests": gateway_sends,
                            "by_operation": dict(sorted(gateway_api.items()))},
        }  # fmt: skip

    def one_enrolment(self) -> dict:
        """One enrolment on a new deployment: nothing has recorded the gateway yet."""
        return self.burst(1, workers=1)

    def one_enrolment_running(self) -> dict:
        """One enrolment in a running deployment, the common case: a first instance enrolled
        (the table has recorded the gateway), then a second one alone in a cold execution
        environment (new clients, nothing in memory), counted on its own."""
        w = self._world()
        first = self._launch(w["ec2"], w["subnet"], instance_ip(0), dict([TAG]))
        warm = self._deliver_inprocess(w, [state_change(first)])
        if warm["left"]:
            raise RuntimeError("the first enrolment did not converge")
        w.update(wire_handler(w["gateway"], ssm_latency=self.ssm_latency, use_ssm=self.use_ssm))
        second = self._launch(w["ec2"], w["subnet"], instance_ip(1), dict([TAG]))
        run = self._deliver_inprocess(w, [state_change(second)])
        state = self._state(w["db"], [first, second])
        fleet: BenchFleet = w["fleet"]
        commands = Counter(d for _, d in fleet.calls)
        converged = (
            not run["left"]
            and state["enrolled"] == 2
            and state["applied_generation"] >= state["desired_generation"]
        )
        return {
            "instances": 1, "batch_size": self.batch_size, "workers": 1,
            "invocations": run["invocations"], "passes": run["passes"],
            "redelivered_messages": run["failures"], "wall_seconds": run["wall"],
            "converged": converged, "state": state,
            "gateway_syncs": commands.get("SyncNatTable", 0), "commands": dict(commands),
            "api_calls": run["api"], "api_calls_per_enrolment": run["api"]["total"],
            "gateway_api_calls": run["gateway_api"], "ssm_latency_simulated": self.ssm_latency,
        }  # fmt: skip


def run(config: dict) -> dict:
    with ControllerBench(batch_size=config["batch_size"], ssm_latency=config["ssm_latency"],
                         max_passes=config["max_passes"],
                         workers=config.get("workers", 1)) as cb:  # fmt: skip
        one = cb.one_enrolment()
        sys.stderr.write(
            f"  [controller] one enrolment: {one['wall_seconds']:.3f}s, "
            f"{one['api_calls']['total']} API calls, {one['gateway_syncs']} sync(s)\n"
        )
        running = cb.one_enrolment_running()
        sys.stderr.write(
            f"  [controller] one enrolment in a running deployment: "
            f"{running['wall_seconds']:.3f}s, {running['api_calls']['total']} API calls\n"
        )
        bursts = {}
        for n in config.get("bursts") or [config["burst"]]:
            burst = cb.burst(n)
            bursts[str(n)] = burst
            sys.stderr.write(
                f"  [controller] burst of {n} ({burst['workers']} concurrent invocations): "
                f"{burst['wall_seconds']:.2f}s, {burst['gateway_syncs']} syncs, "
                f"{burst['api_calls_per_enrolment']:.2f} API calls/enrolment, "
                f"converged={burst['converged']}\n"
            )
    first = bursts[str((config.get("bursts") or [config["burst"]])[0])]
    return {"config": config, "one": one, "one_running": running, "burst": first, "bursts": bursts}


def wire_handler(gateway: str, *, ssm_latency: float, use_ssm: bool, state: Any = None) -> dict:
    """Point the handler module (of this process) at moto through a counted session, with the
    bench fleet as its command port."""
    import boto3

    from tunnelnat.adapters.autoscaling import AutoScalingLifecycle
    from tunnelnat.adapters.commands import SsmCommands
    from tunnelnat.adapters.queue import EventQueue
    from tunnelnat.handlers import controller as handler_module
    from tunnelnat.settings import ControllerSettings

    session = boto3.session.Session(region_name=REGION)
    counter = CallCounter()
    counter.attach(session)
    gateway_session = boto3.session.Session(region_name=REGION)
    gateway_counter = CallCounter()
    gateway_counter.attach(gateway_session)
    ssm_port = None
    if use_ssm:
        ssm_port = SsmCommands(session.client("ssm", config=handler_module.AWS_CONFIG),
                               document_prefix="tunnelnat-", poll_seconds=0.05)  # fmt: skip
    fleet = BenchFleet(ssm_port, gateway_session.client("dynamodb"), gateway,
                       ssm_latency=ssm_latency, state=state)  # fmt: skip
    settings = ControllerSettings.from_environ()
    controller = handler_module.build_controller(settings, commands=fleet, session=session)
    lifecycle = AutoScalingLifecycle(session.client("autoscaling"))
    handler_module.use_controller(controller, lifecycle=lifecycle)
    # Retry delays (ChangeMessageVisibility) are the Lambda's calls too: counted.
    handler_module.use_queue(EventQueue(session.client("sqs", config=handler_module.AWS_CONFIG)))
    return {"fleet": fleet, "counter": counter, "gateway_counter": gateway_counter}


def _worker(gateway: str, ssm_latency: float, use_ssm: bool, state: Any, tasks: Any,
            done: Any) -> None:  # fmt: skip
    """One Lambda execution environment: handles batches until told to stop, then reports
    what it counted."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # The handler's JSON log lines (Powertools writes to the original stdout) are not the
    # benchmark's output.
    log_dir = os.environ.get("BENCH_WORKER_LOGS")  # a directory: keep them, one file a worker
    target = os.path.join(log_dir, f"worker-{os.getpid()}.log") if log_dir else os.devnull
    os.dup2(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 1)
    # A spawned process inherits the parent's sys.path, the gateway archive on it, but not its
    # imports: sys.path's finder would take ``tunnelnat`` from the archive (its pure core only)
    # before the editable install's finder. The Lambda's package first, then the archive back.
    archives = [p for p in sys.path if p.endswith(".pyz")]
    for path in archives:
        sys.path.remove(path)
    import tunnelnat.core.config  # noqa: F401

    sys.path.extend(archives)
    try:
        wiring = wire_handler(gateway, ssm_latency=ssm_latency, use_ssm=use_ssm, state=state)
        from tunnelnat.handlers.controller import handler

        wiring["counter"].reset()
        wiring["gateway_counter"].reset()
        done.put({"kind": "ready"})
        sink = io.StringIO()
        while True:
            task = tasks.get()
            if task is None:
                break
            bodies, attempt = task
            with contextlib.redirect_stdout(sink):  # Powertools' EMF metrics lines
                reply = handler(sqs_batch(bodies, attempt), Context())
            sink.seek(0)
            sink.truncate()
            retry = [bodies[int(i["itemIdentifier"].split("-")[1])]
                     for i in reply.get("batchItemFailures", [])]  # fmt: skip
            done.put({"kind": "batch", "retry": retry})
        done.put({"kind": "counters", "api": wiring["counter"].snapshot(),
                  "gateway_api": wiring["gateway_counter"].snapshot()})  # fmt: skip
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        done.put({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
        raise


def _expect(reply: dict, kind: str) -> dict:
    if reply.get("kind") != kind:
        raise RuntimeError(f"bench worker: expected {kind}, got {reply}")
    return reply
