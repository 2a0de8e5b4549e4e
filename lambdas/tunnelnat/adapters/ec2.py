"""EC2: what an instance looks like now, and where the gateway is.

The gateway is the running member of the gateway's Auto Scaling group (aws:autoscaling:groupName,
which only Auto Scaling sets: tag keys with the aws: prefix are reserved, EC2 User Guide, "Tag
restrictions") that holds G (the fixed address on its dedicated ENI) in our VPC; the other running
members are the standbys. ``tunnelnat:role``/``tunnelnat:deployment`` are labels: nothing is
decided by them while the group is known (issue 21). An instance labelled like the gateway outside
the group gets nothing; two instances that both qualify are a loud failure
(``GatewayAmbiguous``), never a guess. Without a group (a deployment older than the group's
setting, some tests) the labels still say which instances to look at, and G decides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from tunnelnat.core.config import parse_ipv4
from tunnelnat.core.enrolment import GATEWAY_ROLE_TAG, GROUP_TAG, STATUS_TAG, ObservedInstance

logger = Logger(service="tunnelnat", child=True)

DEPLOYMENT_TAG = "tunnelnat:deployment"
DESCRIBE_CHUNK = 1000  # DescribeInstances' limit on InstanceIds
_INSTANCE_IDS = re.compile(r"i-[0-9a-f]{8,17}")


class GatewayNotFound(RuntimeError):
    """No running gateway instance carries the deployment's tags (being replaced, or not up)."""


class GatewayAmbiguous(GatewayNotFound):
    """More than one running instance qualifies as the gateway: nothing is sent to either."""


