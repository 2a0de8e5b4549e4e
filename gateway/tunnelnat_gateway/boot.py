#!/usr/bin/env python3
"""The gateway's boot program: put G's ENI on this instance, at every boot, without the AWS CLI.

It runs from systemd units the gateway's cloud-init user data writes (stacks/gateway.py), as
verbs of the gateway software's package, with the distribution's python3 and boto3 (standard
library + boto3 only):

    tunnelnat-gateway.pyz boot [--config /etc/tunnelnat/boot.json]     (attach)
    tunnelnat-gateway.pyz restore [--file PATH ...]                    (restore-lo)

``attach`` (unit ``tunnelnat-boot``, before strongSwan and the SSM agent):
  1. reads the instance ID from IMDSv2;
  2. turns the source/destination check of the instance's primary ENI (device index 0) off, if
     it is not off already (it forwards other hosts' packets);
  3. tells systemd-networkd to leave G's ENI alone (a ``.network`` file matching its MAC,
     ``Unmanaged=yes``, sorted before netplan's), before the ENI is attached;
  4. attaches the standalone ENI holding G at device index 1 (or the next free index when EC2
     still counts 1 as taken), waiting while a replaced gateway still holds it, retrying a
     failed attach;
  5. finds the interface by the ENI's MAC address and puts G on it itself (``ip addr replace``,
     ``ip link set up``): neither networkd nor cloud-init's hotplug (turned off in the user data)
     configures it;
  6. routes the partner's endpoint T via the subnet's router from G, so IKE and ESP leave with
     source G, which the Internet gateway translates to E; with several partners (issue 23)
     every partner's T: boot.json names the first only (it is the launch template's user data,
     which must not change when a partner is added), the others are the ``partner_endpoint``
     each ConfigureTunnel run recorded in /etc/tunnelnat/tunnels/NAME.json.
In a gateway pair (``"pair": true``), the ENI held by another live instance (the pair's active)
ends the boot at step 4 as the standby (exit 0, ``"role": "standby"``, no wait): the pair agent
(the ``pair`` verb) takes the ENI over when the active falls silent.
On any failure it marks the instance Unhealthy (Auto Scaling replaces it) and exits non-zero.

``restore-lo`` (unit ``tunnelnat-restore``, before the network, after the saved ruleset was
loaded) puts the addresses ConfigureGateway (``lo-addresses``) and InstallHealthAgent
(``probe-source``) listed back on ``lo``; each line is validated.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

CONFIG_FILE = Path("/etc/tunnelnat/boot.json")
LO_ADDRESSES = Path("/etc/tunnelnat/lo-addresses")  # ConfigureGateway's (libipsec: S on lo)
PROBE_SOURCE = Path("/etc/tunnelnat/probe-source")  # InstallHealthAgent's probe source
# ConfigureTunnel's per-tunnel facts (NAME.json): each records its partner's endpoint T.
TUNNELS_DIR = Path("/etc/tunnelnat/tunnels")
IMDS = "http://169.254.169.254"
ENI_ID = re.compile(r"^eni-[0-9a-f]{8,17}$")
INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
DEVICE_INDEX = 1
# After a forced detach EC2 may keep the device index in use until the instance is stopped and
# started ("Detach a network interface", docs.aws.amazon.com/AWSEC2/latest/UserGuide/
# network-interface-attachments.html): the attach then tries the next indexes, up to this one
# (t3.small, the default type, has 3 interfaces; a smaller type refuses with its own error).
LAST_DEVICE_INDEX = 7
# systemd-networkd applies the first .network file that matches a link, all directories' files
# sorted by name (systemd.network(5)); netplan writes 10-netplan-<id>.network in
# /run/systemd/network: 05- comes first, wherever it lives.
NETWORKD_DIR = Path("/etc/systemd/network")
NETWORKD_FILE = "05-tunnelnat-gateway-eni.network"
# The subnet's own route via the primary interface stays preferred for the gateway's own
# traffic; G's prefix route is only the fallback.
ENI_ROUTE_METRIC = 1000


class BootError(RuntimeError):
    pass


class HeldByPartner(Exception):  # noqa: N818 - not an error: the pair's other gateway is active
    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


# The ENI's holder is the pair's active while it exists (a stopped instance keeps its ENIs);
# one shutting down or terminated lets go of it by itself.
HOLDER_ALIVE = ("pending", "running", "stopping", "stopped")


def log(message: str) -> None:
    print(f"tunnelnat-boot: {message}", file=sys.stderr, flush=True)


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootConfig:
    region: str
    eni_id: str
    gateway: IPv4Interface  # G with its subnet's prefix length
    partner_endpoint: IPv4Address | None = None  # T; None: no route to T (the lab, see docs)
    subnet_router: IPv4Address | None = None
    wait_seconds: float = 600.0
    poll_seconds: float = 5.0
    pair: bool = False  # a gateway pair: the ENI held by the other gateway makes this the standby

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BootConfig:
        region, eni = str(data.get("region", "")), str(data.get("eni_id", ""))
        if not REGION.fullmatch(region):
            raise BootError(f"invalid region {region!r}")
        if not ENI_ID.fullmatch(eni):
            raise BootError(f"invalid ENI ID {eni!r}")
        try:
            gateway = IPv4Interface(str(data["gateway"]))
            endpoint = data.get("partner_endpoint")
            router = data.get("subnet_router")
            partner = IPv4Address(str(endpoint)) if endpoint else None
            via = IPv4Address(str(router)) if router else None
        except (KeyError, ValueError) as exc:
            raise BootError(f"invalid boot configuration: {exc}") from None
        if (partner is None) != (via is None):
            raise BootError("partner_endpoint and subnet_router go together")
        if via is not None and via not in gateway.network:
            raise BootError(f"subnet router {via} is not in G's subnet {gateway.network}")
        pair = data.get("pair", False)
        if not isinstance(pair, bool):
            raise BootError(f"pair must be true or false, not {pair!r}")
        return cls(
            region=region,
            eni_id=eni,
            gateway=gateway,
            partner_endpoint=partner,
            subnet_router=via,
            wait_seconds=float(data.get("wait_seconds", 600)),
            poll_seconds=float(data.get("poll_seconds", 5)),
            pair=pair,
        )


# -- IMDSv2 -------------------------------------------------------------------------------------


def imds_read(base: str, path: str, timeout: float) -> str:
    """One IMDSv2 read: a session token first (the launch template requires it), then ``path``.
    OSError (urllib's HTTPError and URLError included) when IMDS does not answer it."""
    token_req = urllib.request.Request(  # noqa: S310 - link-local IMDS (or the lab's)
        f"{base}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
    )
    with urllib.request.urlopen(token_req, timeout=timeout) as reply:  # noqa: S310
        token = reply.read().decode()
    request = urllib.request.Request(  # noqa: S310
        f"{base}{path}", headers={"X-aws-ec2-metadata-token": token}
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
        return reply.read().decode().strip()


def instance_id_from_imds(base: str = IMDS, timeout: float = 2.0, attempts: int = 30) -> str:
    """The instance ID, by IMDSv2."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            instance_id = imds_read(base, "/latest/meta-data/instance-id", timeout)
        except OSError as exc:  # URLError is an OSError; IMDS may lag the network by a moment
            last = exc
            time.sleep(1)
            continue
        if not INSTANCE_ID.fullmatch(instance_id):
            raise BootError(f"IMDS returned an unexpected instance ID {instance_id!r}")
        return instance_id
    raise BootError(f"IMDS did not answer: {last}")


# -- the `ip` seam ------------------------------------------------------------------------------

Runner = Callable[[Sequence[str]], str]


def run_ip(argv: Sequence[str]) -> str:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise BootError(f"ip {' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


def reload_networkd() -> None:
    """``networkctl reload`` when systemd-networkd runs (it keeps /run/systemd/netif); a failure
    is logged, not fatal: the file is read at networkd's next start in any case."""
    if shutil.which("networkctl") is None or not Path("/run/systemd/netif").is_dir():
        return
    proc = subprocess.run(
        ["networkctl", "reload"], capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        log(f"networkctl reload: {proc.stderr.strip()}")


def unmanaged_network(mac: str, eni_id: str) -> str:
    """The .network file that keeps systemd-networkd off G's ENI (systemd.network(5), [Link]
    Unmanaged=): on Ubuntu 24.04 netplan renders networkd's configuration, and a netplan file
    for the ENI (cloud-init's hotplug, or a boot that re-renders the network from IMDS) would
    have networkd run DHCP on the link and remove the addresses and routes the boot and the pair
    agent put there (issue 20, defect 5)."""
    return (
        f"# tunnelnat: {eni_id} (G) is configured by tunnelnat-boot and tunnelnat-pair only\n"
        f"[Match]\nMACAddress={mac}\n\n[Link]\nUnmanaged=yes\n"
    )


@dataclass
class Links:
    """Everything the boot does to the kernel's interfaces, through ``ip`` (faked in tests), and
    networkd's file for G's ENI (written only where ``networkd_dir`` says; ``main`` says
    /etc/systemd/network, which persists: after a reboot the ENI is there before the boot)."""

    run: Runner = run_ip
    networkd_dir: Path | None = None
    reload: Callable[[], None] = reload_networkd

    def unmanage(self, mac: str, eni_id: str) -> bool:
        """networkd leaves the link with this MAC alone; True if the file was (re)written."""
        if self.networkd_dir is None:
            return False
        path = self.networkd_dir / NETWORKD_FILE
        text = unmanaged_network(mac, eni_id)
        if path.exists() and path.read_text() == text:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(path)
        self.reload()
        return True

    def by_mac(self, mac: str) -> str | None:
        for link in json.loads(self.run(["-j", "link", "show"]) or "[]"):
            if str(link.get("address", "")).lower() == mac:
                return str(link["ifname"])
        return None

    def configure(self, dev: str, address: IPv4Interface) -> None:
        self.run(["addr", "replace", str(address), "dev", dev, "metric", str(ENI_ROUTE_METRIC)])
        self.run(["link", "set", dev, "up"])

    def route(self, dest: IPv4Address, via: IPv4Address, dev: str, src: IPv4Address) -> None:
        self.run(["route", "replace", f"{dest}/32", "via", str(via), "dev", dev, "src", str(src)])

    def add_lo(self, address: IPv4Address) -> None:
        self.run(["addr", "replace", f"{address}/32", "dev", "lo"])


def routable_endpoint(value: object, gateway: IPv4Interface) -> IPv4Address | None:
    """``value`` as a partner's endpoint T worth a host route via the subnet's router, or None.
    A T is a public address or a private one outside G's subnet (core/config.py refuses the
    rest): a damaged or hand-edited record must never route loopback, IMDS's link-local
    address, multicast or G's own subnet away from where they are."""
    try:
        address = IPv4Address(str(value))
    except ValueError:
        return None
    if (
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or address in gateway.network
    ):
        return None
    return address


def recorded_endpoints(directory: Path | None, gateway: IPv4Interface) -> list[IPv4Address]:
    """Every partner endpoint ConfigureTunnel recorded in ``directory`` (its NAME.json's
    ``partner_endpoint``), in address order, each once; records without one (written before
    issue 23) or damaged ones are skipped: their tunnel's T is boot.json's own."""
    if directory is None:
        return []
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    found: set[IPv4Address] = set()
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "partner_endpoint" in data:
            endpoint = routable_endpoint(data["partner_endpoint"], gateway)
            if endpoint is not None:
                found.add(endpoint)
    return sorted(found)


def partner_routes(
    links: Links, config: BootConfig, dev: str, tunnels_dir: Path | None = None
) -> list[str]:
    """``T via <subnet router> dev <G's link> src G`` for the configuration's T and every T
    recorded in ``tunnels_dir`` (several partners), so IKE and ESP to each partner leave from
    G (the Internet gateway translates only G to E: from the primary interface they would leave
    with another source, or none). ``ip route replace``: run again, nothing changes. None when
    the configuration routes no T (the lab: E sits on G's link itself)."""
    if config.partner_endpoint is None or config.subnet_router is None:
        return []
    endpoints = [config.partner_endpoint]
    endpoints += [t for t in recorded_endpoints(tunnels_dir, config.gateway) if t not in endpoints]
    routes = []
    for endpoint in endpoints:
        links.route(endpoint, config.subnet_router, dev, config.gateway.ip)
        routes.append(f"{endpoint} via {config.subnet_router} dev {dev}")
    return routes


# -- the boot -----------------------------------------------------------------------------------


@dataclass
class Boot:
    config: BootConfig
    ec2: Any
    instance_id: str
    links: Links
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    # ConfigureTunnel's records (every partner's T); None: the configuration's T only. main()
    # passes TUNNELS_DIR; tests their own directory.
    tunnels_dir: Path | None = None

    def eni(self) -> dict[str, Any]:
        reply = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[self.config.eni_id])
        return reply["NetworkInterfaces"][0]

    def holder(self, eni: dict[str, Any]) -> str | None:
        attachment = eni.get("Attachment") or {}
        if attachment.get("Status") in ("detaching", "detached"):
            return None
        return attachment.get("InstanceId")

    def attach_eni(self) -> dict[str, Any]:
        """Attach the ENI here, waiting for a replaced gateway to release it; retry failures."""
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = self.clock() + self.config.wait_seconds
        attempts = 0
        while True:
            eni = self.eni()
            holder = self.holder(eni)
            if holder == self.instance_id:
                return eni
            if eni.get("Status") == "available" and holder is None:
                attempts += 1
                try:
                    index = attach_at_free_index(self.ec2, self.config.eni_id, self.instance_id)
                    log(f"attached {self.config.eni_id} at device index {index}")
                    continue  # re-read: the attachment is what we wait for, not the call
                except (ClientError, BotoCoreError) as exc:
                    log(f"attach failed ({exc}); retrying")
            elif self.config.pair and holder is not None and self.alive(holder):
                raise HeldByPartner(holder)
            else:
                log(f"{self.config.eni_id} is {eni.get('Status')} (held by {holder}): waiting")
            if self.clock() >= deadline:
                raise BootError(
                    f"{self.config.eni_id} not attached after {self.config.wait_seconds:.0f}s "
                    f"({attempts} attach attempts)"
                )
            self.sleep(self.config.poll_seconds)

    def alive(self, instance_id: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            reply = self.ec2.describe_instances(InstanceIds=[instance_id])
        except ClientError as exc:  # gone from EC2's answers: not alive
            log(f"{instance_id}: {exc}")
            return False
        states = [
            i.get("State", {}).get("Name")
            for r in reply.get("Reservations", [])
            for i in r.get("Instances", [])
        ]
        return any(state in HOLDER_ALIVE for state in states)

    def wait_for_link(self, mac: str, seconds: float = 120.0, poll: float = 0.1) -> str:
        # Polled finely: a takeover waits here between the attach and G, and each poll is one
        # cheap `ip -o link` (the link appears about 0.1 s after EC2 reports it attached in the
        # lab; seconds later on AWS).
        deadline = self.clock() + seconds
        while True:
            dev = self.links.by_mac(mac)
            if dev:
                return dev
            if self.clock() >= deadline:
                raise BootError(f"no interface has the ENI's MAC address {mac}")
            self.sleep(poll)

    def primary_interface(self) -> dict[str, Any]:
        """This instance's primary ENI (device index 0 on network card 0), from EC2."""
        from botocore.exceptions import ClientError

        for attempt in range(5):
            try:
                reply = self.ec2.describe_instances(InstanceIds=[self.instance_id])
                break
            except ClientError as exc:
                # EC2's API is eventually consistent: a just-launched instance may be unknown to
                # it for a moment (docs.aws.amazon.com/ec2/latest/devguide/
                # eventual-consistency.html).
                code = exc.response.get("Error", {}).get("Code")
                if code != "InvalidInstanceID.NotFound" or attempt == 4:
                    raise
                self.sleep(2.0)
        for reservation in reply.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                for interface in instance.get("NetworkInterfaces", []):
                    attachment = interface.get("Attachment") or {}
                    if (
                        attachment.get("DeviceIndex") == 0
                        and attachment.get("NetworkCardIndex", 0) == 0
                    ):
                        return interface
        raise BootError(f"{self.instance_id} has no primary network interface in EC2's answer")

    def source_dest_check_off(self) -> str:
        """Forwarded packets carry other hosts' addresses: the check is off on G's ENI (in the
        template) and here on the primary ENI, which forwards to the instances. Not the
        instance's attribute: EC2 refuses ModifyInstanceAttribute(SourceDestCheck) on an
        instance with several interfaces, which a gateway is after a reboot or a stop/start
        with G's ENI still attached ("There are multiple interfaces attached to instance";
        aws/aws-cdk#13791, hashicorp/terraform-provider-aws#7107; kubernetes/kubernetes#92800
        modifies the device-index-0 interface instead)."""
        primary = self.primary_interface()
        eni_id = str(primary.get("NetworkInterfaceId", ""))
        if not ENI_ID.fullmatch(eni_id):
            raise BootError(f"unexpected primary network interface ID {eni_id!r}")
        if primary.get("SourceDestCheck") is False:
            return "already off"
        self.ec2.modify_network_interface_attribute(
            NetworkInterfaceId=eni_id, SourceDestCheck={"Value": False}
        )
        log(f"source/destination check off on {eni_id}")
        return "turned off"

    def run(self) -> dict[str, Any]:
        cfg = self.config
        check = self.source_dest_check_off()
        # networkd is told to leave G's link alone before the link can appear (first boot) or
        # is configured again by us (a reboot: the ENI was attached all along).
        mac = str(self.eni().get("MacAddress", "")).lower()
        if not MAC.fullmatch(mac):
            raise BootError(f"{cfg.eni_id} has no usable MAC address ({mac!r})")
        if self.links.unmanage(mac, cfg.eni_id):
            log(f"networkd leaves {mac} ({cfg.eni_id}) alone")
        try:
            eni = self.attach_eni()
        except HeldByPartner as held:
            # The pair's standby: G stays where it is; tunnelnat-pair watches the active.
            log(f"{cfg.eni_id} is held by {held.holder}, the active of the pair: standby")
            return {
                "eni": cfg.eni_id,
                "holder": held.holder,
                "instance": self.instance_id,
                "role": "standby",
                "source_dest_check": check,
            }
        dev = self.wait_for_link(mac)
        self.links.configure(dev, cfg.gateway)
        result: dict[str, Any] = {
            "eni": cfg.eni_id,
            "device": dev,
            "device_index": (eni.get("Attachment") or {}).get("DeviceIndex"),
            "gateway": str(cfg.gateway),
            "instance": self.instance_id,
            "role": "active",
            "source_dest_check": check,
        }
        routes = partner_routes(self.links, cfg, dev, self.tunnels_dir)
        if routes:
            result["partner_route"] = routes[0]  # boot.json's T, as before issue 23
        if len(routes) > 1:
            result["partner_routes"] = routes  # every partner's (ConfigureTunnel's records)
        return result


def index_in_use(exc: Exception) -> bool:
    """EC2's refusal of a device index it counts as taken: ``InvalidParameterValue: Instance
    'i-…' already has an interface attached at device index '1'.`` (quoted in
    hashicorp/terraform-provider-aws#906 and lstoll/k8s-vpcnet#71)."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    return error.get("Code") == "InvalidParameterValue" and "device index" in str(
        error.get("Message", "")
    )


def attach_at_free_index(
    ec2: Any,
    eni_id: str,
    instance_id: str,
    first: int = DEVICE_INDEX,
    last: int = LAST_DEVICE_INDEX,
) -> int:
    """AttachNetworkInterface at ``first``, or at the next index EC2 accepts when it says the
    index is taken (after a forced detach EC2 may keep it until a stop/start); any other error
    is raised. The device index is the attach's only choice: the link is found by its MAC."""
    for index in range(first, last + 1):
        try:
            ec2.attach_network_interface(
                NetworkInterfaceId=eni_id, InstanceId=instance_id, DeviceIndex=index
            )
            return index
        except Exception as exc:
            if not index_in_use(exc) or index == last:
                raise
            log(f"device index {index} is still taken on {instance_id}: trying {index + 1}")
    raise AssertionError("unreachable")  # pragma: no cover


def mark_unhealthy(autoscaling: Any, instance_id: str) -> None:
    """Tell Auto Scaling to replace this gateway: it never sits broken and quiet."""
    try:
        autoscaling.set_instance_health(
            InstanceId=instance_id, HealthStatus="Unhealthy", ShouldRespectGracePeriod=False
        )
        log(f"marked {instance_id} Unhealthy")
    except Exception as exc:  # noqa: BLE001 - the boot fails either way; say why this did too
        log(f"could not mark {instance_id} Unhealthy: {type(exc).__name__}: {exc}")


def restore_lo(paths: Sequence[Path], links: Links) -> list[str]:
    restored: list[str] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            address = ipaddress.IPv4Address(line.strip())  # ValueError: refused, never passed on
            if str(address) not in restored:
                links.add_lo(address)
                restored.append(str(address))
    return restored


def _clients(region: str) -> tuple[Any, Any]:
    import boto3  # the distribution's; only the attach needs it
    from botocore.config import Config

    config = Config(retries={"mode": "adaptive", "max_attempts": 10}, connect_timeout=5)
    session = boto3.session.Session(region_name=region)
    return session.client("ec2", config=config), session.client("autoscaling", config=config)


def main(argv: list[str] | None = None, *, links: Links | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelnat-gateway boot")
    sub = parser.add_subparsers(dest="command", required=True)
    attach = sub.add_parser("attach")
    attach.add_argument("--config", type=Path, default=CONFIG_FILE)
    restore = sub.add_parser("restore-lo")
    restore.add_argument("--file", type=Path, action="append", dest="files")
    args = parser.parse_args(argv)
    links = links or Links(networkd_dir=NETWORKD_DIR)

    if args.command == "restore-lo":
        try:
            restored = restore_lo(args.files or [LO_ADDRESSES, PROBE_SOURCE], links)
        except (ValueError, BootError) as exc:
            log(f"restore-lo FAILED: {exc}")
            return 1
        print(json.dumps({"lo": restored}))
        return 0

    started = time.monotonic()
    instance_id = None
    autoscaling = None
    try:
        config = BootConfig.from_json(json.loads(args.config.read_text()))
        # The lab serves its own IMDS on loopback (boto3 reads AWS_ENDPOINT_URL likewise).
        instance_id = instance_id_from_imds(os.environ.get("TUNNELNAT_IMDS_URL", IMDS))
        ec2, autoscaling = _clients(config.region)
        result = Boot(config, ec2, instance_id, links, tunnels_dir=TUNNELS_DIR).run()
    except Exception as exc:  # noqa: BLE001 - every failure ends the same way: loudly
        log(f"FAILED: {type(exc).__name__}: {exc}")
        if instance_id is not None and autoscaling is not None:
            mark_unhealthy(autoscaling, instance_id)
        return 1
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result, sort_keys=True))
    log(f"ready: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
