"""Every doctor finding, each triggered by breaking one thing in an otherwise healthy deployment."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest

from tests.cli.conftest import ALARMS, TABLE, Result
from tests.cli.test_tunnels import BROKEN_CAUSES, GatewayDocuments
from tunnelnat.adapters.commands import CommandError
from tunnelnat_cli.schemas import DOCTOR

TAG = {"tunnelnat": "enabled"}


def run_doctor(dep, *args, commands=None) -> Result:
    """``doctor`` as ``dep.run`` runs it; ``commands``: the gateway's side of ShowTunnels."""
    return dep.run("doctor", *args, commands=commands)


def doctor(dep, *args, ssm=True, commands=None):
    """Run ``doctor --json``; ``ssm``: answer DescribeInstanceInformation (moto lacks it);
    ``commands``: the gateway's side of ShowTunnels (asked when a tunnel is not up)."""
    stub = None
    if ssm is True:
        stub = dep.ssm_online()
    elif isinstance(ssm, dict):
        stub = dep.ssm_online(ssm)
    if stub is not None:  # the stubbed client answers the rejected-rows check too: no sync yet
        stub.add_response("list_commands", {"Commands": []}, None)
        # ... and the partners check (issue 23; last): no lanes, a one-partner deployment.
        stub.add_response("get_parameters_by_path", {"Parameters": []}, None)
    result = run_doctor(dep, "--json", *args, commands=commands)
    doc = result.json()
    jsonschema.validate(doc, DOCTOR)
    assert result.code == (0 if doc["healthy"] else 1)
    return doc


def failures(doc):
    return {(f["check"], f["resource"]): f for f in doc["findings"] if f["status"] == "fail"}


def only_failure(doc, check):
    found = [f for f in doc["findings"] if f["status"] == "fail"]
    assert [f["check"] for f in found] == [check], found
    return found[0]


@pytest.fixture
def enrolled(dep):
    web1 = dep.launch("10.10.1.21", name="web-1")
    assert dep.run("enroll", web1, "--wait").code == 0
    return web1


def test_a_healthy_deployment(dep, enrolled):
    doc = doctor(dep)
    assert doc["healthy"] is True
    assert doc["counts"]["fail"] == 0 and doc["counts"]["unknown"] == 0
    checks = [f["check"] for f in doc["findings"]]
    for check in (
        "config", "gateway", "source-dest-check", "fixed-eni", "ssm-agent", "tunnel",
        "generation", "dlq", "alarms", "instances",
    ):  # fmt: skip
        assert check in checks
    text = dep.run("doctor")
    assert text.code == 0
    assert f"[ok]   gateway              {dep.gateway_id} running (10.10.1.10)" in text.out
    assert "test: healthy" in text.out


def test_text_output_gives_each_finding_its_fix(dep):
    dep.source_dest_check(dep.gateway_id, True)
    dep.ssm_online()
    result = dep.run("doctor")
    assert result.code == 1
    assert (
        f"[FAIL] source-dest-check    source/destination check is ON on gateway {dep.gateway_id}"
        in result.out
    )
    # The primary ENI's attribute: EC2 refuses the instance's once G's ENI is attached.
    assert (
        "fix: aws ec2 modify-network-interface-attribute --network-interface-id "
        f"{dep.primary_eni(dep.gateway_id)} --no-source-dest-check" in result.out
    )
    assert "test: 1 finding(s)" in result.out


def test_no_gateway(dep):
    dep.ec2.stop_instances(InstanceIds=[dep.gateway_id])
    finding = only_failure(doctor(dep), "gateway")
    assert (
        "no running instance tagged tunnelnat:role=gateway, tunnelnat:deployment=test"
        in (finding["summary"])
    )
    assert "Key=tunnelnat:deployment,Value=test" in finding["fix"]


