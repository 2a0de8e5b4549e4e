"""The pair agent (gateway/tunnelnat_gateway/pair.py) against moto with the strict fakes
(tools/aws_strict.py around tools/moto_server.SerialMotoServer): the real Agent, Takeover and
Heart, boto3 clients with one access key per gateway (the strict fakes tell callers apart by
it), heartbeats over real UDP on 127.0.0.2 and 127.0.0.3. ``ip`` is a mirror of EC2 (the
ENI's link is on the gateway moto attached it to), swanctl/nft are fakes, the ping is a seam.

Each test names the defect of issue 20 it would have caught on b08b1c8's agent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from tools.aws_strict import StrictClient
from tools.moto_server import SerialMotoServer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import boot as boot  # noqa: E402
from tunnelnat_gateway import pair as pair  # noqa: E402

REGION = "eu-west-1"
TABLE = "tunnelnat-pair"
GROUP = "tunnelnat-pair-gateways"
KEY = b"k" * 40
KEYS = {"a": "AKIATNGW1AAAAAAAAAAA", "b": "AKIATNGW2AAAAAAAAAAA"}
ADDRESS = {"a": "127.0.0.2", "b": "127.0.0.3"}
FAST = Config(retries={"mode": "standard", "max_attempts": 2}, read_timeout=10)


@pytest.fixture(scope="module")
def server():
    moto = SerialMotoServer()
    moto.start()
    yield moto
    moto.stop()


def client(url: str, service: str, key: str = "AKIATESTPAIRWORLD000"):
    return boto3.client(
        service,
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key="secret",
        config=FAST,
    )


@pytest.fixture
def world(server, tmp_path, monkeypatch):
    """Two gateways of one Auto Scaling group (moto tags them aws:autoscaling:groupName), G's
    ENI attached to A at device index 1, the table with meta/generation 5."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    url = server.url
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))
    ec2 = client(url, "ec2")
    vpc = ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.10.1.0/24")["Subnet"]["SubnetId"]
    ec2.create_launch_template(
        LaunchTemplateName="tunnelnat-gateway",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"},
    )
    client(url, "autoscaling").create_auto_scaling_group(
        AutoScalingGroupName=GROUP,
        LaunchTemplate={"LaunchTemplateName": "tunnelnat-gateway"},
        MinSize=2,
        MaxSize=2,
        DesiredCapacity=2,
        VPCZoneIdentifier=subnet,
    )
    found = ec2.describe_instances(Filters=[{"Name": f"tag:{pair.GROUP_TAG}", "Values": [GROUP]}])[
        "Reservations"
    ]
    a, b = sorted(i["InstanceId"] for r in found for i in r["Instances"])
    eni = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress="10.10.1.20")
    eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=a, DeviceIndex=1)
    dynamodb = client(url, "dynamodb")
    dynamodb.create_table(
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
    dynamodb.put_item(
        TableName=TABLE,
        Item={"pk": {"S": "meta"}, "sk": {"S": "generation"}, "generation": {"N": "5"}},
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {
        "url": url,
        "strict": StrictClient(url),
        "ec2": ec2,
        "dynamodb": dynamodb,
        "autoscaling": client(url, "autoscaling"),
        "eni": eni_id,
        "mac": eni["NetworkInterface"]["MacAddress"].lower(),
        "ids": {"a": a, "b": b},
        "port": port,
        "tmp": tmp_path,
    }


def holder(world) -> str | None:
    """EC2's truth, read from moto's backend (no stale read consumed, no slow caller)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    eni = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].enis[world["eni"]]
    return eni.instance.id if eni.instance is not None else None


class MirrorIp:
    """``ip`` on a gateway whose NIC list follows EC2 (the hypervisor's hot-plug): the ENI's
    link is here while moto has it attached here."""

    def __init__(self, world, who: str):
        self.world, self.who = world, who

    def __call__(self, argv):
        argv = list(argv)
        if argv[:3] == ["-j", "link", "show"]:
            links = [{"ifname": "ens5", "address": "02:00:00:00:00:01"}]
            if holder(self.world) == self.world["ids"][self.who]:
                links.append({"ifname": "ens6", "address": self.world["mac"]})
            return json.dumps(links)
        return ""


def gateway_state(argv, **_kw):
    """swanctl and nft of a synced gateway: the tunnel loaded, generation 5, one SA."""
    if argv[:2] == ["swanctl", "--list-conns"]:
        return subprocess.CompletedProcess(argv, 0, "partner: IKEv2, no reauthentication\n", "")
    if argv[:2] == ["nft", "-j"]:
        answer = {"nftables": [{"set": {"name": "applied_generation", "elem": [5]}}]}
        return subprocess.CompletedProcess(argv, 0, json.dumps(answer), "")
    return subprocess.CompletedProcess(argv, 0, "", "")


def make_agent(world, who: str, *, pinger=lambda a: False, imds=lambda p: None, **config):
    other = "b" if who == "a" else "a"
    home = world["tmp"] / who
    cfg = pair.PairConfig.from_json(
        {
            "region": REGION,
            "eni_id": world["eni"],
            "gateway": "10.10.1.20/24",
            "deployment": "tunnelnat-pair",
            "table": TABLE,
            "tunnel": "partner",
            "heartbeat_port": world["port"],
            "interval_seconds": 0.1,
            "misses": 4,
            "hold_down_seconds": 0,
            "startup_grace_seconds": 0,
            "check_seconds": 30,
            "peer_address": ADDRESS[other],  # the hearts talk over loopback
            "role_file": str(home / "pair-role"),
            "key_file": str(home / "pair.key"),
            **config,
        }
    )
    url, key = world["url"], KEYS[who]
    ec2 = client(url, "ec2", key)
    records = pair.Records(cfg, client(url, "dynamodb", key), client(url, "cloudwatch", key), None)
    heart = pair.Heart(world["ids"][who], KEY, world["port"], 0.1, bind=ADDRESS[who])
    heart.open()
    agent = pair.Agent(
        cfg,
        world["ids"][who],
        ec2,
        records,
        links=boot.Links(MirrorIp(world, who)),
        run_cmd=gateway_state,
        sleep=lambda s: time.sleep(min(s, 0.05)),
        heart=heart,
        autoscaling=client(url, "autoscaling", key),
        cloudformation=client(url, "cloudformation", key),
        pinger=pinger,
        imds=imds,
    )
    return agent


@pytest.fixture
def agents():
    started: list[pair.Agent] = []
    yield started
    for agent in started:
        agent.heart.stop()


def start(agents, agent: pair.Agent, **kw) -> pair.Agent:
    agent.start(**kw)
    agents.append(agent)
    return agent


def run_steps(agent: pair.Agent, seconds: float, stop: threading.Event | None = None) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (stop and stop.is_set()):
        agent.step()
        time.sleep(agent.config.interval_seconds)


def events(text: str, name: str) -> list[dict]:
    found = []
    for line in text.splitlines():
        prefix = f"tunnelnat-pair: {name} "
        if line.startswith(prefix):
            found.append(json.loads(line[len(prefix) :]))
    return found


def wait_heard(agent: pair.Agent, instance: str, seconds: float = 3.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        agent.step()
        if instance in agent.machine.beats:
            return
        time.sleep(0.05)
    raise AssertionError(f"{agent.instance_id} never heard {instance}")


# -- defect 2: a slow AWS call, a restart, discovery failing --------------------------------


def test_every_ec2_and_dynamodb_call_of_the_active_3s_slow_is_no_failover(world, agents):
    """Issue 20, defect 2: each EC2/DynamoDB call of the active delayed 3 s (StrictClient.slow
    on its access key) while its loop checks the ENI and writes its readiness; the standby,
    hearing the active's heart, never takes over. b08b1c8's one-thread agent fell silent."""
    a = start(agents, make_agent(world, "a"))
    b = start(agents, make_agent(world, "b"))
    assert (a.machine.role, b.machine.role) == (pair.ACTIVE, pair.STANDBY)
    wait_heard(b, world["ids"]["a"])
    world["strict"].slow(KEYS["a"], 3.0, 8.0, services=("ec2", "dynamodb"))
    a.machine.next_check = 0.0  # DescribeNetworkInterfaces due now
    a.machine.next_report = 0.0  # PutItem due now
    taken = []
    b.take_over = taken.append
    stop = threading.Event()
    loop = threading.Thread(target=run_steps, args=(a, 7.0, stop))
    loop.start()
    try:
        run_steps(b, 6.5)
    finally:
        stop.set()
        loop.join(timeout=20)
    slowed = [e for e in world["strict"].log() if e.get("access_key") == KEYS["a"]]
    assert slowed, "the active's calls were not slowed"
    assert taken == [] and holder(world) == world["ids"]["a"]
    assert b.heart.stats()["gap_max"] < 0.4  # never 4 intervals without the active's beat


def test_an_agent_restarted_on_the_active_beats_before_ec2_answers(world, agents):
    """Issue 20, defect 2: the restarted active's EC2 calls take 3 s each; its heartbeat says
    active from the start (the MAC cached by the previous run, its link here) and the standby
    never takes over."""
    first = make_agent(world, "a")
    first.start()
    first.heart.stop()  # the agent stops (systemd restarts it)
    b = start(agents, make_agent(world, "b"))
    taken = []
    b.take_over = taken.append
    world["strict"].slow(KEYS["a"], 3.0, 2.0, services=("ec2", "dynamodb"))
    restarted = start(agents, make_agent(world, "a"), confirm=False)
    assert restarted.machine.role == pair.ACTIVE  # before any AWS call
    stop = threading.Event()
    loop = threading.Thread(target=run_steps, args=(restarted, 5.0, stop))
    loop.start()
    try:
        run_steps(b, 4.0)
    finally:
        stop.set()
        loop.join(timeout=20)
    assert b.machine.active_instance == world["ids"]["a"] and taken == []
    assert restarted.confirmed  # EC2 answered in the end, and agreed


def test_the_standby_hears_the_active_while_describe_instances_is_throttled(world, agents):
    """Issue 20, defect 2: DescribeInstances throttled for the standby (no discovery ever):
    authenticated heartbeats are still heard; b08b1c8's standby took the ENI after 12 s."""
    world["strict"].throttle("DescribeInstances", 100, access_key=KEYS["b"])
    a = start(agents, make_agent(world, "a"))
    b = start(agents, make_agent(world, "b"))
    taken = []
    b.take_over = taken.append
    threading.Thread(target=run_steps, args=(a, 2.0)).start()
    run_steps(b, 2.0)
    assert b.members is None  # discovery never succeeded
    assert b.machine.active_instance == world["ids"]["a"] and taken == []


def test_a_forged_heartbeat_and_a_non_member_are_not_heard(world, agents):
    """Issue 20, defect 6: a host of the subnet sends "active" heartbeats for the dead active:
    without the key (forged) or as an instance outside the group. Neither is heard."""
    b = start(agents, make_agent(world, "b"))
    assert b.members is not None and set(b.members) == set(world["ids"].values())
    a_id = world["ids"]["a"]
    forged = pair.Heartbeat(a_id, pair.ACTIVE, 1, 5, 1, time.time(), 1).encode(b"guess" * 8)
    stranger = pair.Heartbeat("i-0123456789abcdef0", pair.ACTIVE, 1, 5, 1, time.time(), 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.bind(("127.0.0.4", 0))
        sender.sendto(forged, (ADDRESS["b"], world["port"]))
        sender.sendto(stranger.encode(KEY), (ADDRESS["b"], world["port"]))
    time.sleep(0.3)
    b.step()
    stats = b.heart.stats()
    assert (stats["auth_failures"], stats["strangers"]) == (1, 1)
    assert b.machine.active_heard_at is None


# -- defect 4 (fenced) and the second opinion -------------------------------------------------


def test_a_forced_takeover_fences_the_old_active_which_marks_itself_unhealthy(world, agents):
    """Issue 20, defect 4: the old active, its ENI force-detached, marks itself Unhealthy
    (Auto Scaling replaces it). The strict fakes then refuse device index 1 on it; when it
    must take G all the same, it attaches at index 2."""
    a = start(agents, make_agent(world, "a"))
    b = start(agents, make_agent(world, "b"))  # A's agent is frozen: B hears nothing
    b.take_over(pair.TakeOver("test: silent", 2.0))
    assert holder(world) == world["ids"]["b"] and b.machine.role == pair.ACTIVE
    assert [x["instance"] for x in world["strict"].blocked()] == [world["ids"]["a"]]
    a.step()  # thawed: its link is gone
    assert a.machine.role == pair.STANDBY and a.machine.fenced
    health = world["autoscaling"].describe_auto_scaling_instances(InstanceIds=[world["ids"]["a"]])[
        "AutoScalingInstances"
    ][0]["HealthStatus"]
    assert health.upper() == "UNHEALTHY"
    item = world["dynamodb"].get_item(
        TableName=TABLE, Key={"pk": {"S": "gateway"}, "sk": {"S": world["ids"]["a"]}}
    )["Item"]
    assert item["fenced"] == {"BOOL": True} and item["heartbeat_version"] == {"N": "2"}
    # Before Auto Scaling replaces it, B dies: A takes G back, at the next free index.
    a.take_over(pair.TakeOver("test: b silent", 2.0))
    assert holder(world) == world["ids"]["a"] and a.machine.role == pair.ACTIVE
    refused = [e for e in world["strict"].log() if e.get("code") == "InvalidParameterValue"]
    assert refused, world["strict"].log()


def test_the_second_opinion_keeps_g_on_a_holder_that_answers_pings(world, agents):
    """Issue 20, defect 2: the active's agent is silent but the instance runs and answers
    ICMP: no force-detach (b08b1c8 forced it at once)."""
    start(agents, make_agent(world, "a"))
    pinged = []
    b = start(agents, make_agent(world, "b", pinger=lambda a: pinged.append(a) or True))
    b.take_over(pair.TakeOver("test: silent", 2.0))
    assert len(pinged) == 1 and b.machine.role == pair.STANDBY
    assert holder(world) == world["ids"]["a"]
    assert not [e for e in world["strict"].log() if "Detach" in str(e.get("action"))]


# -- planned handover, lifecycle, ready signal --------------------------------------------------


def handover_world(world, agents, **a_config):
    world["strict"].configure(attach_seconds=0.3, detach_seconds=0.5)
    a = start(agents, make_agent(world, "a", **a_config.pop("a_kw", {}), **a_config))
    b = start(agents, make_agent(world, "b"))
    for agent in (a, b):
        agent.next_status = 0.0
    wait_heard(b, world["ids"]["a"])
    wait_heard(a, world["ids"]["b"])
    b.step()
    time.sleep(0.3)  # B's heartbeat with its ready status reaches A
    return a, b


def test_a_switchover_request_hands_g_over_without_force(world, agents, capsys):
    a, b = handover_world(world, agents)
    request = a.config.switchover_file
    request.write_text("operator: kernel update\n")
    a.step()  # the request: handover, acknowledged by B's heart, detach without Force
    assert a.machine.role == pair.STANDBY and not a.machine.fenced
    b.step()  # B takes it: waits for available (0.5 s), attaches (0.3 s), G up
    assert b.machine.role == pair.ACTIVE and holder(world) == world["ids"]["b"]
    result = json.loads(request.with_name("switchover.result").read_text())
    assert result["outcome"] == "done" and result["to"] == world["ids"]["b"]
    assert not request.exists()
    assert world["strict"].blocked() == []  # no Force: A's device index stays usable
    err = capsys.readouterr().err
    (sent,) = events(err, "handover_sent")
    (taken,) = events(err, "handover")
    assert sent["to"] == world["ids"]["b"] and taken["previous"] == world["ids"]["a"]
    assert 0.4 <= taken["detached_seconds"] <= taken["attach_seconds"] <= taken["switch_seconds"]
    meta = world["dynamodb"].get_item(
        TableName=TABLE, Key={"pk": {"S": "meta"}, "sk": {"S": "pair"}}
    )["Item"]
    assert meta["switchovers"] == {"N": "1"} and meta["active"] == {"S": world["ids"]["b"]}
    assert meta["last_switchover"]["M"]["from"] == {"S": world["ids"]["a"]}
    assert "failovers" not in meta  # a switchover is not a failover
    # Afterwards: A is a healthy standby hearing B; no takeover back.
    run_steps(a, 1.0)
    assert a.machine.role == pair.STANDBY and holder(world) == world["ids"]["b"]


def test_terminating_the_active_hands_over_then_continues_the_lifecycle(world, agents):
    states = {"value": None}
    a, b = handover_world(
        world,
        agents,
        a_kw={"imds": lambda path: states["value"]},
        lifecycle_hook="tunnelnat-pair-gateway-terminating",
    )
    a.step()
    assert world["strict"].lifecycle_actions() == []
    states["value"] = "Terminated"
    a.next_lifecycle = 0.0
    a.step()
    assert a.machine.role == pair.STANDBY
    b.step()
    assert holder(world) == world["ids"]["b"]
    (action,) = world["strict"].lifecycle_actions()
    assert action["hook"] == "tunnelnat-pair-gateway-terminating"
    assert (action["group"], action["instance"]) == (GROUP, world["ids"]["a"])
    assert action["result"] == "CONTINUE" and action["access_key"] == KEYS["a"]


def test_the_standby_signals_cloudformation_once_when_ready(world, agents):
    b = start(
        agents,
        make_agent(world, "b", signal_stack="tunnelnat", signal_resource="GatewayGroup1A2B"),
    )
    b.step()
    b.next_signal = 0.0
    b.step()
    signals = world["strict"].signals()
    assert len(signals) == 1
    assert signals[0]["unique_id"] == world["ids"]["b"] and signals[0]["status"] == "SUCCESS"
    assert signals[0]["stack"] == "tunnelnat"
    assert signals[0]["logical_resource_id"] == "GatewayGroup1A2B"
    b.next_signal = 0.0
    b.step()
    assert len(world["strict"].signals()) == 1


# -- the daemon as systemd runs it ---------------------------------------------------------------


class Imds:
    """IMDSv2 on loopback: a token, then the instance ID."""

    def __init__(self, instance_id: str):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802
                self._answer(b"token")

            def do_GET(self):  # noqa: N802
                if self.path == "/latest/meta-data/instance-id":
                    self._answer(instance_id.encode())
                else:
                    self.send_response(404)
                    self.end_headers()

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_the_run_command_beats_as_active_and_confirms_with_ec2(world, agents):
    """``tunnelnat-gateway.pyz pair run`` in a process of its own, as the unit runs it (the key
    cached, moto behind AWS_ENDPOINT_URL): its heartbeats are heard by the other gateway's
    heart, it writes its role and its readiness."""
    home = world["tmp"] / "daemon"
    home.mkdir()
    (home / "pair.key").write_bytes(KEY + b"\n")
    config = home / "pair.json"
    config.write_text(
        json.dumps(
            {
                "region": REGION,
                "eni_id": world["eni"],
                "gateway": "10.10.1.20/24",
                "deployment": "tunnelnat-pair",
                "table": TABLE,
                "tunnel": "partner",
                "heartbeat_port": world["port"],
                "interval_seconds": 0.1,
                "peer_address": ADDRESS["b"],
                "role_file": str(home / "pair-role"),
                "key_file": str(home / "pair.key"),
            }
        )
    )
    # ``ip`` of a gateway where the ENI's link is (the boot put G on it); no swanctl, no nft.
    bin_dir = home / "bin"
    bin_dir.mkdir()
    links = json.dumps([{"ifname": "ens6", "address": world["mac"]}])
    (bin_dir / "ip").write_text(f"#!/bin/sh\n[ \"$1\" = -j ] && echo '{links}'\nexit 0\n")
    (bin_dir / "ip").chmod(0o755)
    imds = Imds(world["ids"]["a"])
    listener = pair.Heart(world["ids"]["b"], KEY, world["port"], 0.1, bind=ADDRESS["b"])
    listener.start()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "AWS_ENDPOINT_URL": world["url"],
        "AWS_ACCESS_KEY_ID": KEYS["a"],
        "AWS_SECRET_ACCESS_KEY": "secret",
        "TUNNELNAT_IMDS_URL": imds.url,
    }
    # The package's ``pair`` verb from the archive the stack ships, as the unit runs it.
    from tools.gateway_package import build

    package = build(home / "package")
    program = package.path
    proc = subprocess.Popen(
        [sys.executable, str(program), "pair", "run", "--config", str(config)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        heard: list = []
        while time.monotonic() < deadline:
            heard += listener.drain()
            if any(b.role == pair.ACTIVE for b, _ in heard) and (home / "pair-role").exists():
                if (home / "pair-role").read_text() == "active\n":
                    break
            time.sleep(0.1)
        assert any(b.role == pair.ACTIVE and b.instance == world["ids"]["a"] for b, _ in heard)
        item = None
        while time.monotonic() < deadline and item is None:
            item = (
                world["dynamodb"]
                .get_item(
                    TableName=TABLE, Key={"pk": {"S": "gateway"}, "sk": {"S": world["ids"]["a"]}}
                )
                .get("Item")
            )
            time.sleep(0.2)
        assert item is not None and item["role"] == {"S": "active"}
        assert item["heartbeat_version"] == {"N": "2"}
        # Which package it runs (issue 22); no /tunnelnat/<d>/gateway-software here: unknown.
        software = item["software"]["M"]
        assert software["sha256"] == {"S": package.sha256}
        assert software["version"] == {"S": package.version}
        assert software["deployed"] == {"NULL": True}
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        listener.stop()
        imds.server.shutdown()
    assert "active (provisional)" in err or "standby (provisional)" in err, err


def test_the_standby_loop_wakes_at_once_for_a_handover(world, agents):
    """The handover is acted upon when the heart hears it, not at the loop's next round: the
    ENI is detached from the old active by then (every ms of it is lost traffic)."""
    a, b = handover_world(world, agents)
    b.config = b.config.__class__(**{**b.config.__dict__, "interval_seconds": 4.0})
    loop = threading.Thread(target=b.run_forever, kwargs={"rounds": 2})
    loop.start()
    time.sleep(0.2)  # B's loop is waiting for its next round, 4 s away
    a.config.switchover_file.write_text("test\n")
    started = time.monotonic()
    a.step()
    while holder(world) != world["ids"]["b"] and time.monotonic() - started < 5:
        time.sleep(0.02)
    took = time.monotonic() - started
    loop.join(timeout=10)
    assert holder(world) == world["ids"]["b"]
    assert took < 2.5, took  # 0.5 s detach + 0.3 s attach, not the 4 s round
