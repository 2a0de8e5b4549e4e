"""The gateway's boot (tunnelnat_gateway/boot.py, the package's boot and restore verbs) against
moto's EC2 and Auto Scaling.

The ``ip`` calls go through ``Links``' runner, faked here (the lab runs the real ones in the
gateway's namespace); IMDSv2 is a small server on loopback that insists on the session token.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from tests.unit.imports import third_party_imports

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import boot as boot  # noqa: E402

MAC_PRIMARY = "02:00:00:00:00:01"


class FakeIp:
    """Records ``ip`` argv; knows the links (the primary, and the ENI's once attached)."""

    def __init__(self, macs: dict[str, str]) -> None:
        self.macs = dict(macs)  # ifname -> MAC
        self.calls: list[list[str]] = []

    def __call__(self, argv):
        argv = list(argv)
        if argv[:3] == ["-j", "link", "show"]:
            return json.dumps([{"ifname": n, "address": m} for n, m in self.macs.items()])
        self.calls.append(argv)
        return ""


@pytest.fixture
def aws(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        vpc = ec2.create_vpc(CidrBlock="10.80.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.80.0.0/24")["Subnet"]["SubnetId"]
        image = ec2.describe_images()["Images"][0]["ImageId"]
        asg = boto3.client("autoscaling", region_name="us-east-1")
        asg.create_launch_configuration(
            LaunchConfigurationName="gw", ImageId=image, InstanceType="t3.micro"
        )
        asg.create_auto_scaling_group(
            AutoScalingGroupName="gw",
            LaunchConfigurationName="gw",
            MinSize=1,
            MaxSize=1,
            VPCZoneIdentifier=subnet,
        )
        instance = asg.describe_auto_scaling_groups()["AutoScalingGroups"][0]["Instances"][0]
        eni = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress="10.80.0.10")
        yield {
            "ec2": ec2,
            "asg": asg,
            "subnet": subnet,
            "image": image,
            "instance": instance["InstanceId"],
            "eni": eni["NetworkInterface"]["NetworkInterfaceId"],
            "mac": eni["NetworkInterface"]["MacAddress"],
        }


def config(aws, **extra) -> boot.BootConfig:
    data = {
        "region": "us-east-1",
        "eni_id": aws["eni"] if aws else "eni-0123456789abcdef0",
        "gateway": "10.80.0.10/24",
        "partner_endpoint": "203.0.113.1",
        "subnet_router": "10.80.0.1",
        "poll_seconds": 0,
        **extra,
    }
    return boot.BootConfig.from_json(data)


def attachment(aws) -> dict:
    eni = aws["ec2"].describe_network_interfaces(NetworkInterfaceIds=[aws["eni"]])
    return eni["NetworkInterfaces"][0].get("Attachment") or {}


def primary_check(aws, instance: str | None = None) -> bool:
    """The SourceDestCheck of the instance's device-index-0 interface."""
    reply = aws["ec2"].describe_instances(InstanceIds=[instance or aws["instance"]])
    interfaces = reply["Reservations"][0]["Instances"][0]["NetworkInterfaces"]
    (primary,) = [n for n in interfaces if n["Attachment"]["DeviceIndex"] == 0]
    return primary["SourceDestCheck"]


def test_boot_attaches_the_eni_and_configures_g_itself(aws):
    ip = FakeIp({"ens5": MAC_PRIMARY, "ens6": aws["mac"]})
    result = boot.Boot(config(aws), aws["ec2"], aws["instance"], boot.Links(ip)).run()

    assert attachment(aws)["InstanceId"] == aws["instance"]
    assert attachment(aws)["DeviceIndex"] == 1
    assert primary_check(aws) is False
    assert ip.calls == [
        ["addr", "replace", "10.80.0.10/24", "dev", "ens6", "metric", "1000"],
        ["link", "set", "ens6", "up"],
        [
            "route",
            "replace",
            "203.0.113.1/32",
            "via",
            "10.80.0.1",
            "dev",
            "ens6",
            "src",
            "10.80.0.10",
        ],
    ]
    assert result["device"] == "ens6"
    assert result["partner_route"] == "203.0.113.1 via 10.80.0.1 dev ens6"


def test_a_reboot_keeps_the_attachment_and_configures_again(aws):
    aws["ec2"].attach_network_interface(
        NetworkInterfaceId=aws["eni"], InstanceId=aws["instance"], DeviceIndex=1
    )
    before = attachment(aws)["AttachmentId"]
    ip = FakeIp({"ens5": MAC_PRIMARY, "ens6": aws["mac"].upper()})  # MAC case does not matter
    boot.Boot(config(aws), aws["ec2"], aws["instance"], boot.Links(ip)).run()
    assert attachment(aws)["AttachmentId"] == before
    assert ["link", "set", "ens6", "up"] in ip.calls


def test_boot_waits_for_a_replaced_gateway_to_release_the_eni(aws):
    ec2 = aws["ec2"]
    old = ec2.run_instances(ImageId=aws["image"], MinCount=1, MaxCount=1, SubnetId=aws["subnet"])[
        "Instances"
    ][0]["InstanceId"]
    ec2.attach_network_interface(NetworkInterfaceId=aws["eni"], InstanceId=old, DeviceIndex=1)
    waits: list[float] = []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 3:  # the old gateway terminates: AWS detaches its ENI
            ec2.detach_network_interface(AttachmentId=attachment(aws)["AttachmentId"])

    ip = FakeIp({"ens5": MAC_PRIMARY, "ens6": aws["mac"]})
    cfg = config(aws, poll_seconds=5)
    boot.Boot(cfg, ec2, aws["instance"], boot.Links(ip), sleep=sleep).run()
    assert waits == [5, 5, 5]
    assert attachment(aws)["InstanceId"] == aws["instance"]


def test_a_failed_attach_is_retried(aws):
    class FlakyEc2:
        def __init__(self, real):
            self.real, self.attach_calls = real, 0

        def __getattr__(self, name):
            return getattr(self.real, name)

        def attach_network_interface(self, **kwargs):
            self.attach_calls += 1
            if self.attach_calls == 1:
                raise ClientError(
                    {"Error": {"Code": "RequestLimitExceeded", "Message": "slow down"}},
                    "AttachNetworkInterface",
                )
            return self.real.attach_network_interface(**kwargs)

    flaky = FlakyEc2(aws["ec2"])
    ip = FakeIp({"ens6": aws["mac"]})
    boot.Boot(config(aws), flaky, aws["instance"], boot.Links(ip), sleep=lambda s: None).run()
    assert flaky.attach_calls == 2
    assert attachment(aws)["InstanceId"] == aws["instance"]


def test_no_route_to_t_when_the_configuration_has_none(aws):
    ip = FakeIp({"eni0": aws["mac"]})
    cfg = config(aws, partner_endpoint=None, subnet_router=None)
    result = boot.Boot(cfg, aws["ec2"], aws["instance"], boot.Links(ip)).run()
    assert [c[0] for c in ip.calls] == ["addr", "link"]
    assert "partner_route" not in result


def record_tunnels(directory: Path, **endpoints: object) -> Path:
    """ConfigureTunnel's per-tunnel facts (NAME.json), each with the T its run recorded."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, endpoint in endpoints.items():
        facts = {"children": [name], "ike": "aes256-sha256-modp2048"}
        if endpoint is not None:
            facts["partner_endpoint"] = endpoint
        (directory / f"{name}.json").write_text(json.dumps(facts) + "\n")
    return directory


def route(t: str, dev: str = "ens6") -> list[str]:
    return ["route", "replace", f"{t}/32", "via", "10.80.0.1", "dev", dev, "src", "10.80.0.10"]


def test_boot_routes_every_recorded_partners_t_from_g(aws, tmp_path):
    """Several partners (issue 23): boot.json names the first T only (the launch template's user
    data must not change when a partner is added); every T ConfigureTunnel recorded is routed
    from G as the first is, each once. Records without a T (before issue 23), damaged ones and
    addresses no partner can have are skipped: a hand-edited file never reroutes IMDS."""
    tunnels = record_tunnels(
        tmp_path / "tunnels",
        card="203.0.113.1",  # the first partner's: boot.json's T, routed once
        bank="198.51.100.60",
        clearing="172.20.9.1",  # a private T outside G's subnet
        legacy=None,
        imds="169.254.169.254",
        inside="10.80.0.77",  # G's own subnet
        junk="198.51.100.999",
    )
    (tunnels / "damaged.json").write_text("{not json")
    (tunnels / "bank.charon").write_text('{"partner_endpoint": "192.0.2.9"}')  # not a .json
    ip = FakeIp({"ens5": MAC_PRIMARY, "ens6": aws["mac"]})
    result = boot.Boot(
        config(aws), aws["ec2"], aws["instance"], boot.Links(ip), tunnels_dir=tunnels
    ).run()
    assert [c for c in ip.calls if c[0] == "route"] == [
        route("203.0.113.1"),
        route("172.20.9.1"),
        route("198.51.100.60"),
    ]
    assert result["partner_route"] == "203.0.113.1 via 10.80.0.1 dev ens6"  # as before
    assert result["partner_routes"] == [
        "203.0.113.1 via 10.80.0.1 dev ens6",
        "172.20.9.1 via 10.80.0.1 dev ens6",
        "198.51.100.60 via 10.80.0.1 dev ens6",
    ]


def test_one_partner_recorded_is_the_boot_as_before(aws, tmp_path):
    """A single partner's record names boot.json's own T: one route, no partner_routes."""
    tunnels = record_tunnels(tmp_path / "tunnels", partner="203.0.113.1")
    ip = FakeIp({"ens6": aws["mac"]})
    result = boot.Boot(
        config(aws), aws["ec2"], aws["instance"], boot.Links(ip), tunnels_dir=tunnels
    ).run()
    assert [c for c in ip.calls if c[0] == "route"] == [route("203.0.113.1")]
    assert "partner_routes" not in result


def test_no_route_to_any_t_when_the_configuration_routes_none(aws, tmp_path):
    """The lab's boot.json has no T and no router (E sits on G's link): recorded Ts are not
    routed either."""
    tunnels = record_tunnels(tmp_path / "tunnels", bank="198.51.100.60")
    ip = FakeIp({"eni0": aws["mac"]})
    cfg = config(aws, partner_endpoint=None, subnet_router=None)
    boot.Boot(cfg, aws["ec2"], aws["instance"], boot.Links(ip), tunnels_dir=tunnels).run()
    assert [c[0] for c in ip.calls] == ["addr", "link"]


def test_a_standby_boot_routes_nothing(aws, tmp_path):
    """The pair's standby (the ENI held by the live active) has no G: no route to any T; the
    pair agent adds them when it takes G over."""
    ec2 = aws["ec2"]
    other = ec2.run_instances(ImageId=aws["image"], MinCount=1, MaxCount=1, SubnetId=aws["subnet"])[
        "Instances"
    ][0]["InstanceId"]
    ec2.attach_network_interface(NetworkInterfaceId=aws["eni"], InstanceId=other, DeviceIndex=1)
    tunnels = record_tunnels(tmp_path / "tunnels", bank="198.51.100.60")
    ip = FakeIp({"ens6": aws["mac"]})
    result = boot.Boot(
        config(aws, pair=True), ec2, aws["instance"], boot.Links(ip), tunnels_dir=tunnels
    ).run()
    assert result["role"] == "standby" and ip.calls == []


def test_main_routes_the_ts_recorded_in_the_gateways_tunnels_directory(
    aws, imds, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(
        boot, "TUNNELS_DIR", record_tunnels(tmp_path / "tunnels", bank="198.51.100.60")
    )
    ip = FakeIp({"ens5": MAC_PRIMARY, "ens6": aws["mac"]})
    code = boot.main(["attach", "--config", str(write_config(tmp_path, aws))], links=boot.Links(ip))
    assert code == 0
    assert json.loads(capsys.readouterr().out)["partner_routes"] == [
        "203.0.113.1 via 10.80.0.1 dev ens6",
        "198.51.100.60 via 10.80.0.1 dev ens6",
    ]


def test_an_interface_that_never_appears_fails_the_boot(aws):
    ticks = iter(range(1000))
    ip = FakeIp({"ens5": MAC_PRIMARY})
    b = boot.Boot(
        config(aws),
        aws["ec2"],
        aws["instance"],
        boot.Links(ip),
        sleep=lambda s: None,
        clock=lambda: float(next(ticks)),
    )
    with pytest.raises(boot.BootError, match="no interface has the ENI's MAC"):
        b.run()
    assert ip.calls == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eni_id": "eni-; rm -rf /"}, "invalid ENI ID"),
        ({"region": "us-east-1; x"}, "invalid region"),
        ({"gateway": "10.80.0.300/24"}, "invalid boot configuration"),
        ({"subnet_router": "10.99.0.1"}, "not in G's subnet"),
        ({"subnet_router": None}, "go together"),
    ],
)
def test_the_configuration_is_validated(change, message):
    with pytest.raises(boot.BootError, match=message):
        config(None, **change)


# -- main(): IMDSv2, the whole run, and failure marks the instance unhealthy ---------------------


class Imds(BaseHTTPRequestHandler):
    instance_id = ""
    token = "t0ken"  # noqa: S105 - IMDS's session token in a test

    def do_PUT(self):  # noqa: N802
        if self.path != "/latest/api/token" or not self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds"
        ):
            self.send_error(400)
            return
        self._reply(self.token)

    def do_GET(self):  # noqa: N802
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self.send_error(401)  # IMDSv2 only, as the launch template requires
            return
        if self.path != "/latest/meta-data/instance-id":
            self.send_error(404)
            return
        self._reply(self.instance_id)

    def _reply(self, body: str) -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def imds(aws, monkeypatch):
    handler = type("LabImds", (Imds,), {"instance_id": aws["instance"]})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TUNNELNAT_IMDS_URL", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    server.server_close()


def write_config(tmp_path, aws, **extra) -> Path:
    path = tmp_path / "boot.json"
    path.write_text(
        json.dumps(
            {
                "region": "us-east-1",
                "eni_id": aws["eni"],
                "gateway": "10.80.0.10/24",
                "partner_endpoint": "203.0.113.1",
                "subnet_router": "10.80.0.1",
                **extra,
            }
        )
    )
    return path


def health(aws) -> str:
    reply = aws["asg"].describe_auto_scaling_instances(InstanceIds=[aws["instance"]])
    # AWS answers HEALTHY/UNHEALTHY; moto echoes the case it was given.
    return reply["AutoScalingInstances"][0]["HealthStatus"].upper()


def test_main_boots_through_imdsv2(aws, imds, tmp_path, capsys):
    ip = FakeIp({"ens5": MAC_PRIMARY, "ens6": aws["mac"]})
    code = boot.main(["attach", "--config", str(write_config(tmp_path, aws))], links=boot.Links(ip))
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["instance"] == aws["instance"] and out["device"] == "ens6"
    assert attachment(aws)["InstanceId"] == aws["instance"]
    assert health(aws) == "HEALTHY"


def test_main_marks_the_instance_unhealthy_when_the_eni_stays_taken(aws, imds, tmp_path, capsys):
    ec2 = aws["ec2"]
    other = ec2.run_instances(ImageId=aws["image"], MinCount=1, MaxCount=1, SubnetId=aws["subnet"])[
        "Instances"
    ][0]["InstanceId"]
    ec2.attach_network_interface(NetworkInterfaceId=aws["eni"], InstanceId=other, DeviceIndex=1)
    ip = FakeIp({"ens6": aws["mac"]})
    path = write_config(tmp_path, aws, wait_seconds=0, poll_seconds=0)
    assert boot.main(["attach", "--config", str(path)], links=boot.Links(ip)) == 1
    assert "not attached after 0s" in capsys.readouterr().err
    assert health(aws) == "UNHEALTHY"
    assert attachment(aws)["InstanceId"] == other  # never taken from a gateway that holds it
    assert ip.calls == []


def test_restore_lo_validates_every_line(tmp_path, capsys):
    good = tmp_path / "lo-addresses"
    good.write_text("203.0.113.10\n\n203.0.113.100\n")
    ip = FakeIp({})
    assert boot.main(["restore-lo", "--file", str(good)], links=boot.Links(ip)) == 0
    assert ip.calls == [
        ["addr", "replace", "203.0.113.10/32", "dev", "lo"],
        ["addr", "replace", "203.0.113.100/32", "dev", "lo"],
    ]
    assert json.loads(capsys.readouterr().out) == {"lo": ["203.0.113.10", "203.0.113.100"]}

    bad = tmp_path / "bad"
    bad.write_text("203.0.113.10\n203.0.113.10 dev eth0\n")
    ip = FakeIp({})
    assert boot.main(["restore-lo", "--file", str(bad)], links=boot.Links(ip)) == 1
    assert ip.calls == [["addr", "replace", "203.0.113.10/32", "dev", "lo"]]

    ip = FakeIp({})
    missing = tmp_path / "none"
    assert boot.main(["restore-lo", "--file", str(missing)], links=boot.Links(ip)) == 0
    assert ip.calls == []

    probe = tmp_path / "probe-source"
    probe.write_text("203.0.113.100\n")  # also listed in lo-addresses: added once
    ip = FakeIp({})
    argv = ["restore-lo", "--file", str(good), "--file", str(probe)]
    assert boot.main(argv, links=boot.Links(ip)) == 0
    assert len(ip.calls) == 2


def test_the_program_uses_only_the_standard_library_and_boto3():
    assert third_party_imports(REPO / "gateway" / "tunnelnat_gateway" / "boot.py") == {
        "boto3",
        "botocore",
    }


def test_the_boot_sync_reads_the_table_configure_saved(tmp_path, monkeypatch):
    """The ``tunnelnat-sync`` unit syncs from the table and region ConfigureGateway saved in
    source.json (the package runs it: nothing is copied for the boot any more), refused when
    missing or not a table name and a region."""
    from tunnelnat_gateway import nat_sync as gateway

    monkeypatch.setattr(gateway, "STATE_DIR", tmp_path)
    monkeypatch.setattr(gateway, "SOURCE_FILE", tmp_path / "source.json")
    with pytest.raises(gateway.GatewayError, match="run ConfigureGateway first"):
        gateway.saved_source()
    (tmp_path / "source.json").write_text('{"table": "tunnelnat-lab", "region": "eu-west-1"}')
    assert gateway.saved_source() == ("tunnelnat-lab", "eu-west-1")
    (tmp_path / "source.json").write_text('{"table": "x; rm -rf /", "region": "eu-west-1"}')
    with pytest.raises(gateway.GatewayError, match="invalid table or region"):
        gateway.saved_source()


def test_the_units_run_the_package():
    """Every ExecStart but the guard's nft runs a verb of the package at the path
    install_package.py --current keeps (the user data installs it before any unit starts)."""
    from tunnelnat_gateway.__main__ import VERBS

    units = REPO / "gateway" / "systemd"
    execs = {
        unit.name: [
            line.split("=", 1)[1].split()
            for line in unit.read_text().splitlines()
            if line.startswith("ExecStart=")
        ]
        for unit in sorted(units.glob("*.service"))
    }
    package = "/etc/tunnelnat/lib/tunnelnat-gateway.pyz"
    assert execs == {
        "tunnelnat-boot.service": [["python3", package, "boot"]],
        "tunnelnat-pair.service": [["python3", package, "pair", "run"]],
        "tunnelnat-restore.service": [
            ["nft", "-f", "/etc/tunnelnat/tunnelnat.nft"],
            ["python3", package, "restore"],
        ],
        "tunnelnat-sync.service": [["python3", package, "sync"]],
    }
    assert {argv[2] for argvs in execs.values() for argv in argvs if argv[0] == "python3"} <= set(
        VERBS
    )
    # The boot's verbs are the boot program's own subcommands.
    assert VERBS["boot"][:3] == ("boot", "main", ("attach",))
    assert VERBS["restore"][:3] == ("boot", "main", ("restore-lo",))
    # The sync runs only once ConfigureGateway saved where the table is; the pair agent only in
    # pair mode; both only with the package there.
    sync = (units / "tunnelnat-sync.service").read_text()
    pair = (units / "tunnelnat-pair.service").read_text()
    for text, needs in ((sync, "/etc/tunnelnat/source.json"), (pair, "/etc/tunnelnat/pair.json")):
        assert f"ConditionPathExists={package}" in text and f"ConditionPathExists={needs}" in text


# -- pair mode: the ENI held by the other gateway makes this one the standby ---------------------


def other_instance(aws) -> str:
    reply = aws["ec2"].run_instances(
        ImageId=aws["image"], MinCount=1, MaxCount=1, SubnetId=aws["subnet"]
    )
    return reply["Instances"][0]["InstanceId"]


def test_pair_mode_boots_as_standby_when_the_other_gateway_holds_the_eni(aws):
    other = other_instance(aws)
    aws["ec2"].attach_network_interface(
        NetworkInterfaceId=aws["eni"], InstanceId=other, DeviceIndex=1
    )
    waits: list[float] = []
    ip = FakeIp({"ens5": MAC_PRIMARY})
    b = boot.Boot(config(aws, pair=True), aws["ec2"], aws["instance"], boot.Links(ip), waits.append)
    result = b.run()
    assert result["role"] == "standby" and result["holder"] == other
    assert waits == []  # no 600 s wait
    assert attachment(aws)["InstanceId"] == other  # never taken at boot
    assert ip.calls == []
    assert primary_check(aws) is False  # ready to forward after a takeover


@pytest.mark.parametrize("state", ["stopped", "running"])
def test_pair_mode_counts_a_stopped_holder_as_the_active(aws, state):
    other = other_instance(aws)
    aws["ec2"].attach_network_interface(
        NetworkInterfaceId=aws["eni"], InstanceId=other, DeviceIndex=1
    )
    if state == "stopped":  # a stopped instance keeps its ENIs: waiting would be forever
        aws["ec2"].stop_instances(InstanceIds=[other])
    result = boot.Boot(
        config(aws, pair=True), aws["ec2"], aws["instance"], boot.Links(FakeIp({}))
    ).run()
    assert result["role"] == "standby"


def test_pair_mode_attaches_an_available_eni_as_today(aws):
    ip = FakeIp({"ens6": aws["mac"]})
    result = boot.Boot(config(aws, pair=True), aws["ec2"], aws["instance"], boot.Links(ip)).run()
    assert result["role"] == "active"
    assert attachment(aws)["InstanceId"] == aws["instance"]


def test_pair_mode_waits_for_a_terminating_holder(aws):
    other = other_instance(aws)
    aws["ec2"].attach_network_interface(
        NetworkInterfaceId=aws["eni"], InstanceId=other, DeviceIndex=1
    )
    aws["ec2"].terminate_instances(InstanceIds=[other])  # moto keeps the attachment: AWS drops it
    waits: list[float] = []

    def sleep(seconds):
        waits.append(seconds)
        aws["ec2"].detach_network_interface(AttachmentId=attachment(aws)["AttachmentId"])

    ip = FakeIp({"ens6": aws["mac"]})
    cfg = config(aws, pair=True, poll_seconds=5)
    result = boot.Boot(cfg, aws["ec2"], aws["instance"], boot.Links(ip), sleep=sleep).run()
    assert waits == [5] and result["role"] == "active"


def test_pair_mode_main_prints_the_standby_role(aws, imds, tmp_path, capsys):
    other = other_instance(aws)
    aws["ec2"].attach_network_interface(
        NetworkInterfaceId=aws["eni"], InstanceId=other, DeviceIndex=1
    )
    path = write_config(tmp_path, aws, pair=True)
    assert boot.main(["attach", "--config", str(path)], links=boot.Links(FakeIp({}))) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["role"] == "standby" and out["holder"] == other
    assert health(aws) == "HEALTHY"


def test_pair_must_be_a_boolean():
    with pytest.raises(boot.BootError, match="pair must be true or false"):
        config(None, pair="yes")


# -- issue 20: the source/destination check on the primary ENI, a free device index, networkd ----


class RecordingEc2:
    """Passes every call to moto; records the names of the calls made."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.real, name)