def test_two_gateways(dep):
    second = dep.launch(
        "10.10.1.11",
        tags={
            "tunnelnat:role": "gateway",
            "tunnelnat:deployment": "test",
            "aws:autoscaling:groupName": "test-gateway",  # a member (moto plays Auto Scaling)
        },
    )
    dep.source_dest_check(second, False)
    doc = doctor(dep, ssm={dep.gateway_id: "Online", second: "Online"})
    fails = failures(doc)
    newest, stale = sorted([dep.gateway_id, second])[::-1]
    gateway = fails[("gateway", newest)]
    assert "2 running gateways" in gateway["summary"]
    assert f"aws ec2 terminate-instances --instance-ids {stale}" in gateway["fix"]


def test_gateway_source_dest_check_on(dep):
    dep.source_dest_check(dep.gateway_id, True)
    finding = only_failure(doctor(dep), "source-dest-check")
    assert finding["resource"] == dep.gateway_id
    assert "EC2 drops the packets it forwards" in finding["summary"]
    assert f"its primary ENI {dep.primary_eni(dep.gateway_id)}" in finding["summary"]
    assert "modify-instance-attribute" not in json.dumps(finding)


def test_fixed_eni_missing(dep):
    dep.ec2.detach_network_interface(AttachmentId=_attachment(dep), Force=True)
    dep.ec2.delete_network_interface(NetworkInterfaceId=dep.eni_id)
    finding = only_failure(doctor(dep), "fixed-eni")
    assert finding["summary"].startswith(f"no network interface holds G=10.10.1.5 in {dep.vpc_id}")
    assert f"--subnet-id {dep.subnet_id} --private-ip-address 10.10.1.5" in finding["fix"]
    assert f"--instance-id {dep.gateway_id} --device-index 1" in finding["fix"]


def test_fixed_eni_detached(dep):
    dep.ec2.detach_network_interface(AttachmentId=_attachment(dep), Force=True)
    finding = only_failure(doctor(dep), "fixed-eni")
    assert f"{dep.eni_id} (G=10.10.1.5) is not attached, not to gateway" in finding["summary"]
    assert finding["fix"] == (
        f"aws ec2 attach-network-interface --network-interface-id {dep.eni_id} "
        f"--instance-id {dep.gateway_id} --device-index 1"
    )


def test_fixed_eni_attached_to_another_instance(dep):
    attachment = _attachment(dep)
    dep.ec2.detach_network_interface(AttachmentId=attachment, Force=True)
    old = dep.launch("10.10.1.12", name="old-gateway")
    dep.ec2.attach_network_interface(NetworkInterfaceId=dep.eni_id, InstanceId=old, DeviceIndex=1)
    finding = only_failure(doctor(dep), "fixed-eni")
    assert f"is attached to {old}, not to gateway {dep.gateway_id}" in finding["summary"]
    assert finding["fix"].startswith("aws ec2 detach-network-interface --attachment-id eni-attach-")


def test_fixed_eni_source_dest_check_on(dep):
    dep.ec2.modify_network_interface_attribute(
        NetworkInterfaceId=dep.eni_id, SourceDestCheck={"Value": True}
    )
    finding = only_failure(doctor(dep), "fixed-eni")
    assert "source/destination check is ON on" in finding["summary"]
    assert finding["fix"] == (
        f"aws ec2 modify-network-interface-attribute --network-interface-id {dep.eni_id} "
        "--no-source-dest-check"
    )


def test_g_on_the_gateways_primary_interface(dep):
    finding = only_failure(doctor(dep, "--gateway-ip", "10.10.1.10"), "fixed-eni")
    assert "is the gateway's primary interface" in finding["summary"]
    assert "it is lost when the gateway is replaced" in finding["summary"]


def test_ssm_agents_offline_or_unregistered(dep, enrolled):
    doc = doctor(dep, ssm={enrolled: "ConnectionLost"})
    fails = failures(doc)
    assert "gateway" in fails[("ssm-agent", dep.gateway_id)]["summary"]
    assert "not registered with SSM" in fails[("ssm-agent", dep.gateway_id)]["summary"]
    assert "SSM agent ConnectionLost" in fails[("ssm-agent", enrolled)]["summary"]
    assert "AmazonSSMManagedInstanceCore" in fails[("ssm-agent", enrolled)]["fix"]


