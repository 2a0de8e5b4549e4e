"""The lab's plan: the names, addresses and paths every lab module shares.

A leaf module (it imports nothing of the lab but the document runner's REPO): lab.topology builds
the machines from it, lab.aws and lab.autoscaling name AWS's resources from it, lab.commands
finds the machines' mount namespaces by it, and none of them needs another to do so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lab.ssm_runner import REPO

PREFIX = "tn-"
RUN = Path("/run/tn-lab")
MACHINES = RUN / "machines"
MNT = RUN / "mnt"
PIDS = RUN / "pids"
LOGS = RUN / "logs"

VPC_CIDR = "10.10.0.0/16"
SUBNET_CIDR = "10.10.1.0/24"
# A private subnet of the same VPC: its instances reach the partner only through the VPC router,
# by their subnet's route table (route-table mode). The router has each subnet's base + 1, as
# AWS's implicit router does (AWS reserves that address for it).
PRIVATE_CIDR = "10.10.2.0/24"
VPC_ROUTER = "10.10.1.1"
PRIVATE_ROUTER = "10.10.2.1"
ROUTER_NS = "tn-vpcrtr"
GW_PRIMARY = "10.10.1.10"
# The gateway pair (issue 15): the standby's machine, on the same subnet as the first gateway.
STANDBY_NS = "tn-gw2"
STANDBY_PRIMARY = "10.10.1.11"
GATEWAY_MACHINES = {"tn-gw": GW_PRIMARY, STANDBY_NS: STANDBY_PRIMARY}
PUBLIC_LINK = "eth1"  # E's side, towards tn-inet: it moves with the ENI (lab.eni_mirror)
HEARTBEAT_PORT = 7465  # the pair agents' heartbeats (PAIR.md)
GW_ENI = "10.10.1.5"  # G: the fixed ENI address instances route via
ENI_LINK = "eni0"  # the gateway's second interface: the ENI holding G (the boot program finds
# it by the MAC moto reports for the ENI and configures G on it)
GW_PUBLIC = "198.51.100.10"  # E
INET_GW_SIDE = "198.51.100.1"
INET_PARTNER_SIDE = "198.51.100.33"
PARTNER_ENDPOINT = "198.51.100.40"  # T
PARTNER_NET = "192.0.2.0/24"
PARTNER_INSIDE = "192.0.2.1"
APP = "192.0.2.80"  # A
# S, dedicated mode: room for web-1, web-2 and an Auto Scaling burst of 20 (and a few spare).
POOL = tuple(f"203.0.113.{n}" for n in range(10, 50))
SHARED = "203.0.113.100"  # S, shared mode
APP_PORT = 8080
INSTANCE_PORT = 8081
REGION = "us-east-1"
TABLE = "tunnelnat-lab"
PSK_SECRET = "tunnelnat/lab/psk"  # noqa: S105 - a secret's name, not a secret
DEPLOYMENT = "lab"
TUNNEL = "partner"
# ConfigureTunnel's CharonLog in the lab: where the document allows it (a file directly in
# /var/log/tunnelnat), on the machine's own /var/log (a tmpfs of its mount namespace).
CHARON_LOG = "/var/log/tunnelnat/charon.log"
# The shell scripts in the namespaces see moto on this loopback port (bridged, see start_moto).
MOTO_NS_PORT = 5000
IMDS_NS_PORT = 5001  # the gateway's IMDSv2 (lab.imds), on its own loopback
GATEWAY_DIR = REPO / "gateway"
# The units the gateway's user data installs (stacks/gateway.py BOOT_UNITS), same files.
GATEWAY_UNITS = ("tunnelnat-restore.service", "tunnelnat-boot.service", "tunnelnat-sync.service")
PAIR_UNIT = "tunnelnat-pair.service"  # the pair's user data adds it
UNIT_SOURCE = GATEWAY_DIR / "systemd"  # where the user data's units come from
# The pair's machines by number: each its own AWS access key id (``gateway_access_key``), as each
# EC2 instance gets its own role session credentials; the strict fakes (tools/aws_strict.py) tell
# the callers apart by the key id in SigV4's Authorization header (moto accepts any key).
GATEWAY_NUMBERS = {"tn-gw": 1, STANDBY_NS: 2, "tn-gw3": 3, "tn-gw4": 4}
# The machines a rolling replacement launches (lab.pair_stories), in order, with their primaries.
REPLACEMENT_MACHINES = {"tn-gw3": "10.10.1.12", "tn-gw4": "10.10.1.13"}
# The pair agents' heartbeat key (Secrets Manager; pair.json's key_secret), the gateway group's
# termination hook and the files the agents use (PAIR.md; issue 20's contracts).
PAIR_KEY_SECRET = "tunnelnat/lab/pair-key"  # noqa: S105 - a secret's name, not a secret
# As stacks/gateway.py terminating_hook_name() names it (not the controller's tunnelnat- hooks).
GATEWAY_TERMINATE_HOOK = f"gateway-{DEPLOYMENT}-terminating"
SIGNAL_STACK = f"tunnelnat-{DEPLOYMENT}"  # the stack whose rolling update waits for signals
SIGNAL_RESOURCE = "GatewayGroup"  # the gateway group's logical ID in it
ROLE_FILE = "/etc/tunnelnat/pair-role"
REQUEST_FILE = "/etc/tunnelnat/switchover"  # the switchover request (the Switchover document's)
KEY_FILE = "/etc/tunnelnat/pair.key"
IMDS_STATE = RUN / "imds"  # <ns>.lifecycle: the target lifecycle state each machine's IMDS serves


def gateway_access_key(ns: str) -> str:
    """Gateway machine ``ns``'s own access key id: AKIATNGW<n> padded to 20 characters."""
    number = GATEWAY_NUMBERS.get(ns)
    if number is None:
        raise KeyError(f"{ns} is not a gateway machine")
    return f"AKIATNGW{number}".ljust(20, "X")


# As the stack tags the gateway (stacks/settings.py ROLE_TAG, DEPLOYMENT_TAG, GATEWAY_TAG).
# The gateways' Auto Scaling group: Auto Scaling tags every instance it launches with its name,
# and the controller counts a tagged gateway without G as the pair's standby only in that group.
# Named as the stack names it (stacks/settings.py gateway_group_name: <deployment>-gateway); the
# CLI, the healer and the associations find the gateways by it (issue 21).
GATEWAY_GROUP = f"{DEPLOYMENT}-gateway"
GATEWAY_TAGS = {
    "tunnelnat:role": "gateway",
    "tunnelnat:deployment": DEPLOYMENT,
    "tunnelnat:gateway": DEPLOYMENT,
    "aws:autoscaling:groupName": GATEWAY_GROUP,
}
ENROLMENT_TAG = ("tunnelnat", "enabled")
# The web group's launch template (lab.autoscaling); the gateway group launches from it too.
WEB_TEMPLATE = f"{DEPLOYMENT}-web"


class LabError(RuntimeError):
    pass


@dataclass
class Instance:
    name: str  # "web-1"
    ns: str  # "tn-web-1"
    private_ip: str
    instance_id: str = ""


def instance_ip(n: int) -> str:
    if not 1 <= n <= 200:
        raise ValueError("the lab's subnet has room for instances 1..200")
    return f"10.10.1.{20 + n}"


def private_instance_ip(n: int) -> str:
    if not 1 <= n <= 20:
        raise ValueError("the lab's private subnet has room for instances 1..20")
    return f"10.10.2.{20 + n}"


def mount_ns_path(ns: str) -> Path:
    return MNT / ns