class Ec2Instances:
    def __init__(
        self,
        ec2_client: Any,
        *,
        status_tag: str = STATUS_TAG,
        gateway_ip: IPv4Address | None = None,
        vpc_id: str | None = None,
        gateway_group: str | None = None,
    ) -> None:
        self._ec2 = ec2_client
        self.status_tag = status_tag
        self._gateway_ip = str(gateway_ip) if gateway_ip is not None else None
        self._vpc_id = vpc_id or None
        self._gateway_group = gateway_group or None

    def describe_many(self, instance_ids: Iterable[str]) -> dict[str, ObservedInstance]:
        """Every instance EC2 still knows among ``instance_ids``, in calls of up to 1,000 IDs."""
        return {i: observed(raw) for i, raw in self._describe(instance_ids).items()}

    def observe(
        self, instance_ids: Iterable[str], *, gateway: str, deployment: str
    ) -> tuple[dict[str, ObservedInstance], bool]:
        """``describe_many`` of ``instance_ids``, and whether ``gateway`` (a gateway known from
        before) still qualifies, as ``find_gateway`` would have it: running, tagged as this
        deployment's gateway, holding G in our VPC and group. The same DescribeInstances."""
        wanted = list(dict.fromkeys(instance_ids))
        raws = self._describe([*wanted, gateway])
        found = {i: observed(raws[i]) for i in wanted if i in raws}
        raw = raws.get(gateway)
        holds = raw is not None and self._is_candidate(raw, deployment)
        # Without G to check, only find_gateway's lookup can say which one it is.
        holds = holds and raw is not None and self._gateway_ip is not None and self._is_gateway(raw)
        return found, holds

    def observe_gateways(
        self, instance_ids: Iterable[str], *, gateways: Iterable[str], deployment: str
    ) -> tuple[dict[str, ObservedInstance], str | None, list[str]]:
        """``describe_many`` of ``instance_ids``, and of the gateways known from before (the
        active and the pair's standby) in the same DescribeInstances: which of them holds G now
        (None: none does, look it up), and which others are still running gateways of ours."""
        wanted = list(dict.fromkeys(instance_ids))
        known = list(dict.fromkeys(gateways))
        raws = self._describe([*wanted, *known])
        found = {i: observed(raws[i]) for i in wanted if i in raws}
        active: str | None = None
        others: list[str] = []
        for gateway in known:
            raw = raws.get(gateway)
            if raw is None or not self._is_candidate(raw, deployment):
                continue
            if self._gateway_ip is not None and self._is_gateway(raw) and active is None:
                active = gateway
            elif self._is_standby(raw):
                others.append(gateway)
        return found, active, others

    def _is_candidate(self, raw: dict, deployment: str) -> bool:
        """Running, and a member of the gateway's group (without a group known: labelled as
        this deployment's gateway). Holding G is checked apart."""
        if raw.get("State", {}).get("Name") != "running":
            return False
        tags = {t.get("Key"): t.get("Value") for t in raw.get("Tags", [])}
        if self._gateway_group is not None:
            return tags.get(GROUP_TAG) == self._gateway_group
        return tags.get(GATEWAY_ROLE_TAG) == "gateway" and tags.get(DEPLOYMENT_TAG) == deployment

    def _describe(self, instance_ids: Iterable[str]) -> dict[str, dict]:
        wanted = list(dict.fromkeys(instance_ids))
        found: dict[str, dict] = {}
        for start in range(0, len(wanted), DESCRIBE_CHUNK):
            chunk = wanted[start : start + DESCRIBE_CHUNK]
            while chunk:
                try:
                    pages = self._ec2.get_paginator("describe_instances").paginate(
                        InstanceIds=chunk
                    )
                    for page in pages:
                        for reservation in page.get("Reservations", []):
                            for raw in reservation.get("Instances", []):
                                found[raw["InstanceId"]] = raw
                    break
                except ClientError as exc:
                    if exc.response["Error"]["Code"] != "InvalidInstanceID.NotFound":
                        raise
                    # One unknown ID fails the whole call: drop the ones named and ask again.
                    missing = set(_INSTANCE_IDS.findall(exc.response["Error"].get("Message", "")))
                    if not missing & set(chunk):
                        raise
                    chunk = [i for i in chunk if i not in missing]
        return found

    def tagged(self, tag_key: str) -> dict[str, ObservedInstance]:
        """Every not-yet-terminated instance carrying ``tag_key`` (any value), in our VPC when
        it is known (another VPC's instances are another deployment's business)."""
        found: dict[str, ObservedInstance] = {}
        filters = [
            {"Name": "tag-key", "Values": [tag_key]},
            {
                "Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped", "shutting-down"],
            },
        ]
        if self._vpc_id is not None:
            filters.append({"Name": "vpc-id", "Values": [self._vpc_id]})
        pages = self._ec2.get_paginator("describe_instances").paginate(
            Filters=filters,
            PaginationConfig={"PageSize": 1000},
        )
        for page in pages:
            for reservation in page.get("Reservations", []):
                for raw in reservation.get("Instances", []):
                    found[raw["InstanceId"]] = observed(raw)
        return found

    def set_status_tag(self, instance: ObservedInstance, status: str) -> None:
        """Show the enrolment status in the console; skipped when the tag already says so."""
        if instance.tags.get(self.status_tag) == status:
            return
        try:
            self._ec2.create_tags(
                Resources=[instance.instance_id], Tags=[{"Key": self.status_tag, "Value": status}]
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("InvalidInstanceID.NotFound",):
                raise

    def set_status_tags(self, instances: Iterable[ObservedInstance], status: str) -> None:
        """``set_status_tag`` for many instances: one CreateTags per 1,000 whose tag differs."""
        tag = [{"Key": self.status_tag, "Value": status}]
        ids = [i.instance_id for i in instances if i.tags.get(self.status_tag) != status]
        for start in range(0, len(ids), DESCRIBE_CHUNK):
            chunk = ids[start : start + DESCRIBE_CHUNK]
            try:
                self._ec2.create_tags(Resources=chunk, Tags=tag)
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("InvalidInstanceID.NotFound",):
                    raise
                # One of them is gone (terminated meanwhile): tag the others one by one.
                for instance_id in chunk:
                    try:
                        self._ec2.create_tags(Resources=[instance_id], Tags=tag)
                    except ClientError as one:
                        if one.response["Error"]["Code"] != "InvalidInstanceID.NotFound":
                            raise

    def clear_status_tags(self, instances: Iterable[ObservedInstance]) -> None:
        """Remove this deployment's status tag where it is (one DeleteTags per 1,000);
        deleting a tag that is not there is no error (EC2 API Reference, DeleteTags)."""
        ids = [i.instance_id for i in instances if self.status_tag in i.tags]
        for start in range(0, len(ids), DESCRIBE_CHUNK):
            chunk = ids[start : start + DESCRIBE_CHUNK]
            try:
                self._ec2.delete_tags(Resources=chunk, Tags=[{"Key": self.status_tag}])
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "InvalidInstanceID.NotFound":
                    raise

    def find_gateway(self, deployment: str) -> str:
        """The running gateway that holds G (the pair's active)."""
        return self.find_gateways(deployment)[0]

    def find_gateways(self, deployment: str) -> tuple[str, list[str]]:
        """The running gateway that holds G (the pair's active), and the other running
        instances tagged as this deployment's gateway in our VPC and group (the standby; during
        a rolling replacement, briefly another): every one of them gets the NAT table."""
        if self._gateway_group is not None:
            # The group's members, whatever labels they (or a lookalike) carry.
            who = {"Name": f"tag:{GROUP_TAG}", "Values": [self._gateway_group]}
            what = f"of group {self._gateway_group}"
            labels = [who]
        else:
            what = f"tagged {DEPLOYMENT_TAG}={deployment}"
            labels = [
                {"Name": f"tag:{GATEWAY_ROLE_TAG}", "Values": ["gateway"]},
                {"Name": f"tag:{DEPLOYMENT_TAG}", "Values": [deployment]},
            ]
        reply = self._ec2.describe_instances(
            Filters=[*labels, {"Name": "instance-state-name", "Values": ["running"]}]
        )
        tagged = [i for r in reply.get("Reservations", []) for i in r.get("Instances", [])]
        if not tagged:
            raise GatewayNotFound(f"no running gateway {what}")
        if self._gateway_ip is None:
            # Without G to check (callers that know only the tags): the newest-looking one.
            return sorted(i["InstanceId"] for i in tagged)[-1], []
        holders = [raw for raw in tagged if self._is_gateway(raw)]
        standbys = sorted(i["InstanceId"] for i in tagged
                          if i not in holders and self._is_standby(i))  # fmt: skip
        impostors = sorted(i["InstanceId"] for i in tagged
                           if i not in holders and i["InstanceId"] not in standbys)  # fmt: skip
        if impostors:
            logger.warning(
                "instances tagged as the gateway that do not hold G: ignored",
                extra={"impostors": impostors, "gateway_ip": self._gateway_ip},
            )
        if not holders:
            raise GatewayNotFound(
                f"no running gateway {what} holds G "
                f"{self._gateway_ip}{self._where()} "
                f"(tagged: {', '.join(sorted(i['InstanceId'] for i in tagged))})"
            )
        if len(holders) > 1:
            names = ", ".join(sorted(i["InstanceId"] for i in holders))
            raise GatewayAmbiguous(
                f"{len(holders)} instances qualify as the gateway of {deployment} ({names}): "
                "refusing to sync either until one is gone"
            )
        return holders[0]["InstanceId"], standbys

    def _is_member(self, raw: dict) -> bool:
        """In our VPC and in the gateway's group (when known): a gateway of ours, G or not."""
        if self._vpc_id is not None and raw.get("VpcId") != self._vpc_id:
            return False
        if self._gateway_group is not None:
            tags = {t.get("Key"): t.get("Value") for t in raw.get("Tags", [])}
            if tags.get(GROUP_TAG) != self._gateway_group:
                return False
        return True

    def _is_standby(self, raw: dict) -> bool:
        """A gateway of ours without G: only a member of the gateway's Auto Scaling group can
        be told from an instance merely tagged like one (without the group known: none)."""
        return self._gateway_group is not None and self._is_member(raw)

    def _is_gateway(self, raw: dict) -> bool:
        """Holds G on one of its interfaces, in our VPC, and is in the gateway's group."""
        if not self._is_member(raw):
            return False
        for interface in raw.get("NetworkInterfaces", []):
            if self._vpc_id is not None and interface.get("VpcId", self._vpc_id) != self._vpc_id:
                continue
            addresses = [a.get("PrivateIpAddress") for a in interface.get("PrivateIpAddresses", [])]
            if self._gateway_ip in addresses or interface.get("PrivateIpAddress") == (
                self._gateway_ip
            ):
                return True
        return False

    def _where(self) -> str:
        return f" in {self._vpc_id}" if self._vpc_id else ""


def observed(raw: dict) -> ObservedInstance:
    return ObservedInstance(
        instance_id=raw["InstanceId"],
        state=raw.get("State", {}).get("Name", "unknown"),
        private_ip=parse_ipv4(raw.get("PrivateIpAddress")),
        public_ip=parse_ipv4(raw.get("PublicIpAddress")),
        subnet_id=raw.get("SubnetId"),
        vpc_id=raw.get("VpcId"),
        tags={t["Key"]: t["Value"] for t in raw.get("Tags", [])},
    )