def test_ssm_unknown_when_the_api_is_unavailable(dep, enrolled):
    doc = doctor(dep, ssm=False)  # moto: DescribeInstanceInformation is not implemented
    [finding] = [f for f in doc["findings"] if f["check"] == "ssm-agent"]
    assert finding["status"] == "unknown"
    assert "DescribeInstanceInformation failed" in finding["summary"]
    assert doc["healthy"] is True, "a check that cannot run is not a finding"
    strict = dep.run("doctor", "--strict")
    assert strict.code == 1 and "could not run" in strict.out


@pytest.mark.parametrize("broken", sorted(BROKEN_CAUSES))
def test_tunnel_down_names_the_cause_from_charons_log(dep, tmp_path, broken):
    dep.put_metric("partner", 0, age=timedelta(seconds=5))
    gateway = GatewayDocuments(tmp_path, broken=broken)
    finding = only_failure(doctor(dep, commands=gateway), "tunnel")
    assert finding["summary"].startswith(
        f"tunnel partner on {dep.gateway_id}: down — {BROKEN_CAUSES[broken]}"
    ), finding["summary"]
    assert finding["summary"].endswith(" s ago]") and "\n" not in finding["summary"]
    assert gateway.calls == [(dep.gateway_id, "ShowTunnels", {"TunnelName": ""})]
    assert "--document-name test-RestartTunnel --parameters TunnelName=partner" in (finding["fix"])
    text = run_doctor(dep, commands=gateway)
    (line,) = [x for x in text.out.splitlines() if x.startswith("[FAIL] tunnel ")]
    assert f": down — {BROKEN_CAUSES[broken]}" in line


def test_tunnel_down_when_the_gateway_cannot_be_asked_is_one_line(dep):
    class Unreachable:
        def run(self, instance_id, document, parameters):
            raise CommandError(f"{instance_id}: {document} still InProgress after 30s")

    dep.put_metric("partner", 0, age=timedelta(seconds=5))
    finding = only_failure(doctor(dep, commands=Unreachable()), "tunnel")
    assert finding["summary"] == (
        f"tunnel partner on {dep.gateway_id}: down — could not ask the gateway: ShowTunnels on "
        f"gateway {dep.gateway_id}: {dep.gateway_id}: ShowTunnels still InProgress after 30s"
    )


def test_tunnel_up_asks_the_gateway_nothing(dep, tmp_path):
    dep.put_metric("partner", 1, age=timedelta(seconds=5))
    gateway = GatewayDocuments(tmp_path, broken="wrong-psk")
    doctor(dep, commands=gateway)
    assert gateway.calls == []


def put_established(dep, tunnel, value):
    """The health agent's TunnelEstablished (Deployment, Tunnel): up since configured?"""
    dep.cloudwatch.put_metric_data(
        Namespace="tunnelnat/test",
        MetricData=[
            {
                "MetricName": "TunnelEstablished",
                "Dimensions": [
                    {"Name": "Deployment", "Value": "test"},
                    {"Name": "Tunnel", "Value": tunnel},
                ],
                "Value": value,
                "Timestamp": datetime.now(UTC) - timedelta(seconds=5),
            }
        ],
    )


def test_tunnel_never_up_since_configured_is_waiting_for_the_partner(dep, tmp_path):
    # A first deploy: the PSK is not set yet (or the partner is not ready).
    dep.put_metric("partner", 0, age=timedelta(seconds=5))
    put_established(dep, "partner", 0)
    gateway = GatewayDocuments(tmp_path, broken="partner-down")
    finding = only_failure(doctor(dep, commands=gateway), "tunnel")
    assert finding["summary"].startswith(
        f"tunnel partner on {dep.gateway_id}: waiting for the partner (not up since the gateway "
        "was configured): is the PSK set? is the partner up? — partner not answering "
        "(retransmits to 198.51.100.40 for 10"
    ), finding["summary"]
    assert "put-secret-value" in finding["fix"] and "RestartTunnel" not in finding["fix"]
    text = run_doctor(dep, commands=gateway)
    (line,) = [x for x in text.out.splitlines() if x.startswith("[FAIL] tunnel ")]
    assert "waiting for the partner" in line and ": down" not in line