def test_the_check_goes_off_on_the_primary_eni_never_on_the_instance(aws):
    ec2 = RecordingEc2(aws["ec2"])
    ip = FakeIp({"ens5": MAC_PRIMARY, "ens6": aws["mac"]})
    result = boot.Boot(config(aws), ec2, aws["instance"], boot.Links(ip)).run()
    assert "modify_instance_attribute" not in ec2.calls
    assert "modify_network_interface_attribute" in ec2.calls
    assert primary_check(aws) is False and result["source_dest_check"] == "turned off"


def test_a_primary_eni_already_unchecked_is_left_as_it_is(aws):
    reply = aws["ec2"].describe_instances(InstanceIds=[aws["instance"]])
    primary = reply["Reservations"][0]["Instances"][0]["NetworkInterfaces"][0]
    aws["ec2"].modify_network_interface_attribute(
        NetworkInterfaceId=primary["NetworkInterfaceId"], SourceDestCheck={"Value": False}
    )
    ec2 = RecordingEc2(aws["ec2"])
    ip = FakeIp({"ens6": aws["mac"]})
    result = boot.Boot(config(aws), ec2, aws["instance"], boot.Links(ip)).run()
    assert "modify_network_interface_attribute" not in ec2.calls
    assert result["source_dest_check"] == "already off"