def test_tunnel_down_after_it_was_established_is_down(dep, tmp_path):
    dep.put_metric("partner", 0, age=timedelta(seconds=5))
    put_established(dep, "partner", 1)
    finding = only_failure(doctor(dep, commands=GatewayDocuments(tmp_path)), "tunnel")
    assert finding["summary"] == (
        f"tunnel partner on {dep.gateway_id}: down — charon's log shows no failure since its "
        "last success"
    )
    assert "RestartTunnel" in finding["fix"]


def test_tunnel_without_a_recent_datapoint(dep, tmp_path):
    dep.put_metric("backup", 1, age=timedelta(minutes=20))
    finding = only_failure(doctor(dep, commands=GatewayDocuments(tmp_path)), "tunnel")
    # ShowTunnels lists the gateway's configured tunnels: backup is not among them.
    assert finding["summary"] == (
        f"tunnel backup on {dep.gateway_id}: no datapoint in the last 5 minutes"
    )


def test_generation_behind(dep, enrolled):
    _set(dep, "generation", generation="5")
    finding = only_failure(doctor(dep), "generation")
    assert finding["summary"] == "gateway is behind: applied generation 1, desired 5"
    assert finding["fix"].startswith("tunnelnat reconcile --wait")


def test_replaced_gateway_never_synced(dep, enrolled):
    _set(dep, "gateway", gateway_instance_id="i-00000000000000001", kind="S")
    finding = only_failure(doctor(dep), "generation")
    assert f"gateway {dep.gateway_id} has not reported a sync" in finding["summary"]
    assert "by i-00000000000000001" in finding["summary"]


def test_messages_in_the_dlq(dep):
    dep.sqs.send_message(QueueUrl=dep.dlq_url, MessageBody=json.dumps({"reason": "boom"}))
    finding = only_failure(doctor(dep), "dlq")
    assert finding["summary"] == "1 message(s) in test-events-dlq: events the controller gave up on"
    assert finding["fix"].startswith("see them with `tunnelnat dlq` (instances and reasons)")
    assert "`tunnelnat dlq --redrive`" in finding["fix"]


def test_dlq_by_url(dep):
    other = dep.sqs.create_queue(QueueName="custom-dlq")["QueueUrl"]
    dep.sqs.send_message(QueueUrl=other, MessageBody="{}")
    dep.ssm_online()
    doc = dep.run("doctor", "--json", "--dlq-url", other).json()
    [finding] = [f for f in doc["findings"] if f["check"] == "dlq"]
    assert finding["status"] == "fail" and finding["resource"] == "custom-dlq"


def test_tunnel_seen_only_through_the_deployment_series(dep, tmp_path):
    """The gateway publishes no series of its own: the alarm's (Deployment, Tunnel) one counts."""
    dep.put_metric("backup", 0, deployment="test")
    dep.put_metric("partner", 1, deployment="test")  # the gateway's own series wins
    finding = only_failure(doctor(dep, commands=GatewayDocuments(tmp_path)), "tunnel")
    assert finding["summary"] == f"tunnel backup on {dep.gateway_id}: down"


def test_dlq_missing(dep):
    dep.sqs.delete_queue(QueueUrl=dep.dlq_url)
    finding = only_failure(doctor(dep), "dlq")
    assert "dead-letter queue test-events-dlq not found" in finding["summary"]


def test_alarm_not_ok(dep):
    tunnel_alarm, dlq_alarm = "tunnelnat-test-TunnelUp-partner", "tunnelnat-test-DeadLetters"
    dep.cloudwatch.set_alarm_state(
        AlarmName=tunnel_alarm, StateValue="ALARM", StateReason="TunnelUp < 1 for 3 min"
    )
    dep.cloudwatch.set_alarm_state(
        AlarmName=dlq_alarm, StateValue="INSUFFICIENT_DATA", StateReason="no data"
    )
    dep.cloudwatch.put_metric_alarm(
        AlarmName="test-custom", Namespace="x", MetricName="y", Statistic="Sum", Period=60,
        EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanThreshold",
    )  # fmt: skip
    dep.cloudwatch.set_alarm_state(AlarmName="test-custom", StateValue="ALARM", StateReason="r")
    dep.cloudwatch.put_metric_alarm(
        AlarmName="testing-other", Namespace="x", MetricName="y", Statistic="Sum", Period=60,
        EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanThreshold",
    )  # fmt: skip
    dep.cloudwatch.set_alarm_state(AlarmName="testing-other", StateValue="ALARM", StateReason="r")
    fails = failures(doctor(dep))
    assert {name for check, name in fails if check == "alarms"} == {
        tunnel_alarm,
        dlq_alarm,
        "test-custom",
    }, "another deployment's alarm (testing-*) is not ours"
    tunnel = fails[("alarms", tunnel_alarm)]
    assert tunnel["summary"] == f"alarm {tunnel_alarm} is ALARM: TunnelUp < 1 for 3 min"
    assert "RestartTunnel" in tunnel["fix"]
    assert "metric is not being published" in fails[("alarms", dlq_alarm)]["fix"]
    assert (
        "describe-alarm-history --alarm-name test-custom" in fails[("alarms", "test-custom")]["fix"]
    )


def test_no_alarms_is_reported_as_unknown(dep):
    dep.cloudwatch.delete_alarms(AlarmNames=list(ALARMS))
    doc = doctor(dep)
    [finding] = [f for f in doc["findings"] if f["check"] == "alarms"]
    assert finding["status"] == "unknown"
    assert finding["summary"] == "no CloudWatch alarm named tunnelnat-test-* or test-*"


def test_enrolled_instance_in_an_unsupported_subnet(dep):
    """An enrolment from before the subnet rule (or a manual edit): the route cannot work."""
    far = dep.launch("10.10.2.30", subnet=dep.other_subnet_id, tags=TAG)
    for pk, extra in (("mapping", {"public_ip": {"S": "203.0.113.12"}}), ("instance", {})):
        item = {"pk": {"S": pk}, "sk": {"S": far}, "private_ip": {"S": "10.10.2.30"}, **extra}
        if pk == "instance":
            item |= {"status": {"S": "enrolled"}, "reason": {"S": "route and NAT in place"}}
        dep.dynamodb.put_item(TableName=TABLE, Item=item)
    doc = doctor(dep)
    finding = failures(doc)[("unsupported-subnet", far)]
    assert finding["summary"] == (
        f"{far} is enrolled but 10.10.2.30 is outside the gateway's subnet 10.10.1.0/24: "
        "a host route via G cannot work there"
    )
    assert f"tunnelnat unenroll {far}" in finding["fix"]


def test_tagged_instance_in_an_unsupported_subnet(dep):
    far = dep.launch("10.10.2.30", subnet=dep.other_subnet_id)
    dep.run("enroll", far, "--wait")
    finding = only_failure(doctor(dep), "unsupported-subnet")
    assert finding["summary"].startswith(f"{far} is tagged but 10.10.2.30 is outside")


def test_pool_exhausted_and_failed_instances(dep):
    for i in range(3):
        dep.run("enroll", dep.launch(f"10.10.1.{21 + i}"), "--wait")
    fourth = dep.launch("10.10.1.24")
    dep.run("enroll", fourth, "--wait")
    broken = dep.launch("10.10.1.25", tags=TAG)
    dep.dynamodb.put_item(
        TableName=TABLE,
        Item={
            "pk": {"S": "instance"},
            "sk": {"S": broken},
            "status": {"S": "failed"},
            "reason": {"S": "CommandError: AddHostRoute Failed: boom"},
        },
    )
    fails = failures(doctor(dep))
    assert fails[("instance", fourth)]["summary"].startswith(f"{fourth}: pool-exhausted: all 3")
    assert "add Elastic IPs" in fails[("instance", fourth)]["fix"]
    assert fails[("instance", broken)]["summary"] == (
        f"{broken}: failed: CommandError: AddHostRoute Failed: boom"
    )
    assert f"tunnelnat reconcile {broken}" in fails[("instance", broken)]["fix"]