def in_use(index: int) -> ClientError:
    # EC2's words (hashicorp/terraform-provider-aws#906).
    message = f"Instance 'i-0123' already has an interface attached at device index '{index}'."
    return ClientError(
        {"Error": {"Code": "InvalidParameterValue", "Message": message}},
        "AttachNetworkInterface",
    )


class IndexOneTaken:
    """EC2 after a forced detach: index 1 stays taken until a stop/start."""

    def __init__(self, real, taken=(1,)):
        self.real, self.taken, self.indexes = real, set(taken), []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def attach_network_interface(self, **kwargs):
        self.indexes.append(kwargs["DeviceIndex"])
        if kwargs["DeviceIndex"] in self.taken:
            raise in_use(kwargs["DeviceIndex"])
        return self.real.attach_network_interface(**kwargs)


def test_an_index_still_taken_after_a_forced_detach_moves_the_attach_to_the_next(aws):
    ec2 = IndexOneTaken(aws["ec2"])
    ip = FakeIp({"ens5": MAC_PRIMARY, "ens7": aws["mac"]})
    result = boot.Boot(config(aws), ec2, aws["instance"], boot.Links(ip)).run()
    assert ec2.indexes == [1, 2]
    assert attachment(aws)["DeviceIndex"] == 2 and result["device_index"] == 2
    assert result["device"] == "ens7"  # found by its MAC, wherever it is