def test_tagged_instance_the_controller_never_saw(dep):
    missed = dep.launch("10.10.1.22", tags=TAG)
    finding = only_failure(doctor(dep), "instance")
    assert finding["summary"] == (
        f"{missed} is tagged tunnelnat=enabled but the controller has not recorded it"
    )
    assert finding["fix"].startswith(f"tunnelnat reconcile {missed}")


def test_stale_mapping_of_an_untagged_instance(dep, enrolled):
    dep.ec2.delete_tags(Resources=[enrolled], Tags=[{"Key": "tunnelnat"}])  # event lost
    finding = only_failure(doctor(dep), "instance")
    assert f"{enrolled} is not tagged tunnelnat but still has a mapping" in finding["summary"]
    assert finding["fix"] == f"tunnelnat reconcile {enrolled}"


def test_instance_stuck_waiting_for_its_ssm_agent(dep):
    stuck = dep.launch("10.10.1.22", tags=TAG)
    dep.dynamodb.put_item(
        TableName=TABLE,
        Item={
            "pk": {"S": "instance"},
            "sk": {"S": stuck},
            "status": {"S": "pending-ssm"},
            "reason": {"S": "SSM agent not registered"},
            "updated_at": {"N": "1000"},
        },
    )
    doc = doctor(dep, ssm={dep.gateway_id: "Online", stuck: "Online"})
    finding = failures(doc)[("instance", stuck)]
    assert finding["summary"] == f"{stuck}: pending-ssm: SSM agent not registered"


def test_config_from_the_table_when_the_lambda_is_unreadable(dep):
    _delete_lambda(dep)
    from tests.conftest import VALID_CONFIG

    _set(dep, "config", config=json.dumps(VALID_CONFIG), kind="S")
    doc = doctor(dep)
    [config] = [f for f in doc["findings"] if f["check"] == "config"]
    assert config["summary"] == "configuration from table:meta/config"
    assert doc["healthy"] is True


def test_unknown_config_skips_the_eni_check_unless_g_is_given(dep):
    _delete_lambda(dep)
    doc = doctor(dep)
    by_check = {f["check"]: f for f in doc["findings"]}
    assert by_check["config"]["status"] == "unknown"
    assert (
        "cannot read Lambda test-controller (ResourceNotFoundException)"
        in (by_check["config"]["summary"])
    )
    assert by_check["fixed-eni"]["status"] == "unknown"
    doc = doctor(dep, "--gateway-ip", "10.10.1.5")
    assert {f["check"]: f for f in doc["findings"]}["fixed-eni"]["status"] == "ok"


def test_invalid_config_is_a_finding_that_names_the_key(dep):
    dep.session.client("lambda", endpoint_url=dep.url).update_function_configuration(
        FunctionName="test-controller",
        Environment={"Variables": {"TUNNELNAT_CONFIG": json.dumps({"nat_mode": "dedicated"})}},
    )
    finding = only_failure(doctor(dep, "--gateway-ip", "10.10.1.5"), "config")
    assert "invalid lambda:test-controller" in finding["summary"]
    assert "partner_endpoint" in finding["summary"]


def test_invalid_gateway_ip_option(dep):
    result = dep.run("doctor", "--gateway-ip", "10.10.1.999")
    assert result.code == 2
    assert result.err == "tunnelnat: --gateway-ip '10.10.1.999' is not an IPv4 address\n"


# -- helpers -----------------------------------------------------------------------------------
def _attachment(dep) -> str:
    eni = dep.ec2.describe_network_interfaces(NetworkInterfaceIds=[dep.eni_id])
    return eni["NetworkInterfaces"][0]["Attachment"]["AttachmentId"]


def _set(dep, sk: str, *, kind: str = "N", **values: str) -> None:
    item = {"pk": {"S": "meta"}, "sk": {"S": sk}}
    current = dep.dynamodb.get_item(TableName=TABLE, Key=item).get("Item", {})
    dep.dynamodb.put_item(
        TableName=TABLE, Item={**current, **item, **{k: {kind: v} for k, v in values.items()}}
    )


def _delete_lambda(dep) -> None:
    dep.session.client("lambda", endpoint_url=dep.url).delete_function(
        FunctionName="test-controller"
    )


def test_a_denied_api_makes_its_check_unknown_not_the_whole_doctor(dep):
    from botocore.stub import Stubber

    cloudwatch = dep.session.client("cloudwatch", endpoint_url=dep.url)
    stubber = Stubber(cloudwatch)
    stubber.add_client_error("list_metrics", "AccessDenied", "no", http_status_code=403)
    stubber.add_client_error("describe_alarms", "AccessDenied", "no", http_status_code=403)
    stubber.activate()
    dep.clients["cloudwatch"] = cloudwatch
    doc = doctor(dep)
    by_check = {f["check"]: f for f in doc["findings"]}
    assert by_check["tunnels"]["status"] == "unknown"
    assert by_check["tunnels"]["summary"] == "could not check: ListMetrics failed (AccessDenied)"
    assert by_check["alarms"]["summary"] == "could not check: DescribeAlarms failed (AccessDenied)"
    assert by_check["gateway"]["status"] == "ok", "the other checks still ran"


# -- isolation (issue 14): what the controller skipped so that the rest converge --------------


def _other_vpc_twin(dep, private_ip: str) -> str:
    """An instance in another VPC whose subnet has the gateway subnet's range, tagged."""
    vpc = dep.ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
    subnet = dep.ec2.create_subnet(VpcId=vpc, CidrBlock="10.10.1.0/24")["Subnet"]["SubnetId"]
    return dep.launch(private_ip, subnet=subnet, name="twin")


def test_a_private_address_twice_is_a_conflict_naming_the_other(dep):
    first = dep.launch("10.10.1.21", name="web-1")
    assert dep.run("enroll", first, "--wait").code == 0
    twin = _other_vpc_twin(dep, "10.10.1.21")
    # The controller decided (conflict): enroll --wait says so at once, no timeout.
    waited = dep.run("enroll", twin, "--wait")
    assert waited.code == 1 and "conflict" in waited.err + waited.out
    fails = failures(doctor(dep))
    finding = fails[("conflict", twin)]
    assert finding["summary"].startswith(f"{twin}: conflict: private address 10.10.1.21")
    assert first in finding["summary"]
    assert "two instances have one private address" in finding["fix"]
    assert f"tunnelnat reconcile {twin}" in finding["fix"]
    assert ("instance", first) not in fails and ("conflict", first) not in fails
    status = dep.run("status")
    assert "needs a human: 1 conflict" in status.out
    assert dep.run("status", "--json").json()["summary"]["attention"] == {"conflict": 1}


@pytest.mark.parametrize(
    ("status", "reason", "fix"),
    [
        (
            "other-vpc",
            "the instance is in vpc-0feedbeef0000000a, not the gateway's vpc-0aaaaaaaaaaaaaaaa",
            "only the gateway's VPC is served",
        ),
        (
            "route-conflict",
            "route table rtb-0123456789abcdef0 already routes 198.51.100.0/28 to "
            "igw-0123456789abcdef0, not tunnelnat's",
            "is not tunnelnat's",
        ),
    ],
)
def test_isolation_statuses_are_findings_with_their_reasons(dep, status, reason, fix):
    # In another subnet's range: the status, not unsupported-subnet, is what the controller said.
    far = dep.launch("10.10.2.30", subnet=dep.other_subnet_id, tags=TAG)
    dep.dynamodb.put_item(
        TableName=TABLE,
        Item={
            "pk": {"S": "instance"},
            "sk": {"S": far},
            "status": {"S": status},
            "reason": {"S": reason},
            "private_ip": {"S": "10.10.2.30"},
        },
    )
    finding = only_failure(doctor(dep), status)
    assert finding["summary"] == f"{far}: {status}: {reason}"
    assert fix in finding["fix"] and finding["resource"] == far
    text = dep.run("status")
    assert f"needs a human: 1 {status}" in text.out
    assert reason in text.out