def test_attach_at_free_index_gives_up_after_the_last_index_and_on_other_errors(aws):
    ec2 = IndexOneTaken(aws["ec2"], taken=range(1, 8))
    with pytest.raises(ClientError, match="device index '7'"):
        boot.attach_at_free_index(ec2, aws["eni"], aws["instance"])
    assert ec2.indexes == [1, 2, 3, 4, 5, 6, 7]

    class Limit(IndexOneTaken):
        def attach_network_interface(self, **kwargs):
            self.indexes.append(kwargs["DeviceIndex"])
            raise ClientError(
                {"Error": {"Code": "AttachmentLimitExceeded", "Message": "limit"}},
                "AttachNetworkInterface",
            )

    limited = Limit(aws["ec2"])
    with pytest.raises(ClientError, match="AttachmentLimitExceeded"):
        boot.attach_at_free_index(limited, aws["eni"], aws["instance"])
    assert limited.indexes == [1]


def test_networkd_is_told_to_leave_the_eni_alone_before_the_attach(aws, tmp_path):
    order: list[str] = []

    class Watching(RecordingEc2):
        def attach_network_interface(self, **kwargs):
            order.append("attach")
            return self.real.attach_network_interface(**kwargs)

    ip = FakeIp({"ens5": MAC_PRIMARY, "ens6": aws["mac"]})
    links = boot.Links(ip, networkd_dir=tmp_path, reload=lambda: order.append("reload"))
    boot.Boot(config(aws), Watching(aws["ec2"]), aws["instance"], links).run()
    assert order == ["reload", "attach"]
    written = (tmp_path / boot.NETWORKD_FILE).read_text()
    assert f"[Match]\nMACAddress={aws['mac'].lower()}\n" in written
    assert "[Link]\nUnmanaged=yes\n" in written
    # It sorts before netplan's 10-netplan-<id>.network: networkd applies the first match.
    assert sorted([boot.NETWORKD_FILE, "10-netplan-ens6.network"])[0] == boot.NETWORKD_FILE

    order.clear()  # the next boot finds the file as it should be: no reload
    boot.Boot(config(aws), aws["ec2"], aws["instance"], links).run()
    assert order == []