def test_rows_the_gateway_left_out_at_its_last_sync(dep):
    """SyncNatTable's own report of the rows it did not apply (the gateway program's format),
    read back from Run Command's history."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "gateway"))
    from tunnelnat.core.nat import NatTable
    from tunnelnat_gateway.nat_sync import rejected_report

    table = NatTable.from_rows(
        7,
        [("10.10.1.21", "203.0.113.10"), ("10.10.1.99", "203.0.113.11"),
         ("10.10.1.99", "203.0.113.12")],
    )  # fmt: skip
    line = json.dumps({"applied_generation": 7, **rejected_report(table)})
    stub = dep.ssm_online()
    command = "11111111-2222-3333-4444-555555555555"
    stub.add_response(
        "list_commands",
        {
            "Commands": [
                {
                    "CommandId": command,
                    "DocumentName": "test-SyncNatTable",
                    "Status": "Success",
                    "RequestedDateTime": datetime.now(UTC) - timedelta(minutes=3),
                }
            ]
        },
        {
            "InstanceId": dep.gateway_id,
            "Filters": [{"key": "DocumentName", "value": "test-SyncNatTable"}],
            "MaxResults": 10,
        },
    )
    stub.add_response(
        "get_command_invocation",
        {"Status": "Success", "StandardOutputContent": f"synced\n{line}\n"},
        {"CommandId": command, "InstanceId": dep.gateway_id},
    )
    result = dep.run("doctor", "--json")
    doc = result.json()
    jsonschema.validate(doc, DOCTOR)
    finding = only_failure(doc, "rejected-rows")
    assert finding["summary"].startswith(
        f"gateway {dep.gateway_id} left 2 mapping row(s) out of its NAT table at its last sync"
    )
    assert "10.10.1.99 -> 203.0.113.11: " in finding["summary"]
    assert "10.10.1.99 -> 203.0.113.12: " in finding["summary"]
    assert "10.10.1.21" not in finding["summary"]
    stub.assert_no_pending_responses()


# -- issue 21: a lookalike gateway, and what an instance wrote ----------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        {"tunnelnat:gateway": "test"},  # the associations' old target
        {"tunnelnat:role": "gateway", "tunnelnat:deployment": "test"},  # the pair's old peers
        {"tunnelnat:role": "gateway"},
    ],
)
def test_doctor_names_an_instance_labelled_like_the_gateway_outside_its_group(dep, labels):
    impostor = dep.launch("10.10.1.77", name="lookalike", tags=labels)
    doc = doctor(dep, ssm={dep.gateway_id: "Online", impostor: "Online"})
    finding = failures(doc)[("gateway-impostor", impostor)]
    assert "not in its Auto Scaling group test-gateway" in finding["summary"]
    assert "gets no gateway command" in finding["summary"]
    assert f"aws ec2 delete-tags --resources {impostor}" in finding["fix"]
    assert "CloudTrail" in finding["fix"]
    assert ("gateway-impostor", dep.gateway_id) not in failures(doc)


def test_another_deployments_gateway_is_not_an_impostor(dep):
    other = dep.launch(
        "10.10.1.78", tags={"tunnelnat:role": "gateway", "tunnelnat:deployment": "prod"}
    )
    doc = doctor(dep, ssm={dep.gateway_id: "Online", other: "Online"})
    assert not [k for k in failures(doc) if k[0] == "gateway-impostor"]


def test_a_single_gateway_gets_the_deployed_software_named(dep):
    doc = doctor(dep)
    (finding,) = [f for f in doc["findings"] if f["check"] == "gateway-software"]
    assert finding["status"] == "ok"
    assert finding["summary"].startswith(
        f"deployed gateway software {dep.software['version']} (555555555555); a single gateway"
    )