def test_the_standby_also_keeps_networkd_off_the_eni(aws, tmp_path):
    other = other_instance(aws)
    aws["ec2"].attach_network_interface(
        NetworkInterfaceId=aws["eni"], InstanceId=other, DeviceIndex=1
    )
    links = boot.Links(FakeIp({}), networkd_dir=tmp_path, reload=lambda: None)
    result = boot.Boot(config(aws, pair=True), aws["ec2"], aws["instance"], links).run()
    assert result["role"] == "standby"
    assert (tmp_path / boot.NETWORKD_FILE).exists()  # before the agent ever takes the ENI


def test_main_writes_networkd_s_file_where_networkd_reads_it(aws, imds, tmp_path, monkeypatch):
    assert boot.Links().networkd_dir is None  # only main() writes into the system's directory
    monkeypatch.setattr(boot, "NETWORKD_DIR", tmp_path / "network")
    ip = FakeIp({"ens6": aws["mac"]})
    monkeypatch.setattr(boot, "Links", functools.partial(boot.Links, ip, reload=lambda: None))
    assert boot.main(["attach", "--config", str(write_config(tmp_path, aws))]) == 0
    assert "Unmanaged=yes" in (tmp_path / "network" / boot.NETWORKD_FILE).read_text()


# -- against moto's server, as strict as EC2 (tools/aws_strict.py around SerialMotoServer) --------


@pytest.fixture
def strict_ec2(monkeypatch):
    from tools.moto_server import SerialMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    server = SerialMotoServer()
    server.start()
    try:
        yield boto3.client("ec2", region_name="us-east-1", endpoint_url=server.url)
    finally:
        server.stop()


def test_a_reboot_with_the_eni_attached_boots_against_a_strict_ec2(strict_ec2):
    """Issue 20, defect 1: after a reboot (or a stop/start) G's ENI is still attached, and EC2
    refuses ModifyInstanceAttribute(SourceDestCheck) on an instance with several interfaces.
    b08b1c8's boot made that call first, failed, and had the gateway replaced."""
    ec2 = strict_ec2
    vpc = ec2.create_vpc(CidrBlock="10.80.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.80.0.0/24")["Subnet"]["SubnetId"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet)[
        "Instances"
    ][0]["InstanceId"]
    eni = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress="10.80.0.10")
    eni_id, mac = (
        eni["NetworkInterface"]["NetworkInterfaceId"],
        eni["NetworkInterface"]["MacAddress"],
    )
    ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=instance, DeviceIndex=1)
    try:  # the precondition: this EC2 is as strict as AWS about the instance attribute
        ec2.modify_instance_attribute(InstanceId=instance, SourceDestCheck={"Value": False})
    except ClientError as exc:
        assert "multiple interfaces" in str(exc)
    else:
        pytest.skip("SerialMotoServer is not strict yet (tools/aws_strict.py)")

    world = {"ec2": ec2, "eni": eni_id}
    ip = FakeIp({"ens5": MAC_PRIMARY, "ens6": mac})
    result = boot.Boot(config(world), ec2, instance, boot.Links(ip)).run()
    assert result["role"] == "active" and result["device"] == "ens6"
    assert primary_check({"ec2": ec2}, instance) is False
