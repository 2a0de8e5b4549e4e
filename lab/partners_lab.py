"""Three partners on one gateway (issue 23): the lab's machines, peers and lanes.

    tn-web-1 ─┐                        ┌ .33 ─ tn-pvpn   card (IKEv2)    ─ tn-app   192.0.2.80
    tn-web-2 ─┴ br0 ─ tn-gw ─ tn-inet ─┼ .49 ─ tn-pvpn-b bank (IKEv1)    ─ tn-app-b 172.20.0.80
                      G, E             └ .65 ─ tn-pvpn-c clearing (IKEv2) ─ tn-app-c 192.0.2.80

``card`` is today's AWS-like peer (lab/partners.py's ``aws`` profile). ``bank`` is a legacy
policy-based appliance speaking IKEv1 main mode, one selector pair per CHILD_SA, responding only.
``clearing`` speaks IKEv2 and its app server has THE SAME address as card's: instances reach it
through the alias the partners file chooses from ``alias_block`` (100.64.0.0/24). Each peer is
configured by hand, as its own engineer would (``bank_conf``, ``clearing_conf``), never from our
configuration. Each app server logs the source address it sees (lab/app_server.py).

The gateway side is what a deployment with a partners file does: the partners file ->
``Partners.lanes`` -> one SSM parameter per partner and one DynamoDB table per partner in moto
(as the stack creates them), then ConfigureGateway (``PartnersPath``), one ConfigureTunnel per
partner with that partner's settings and InstallHealthAgent, through the lab's SSM runner as the
stack's associations would send them; the controller runs with ``TUNNELNAT_PARTNERS_PATH``.

Addresses are documentation ranges (RFC 5737) for everything public; the partners' inside
networks are their own private ranges; the alias comes from RFC 6598's shared space.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import aws as lab_aws
from lab import partners as peer_profiles
from lab import topology as topo
from lab.constants import (
    APP,
    APP_PORT,
    DEPLOYMENT,
    ENROLMENT_TAG,
    GW_PUBLIC,
    LOGS,
    PARTNER_ENDPOINT,
    REGION,
    RUN,
    TUNNEL,
)
from lab.controller import LabController
from lab.ssm_runner import REPO, load_document
from tunnelnat.adapters.commands import CommandError
from tunnelnat.core.lanes import Lane, parameter_path
from tunnelnat.core.partners import Partners, ResolvedPartner

CARD, BANK, CLEARING = "card", "bank", "clearing"
NAMES = (CARD, BANK, CLEARING)


@dataclass(frozen=True)
class Site:
    """One partner's side of the lab: its VPN machine, its app server, their addresses."""

    name: str
    vpn_ns: str
    app_ns: str
    endpoint: str  # T
    inet_side: str  # tn-inet's address on the link to T (T's default route)
    inet_link: str  # that link's name in tn-inet
    inside: str  # the VPN machine's address on the app server's network
    app: str  # the app server's address (real)
    app_prefix: int
    extra: tuple[str, ...] = ()  # more of the partner's networks, on the VPN machine's lo

    @property
    def app_log(self) -> Path:
        return LOGS / ("app-peers.log" if self.app_ns == "tn-app" else f"{self.app_ns}-peers.log")

    @property
    def app_name(self) -> str:
        return self.app_ns.removeprefix(topo.PREFIX)


SITES = {
    # Today's partner machines (lab.topology builds them).
    CARD: Site(CARD, "tn-pvpn", "tn-app", PARTNER_ENDPOINT, "198.51.100.33", "to-pvpn",
               "192.0.2.1", APP, 24),
    BANK: Site(BANK, "tn-pvpn-b", "tn-app-b", "198.51.100.56", "198.51.100.49", "to-pvpn-b",
               "172.20.0.1", "172.20.0.80", 24, extra=("172.20.5.1/28",)),
    # Its app server at the very address of card's: the overlap.
    CLEARING: Site(CLEARING, "tn-pvpn-c", "tn-app-c", "198.51.100.72", "198.51.100.65",
                   "to-pvpn-c", "192.0.2.1", APP, 24),
}  # fmt: skip
# The machines this lab adds to lab.topology's (topology.is_lab_namespace knows them).
EXTRA_MACHINES = ("tn-pvpn-b", "tn-app-b", "tn-pvpn-c", "tn-app-c")
BANK_ID = "vpn.bank.example"  # the bank's IKE identity: its appliance's hostname
PARTNERS_FILE = RUN / "partners.yaml"

# The partners file of the lab, as an operator writes it (docs/partners.md's shape).
PARTNERS_YAML = f"""\
# The lab's three partners on one gateway (lab/partners_lab.py).
alias_block: 100.64.0.0/10
partners:
  # An AWS Site-to-Site-like peer: IKEv2, it initiates too.
  - name: {CARD}
    endpoint: {SITES[CARD].endpoint}
    networks: [192.0.2.0/24]
    auth: {{psk_secret: tunnelnat/lab/psk-{CARD}}}
    nat: {{mode: dedicated, pool: [203.0.113.10, 203.0.113.11]}}
  # A bank's legacy appliance: IKEv1 main mode, policy-based (one selector pair per SA), a
  # hostname as its identity; two networks.
  - name: {BANK}
    endpoint: {SITES[BANK].endpoint}
    networks: [172.20.0.0/24, 172.20.5.0/28]
    ike_version: 1
    auth: {{psk_secret: tunnelnat/lab/psk-{BANK}}}
    remote_id: {BANK_ID}
    dpd: {{delay: 5, timeout: 10}}     # its operator asks for quick dead-peer detection
    nat: {{mode: dedicated, pool: [203.0.113.20, 203.0.113.21]}}
  # A clearing house whose network is card's: reached through an alias from alias_block.
  - name: {CLEARING}
    endpoint: {SITES[CLEARING].endpoint}
    networks: [192.0.2.0/24]
    auth: {{psk_secret: tunnelnat/lab/psk-{CLEARING}}}
    proposals:
      ike: [aes256-sha384-modp3072]
      esp: [aes256-sha384-modp3072]
    nat: {{mode: dedicated, pool: [203.0.113.30, 203.0.113.31]}}
"""


def load_partners(path: Path | None = None) -> Partners:
    """The lab's partners file, validated as the stack validates it (the lab's VPC, G's
    subnet)."""
    if path is None:
        path = PARTNERS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PARTNERS_YAML)
    return Partners.from_file(path, vpc_cidr=topo.VPC_CIDR, gateway_subnet=topo.SUBNET_CIDR)


# -- the partners' own configurations (their engineers', not ours) -----------------------------


def bank_conf(psk: str, our_addresses: list[str], networks: list[str]) -> str:
    """The bank's appliance: IKEv1 main mode (never aggressive), one proposal, policy-based:
    one CHILD_SA per (its network, our S), as an ASA crypto map's ACL lines; it only responds.
    ``encap`` is the lab's (ESP in UDP for kernel-libipsec, ../shared/LAB-NOTES.md)."""
    site = SITES[BANK]
    proposal = "aes256-sha256-modp2048"
    children = []
    n = 0
    for net in networks:
        for address in our_addresses:
            n += 1
            children.append(
                f"""
      acl-{n} {{
        local_ts = {net}
        remote_ts = {address}/32
        esp_proposals = {proposal}
        life_time = 3600s
        rekey_time = 3240s
        rand_time = 180s
        dpd_action = clear
        start_action = none
      }}"""
            )
    return f"""\
# The bank's appliance (lab): IKEv1 main mode, policy-based, responder only.
connections {{
  tunnelnat {{
    version = 1
    aggressive = no
    local_addrs = {site.endpoint}
    remote_addrs = {GW_PUBLIC}
    encap = yes
    unique = replace
    proposals = {proposal}
    reauth_time = 28800s
    over_time = 270s
    dpd_delay = 10s
    dpd_timeout = 30s
    local {{
      auth = psk
      id = {BANK_ID}
    }}
    remote {{
      auth = psk
      id = {GW_PUBLIC}
    }}
    children {{{"".join(children)}
    }}
  }}
}}
secrets {{
  ike-tunnelnat {{
    id-1 = {BANK_ID}
    id-2 = {GW_PUBLIC}
    secret = "{psk}"
  }}
}}
"""


def clearing_conf(psk: str, our_addresses: list[str], network: str) -> str:
    """The clearing house: IKEv2, its own proposal (AES-256, SHA-384, MODP-3072), one CHILD_SA
    for its network <-> our S; it only responds. Its network is card's: it cannot know."""
    site = SITES[CLEARING]
    proposal = "aes256-sha384-modp3072"
    return f"""\
# The clearing house (lab): IKEv2, responder only.
connections {{
  tunnelnat {{
    version = 2
    local_addrs = {site.endpoint}
    remote_addrs = {GW_PUBLIC}
    encap = yes
    unique = replace
    proposals = {proposal}
    rekey_time = 14400s
    dpd_delay = 10s
    local {{
      auth = psk
      id = {site.endpoint}
    }}
    remote {{
      auth = psk
      id = {GW_PUBLIC}
    }}
    children {{
      clearing {{
        local_ts = {network}
        remote_ts = {",".join(f"{a}/32" for a in our_addresses)}
        esp_proposals = {proposal}
        life_time = 3600s
        rekey_time = 3000s
        dpd_action = clear
        start_action = none
      }}
    }}
  }}
}}
secrets {{
  ike-tunnelnat {{
    id-1 = {GW_PUBLIC}
    secret = "{psk}"
  }}
}}
"""


# -- what the stack does per lane, as parameters -----------------------------------------------


def tunnel_parameters(resolved: ResolvedPartner, lane: Lane) -> dict[str, str]:
    """ConfigureTunnel's parameters for one partner, as the stack's association passes them
    (docs/stack.md): its real networks, its S, its own secret, proposals, lifetimes, DPD, IDs,
    layout, start action and IKE version; the lab's backend and log."""
    p = resolved.partner
    return {
        "TunnelName": p.name,
        "PartnerEndpoint": str(p.endpoint),
        "PartnerNetworks": ",".join(str(n) for n in resolved.real_networks),
        "PublicAddresses": ",".join(str(a) for a in lane.public_addresses),
        "LocalId": p.local_id or GW_PUBLIC,
        "RemoteId": p.remote_id or "",
        "PskSecretName": str(p.auth.psk_secret),
        "IpsecBackend": "libipsec",
        "IkeProposals": ",".join(p.proposals.ike),
        "EspProposals": ",".join(p.proposals.esp),
        "IkeLifetimes": ",".join(str(v) for v in p.lifetimes.ike),
        "ChildLifetimes": ",".join(str(v) for v in p.lifetimes.child),
        "Dpd": f"{p.dpd.delay},{p.dpd.timeout}",
        "SelectorLayout": p.layout,
        "StartAction": p.start_action,
        "IkeVersion": str(p.ike_version),
        "CharonLog": topo.CHARON_LOG,
        "Region": REGION,
    }


def lanes_digest(lanes: tuple[Lane, ...]) -> str:
    """PartnersDigest as the stack computes it: sha256 of the lanes' JSON, in index order."""
    joined = "\n".join(lane.to_json() for lane in lanes)
    return hashlib.sha256(joined.encode()).hexdigest()


@dataclass(frozen=True)
class Refused:
    """A document SendCommand refused before it ran (CommandResult's shape, for reports)."""

    document: str
    stderr: str
    status: str = "Refused"
    stdout: str = ""
    ok: bool = False


def declared(document: str) -> set[str]:
    return set(load_document(REPO / "ssm_documents" / f"{document}.yaml")["parameters"])


def accepts(document: str, parameter: str, value: str) -> bool:
    """Whether ``document``'s ``parameter`` takes ``value`` (its allowedPattern)."""
    spec = load_document(REPO / "ssm_documents" / f"{document}.yaml")["parameters"][parameter]
    return re.fullmatch(spec["allowedPattern"], value) is not None


# -- the lab ------------------------------------------------------------------------------------


@dataclass
class PartnersLab(topo.Lab):
    """lab.topology's Lab plus bank's and clearing's machines, their peers and app servers, the
    lanes in moto. ``configure_partners()`` then runs the gateway's documents for three
    partners. No private subnet instances (the partners story does not use them)."""

    private_count: int = 0
    partners_plan: Any = None  # core.partners.Partners
    lanes: tuple[Lane, ...] = ()
    psks: dict[str, str] = field(default_factory=dict)
    configured: dict[str, Any] = field(default_factory=dict)  # document/tunnel -> CommandResult
    health_tunnels: list[str] = field(default_factory=list)  # what InstallHealthAgent watches

    # -- machines -------------------------------------------------------------------------------
    def machines(self) -> list[str]:
        return [*super().machines(), *EXTRA_MACHINES]

    def build(self) -> None:
        self.partners_plan = load_partners()
        self.lanes = self.partners_plan.lanes(DEPLOYMENT, ENROLMENT_TAG[0])
        self.psks = {name: secrets.token_hex(24) for name in NAMES}
        super().build()

    def _build_network(self) -> None:
        super()._build_network()
        for name in (BANK, CLEARING):
            site = SITES[name]
            self._veth("tn-inet", site.inet_link, site.vpn_ns, "eth0")
            topo.sh(["ip", "-n", "tn-inet", "addr", "add", f"{site.inet_side}/28", "dev",
                     site.inet_link])  # fmt: skip
            topo.sh(["ip", "-n", site.vpn_ns, "addr", "add", f"{site.endpoint}/28", "dev", "eth0"])
            topo.sh(["ip", "-n", site.vpn_ns, "route", "add", "default", "via", site.inet_side])
            self._veth(site.vpn_ns, "eth1", site.app_ns, "eth0")
            prefix = site.app_prefix
            topo.sh(["ip", "-n", site.vpn_ns, "addr", "add", f"{site.inside}/{prefix}", "dev",
                     "eth1"])  # fmt: skip
            for extra in site.extra:
                topo.sh(["ip", "-n", site.vpn_ns, "addr", "add", extra, "dev", "lo"])
            topo.sh(["ip", "netns", "exec", site.vpn_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            topo.sh(["ip", "-n", site.app_ns, "addr", "add", f"{site.app}/{prefix}", "dev", "eth0"])
            topo.sh(["ip", "-n", site.app_ns, "route", "add", "default", "via", site.inside])

    def lane(self, name: str) -> Lane:
        return next(lane for lane in self.lanes if lane.name == name)

    def our_addresses(self, name: str) -> list[str]:
        return [str(a) for a in self.lane(name).public_addresses]

    def _configure_partner(self) -> None:
        super()._configure_partner()  # card's (tn-pvpn) and the gateway's strongswan.conf
        for name in (BANK, CLEARING):
            ns = SITES[name].vpn_ns
            self.write_etc(ns, "strongswan.conf", self._strongswan_conf(ns))
        self.write_etc(
            "tn-pvpn-b",
            "swanctl/conf.d/tunnelnat.conf",
            bank_conf(
                self.psks[BANK],
                self.our_addresses(BANK),
                [str(n) for n in self.lane(BANK).networks],
            ),
            mode=0o600,
        )
        self.write_etc(
            "tn-pvpn-c",
            "swanctl/conf.d/tunnelnat.conf",
            clearing_conf(
                self.psks[CLEARING],
                self.our_addresses(CLEARING),
                str(self.lane(CLEARING).networks[0]),
            ),
            mode=0o600,
        )

    def write_partner(self, profile: str, **lifetimes: int) -> None:
        """card's side: today's AWS-like peer, whitelisting card's S only, with card's PSK."""
        conf = peer_profiles.render(
            peer_profiles.PROFILES[profile],
            psk=self.psks[CARD],
            endpoint=PARTNER_ENDPOINT,
            gateway=GW_PUBLIC,
            partner_net=str(self.lane(CARD).networks[0]),
            our_selectors=[f"{a}/32" for a in self.our_addresses(CARD)],
            tunnel=TUNNEL,
            **lifetimes,
        )
        self.write_etc("tn-pvpn", "swanctl/conf.d/tunnelnat.conf", conf, mode=0o600)

    def _start_servers(self) -> None:
        super()._start_servers()
        for name in (BANK, CLEARING):
            site = SITES[name]
            self._start_charon(site.vpn_ns)
            topo.in_ns(site.vpn_ns, ["swanctl", "--load-all", "--noprompt"])
            py = str(REPO / ".venv" / "bin" / "python")
            argv = [py, "-m", "lab.app_server", "--name", site.app_name]
            argv += ["--port", str(APP_PORT), "--log", str(site.app_log)]
            self.spawn(site.app_name, site.app_ns, argv)
        for name in (BANK, CLEARING):
            self.wait_listening(SITES[name].app_ns, APP_PORT)

    def _seed_aws(self) -> None:
        super()._seed_aws()
        self.publish_lanes()

    def publish_lanes(self) -> None:
        """What the stack creates per partner: its PSK secret, its table (the deployment table's
        schema), its lane parameter."""
        ssm = self.aws.client("ssm")
        dynamodb = self.aws.client("dynamodb")
        for lane in self.lanes:
            resolved = self.partners_plan[lane.name]
            self.aws.client("secretsmanager").create_secret(
                Name=str(resolved.partner.auth.psk_secret), SecretString=self.psks[lane.name]
            )
            dynamodb.create_table(
                TableName=lane.table,
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
            ssm.put_parameter(Name=lane.parameter, Value=lane.to_json(), Type="String")

    # -- the gateway's documents, as the stack's associations send them ------------------------
    def gateway_parameters(self) -> dict[str, str]:
        """ConfigureGateway's parameters with a partners file: today's, plus the lanes' path
        and digest. Its single-partner values are those of the first partner (the stack's)."""
        first = self.lane(CARD)
        return {
            "PartnerNetworks": ",".join(str(n) for n in first.networks),
            "IpsecBackend": "libipsec",
            "NatMode": "dedicated",
            "TableName": topo.TABLE,
            "Region": REGION,
            "PartnersPath": parameter_path(DEPLOYMENT),
            "PartnersDigest": lanes_digest(self.lanes),
        }

    def health_parameters(self) -> dict[str, str]:
        """InstallHealthAgent for every tunnel: the lanes' names; no probe (each partner's
        liveness is its own SAs' traffic)."""
        return {
            "TunnelName": ",".join(lane.name for lane in self.lanes),
            "Region": REGION,
            "Deployment": DEPLOYMENT,
            "HealthInterval": "10",
            "PartnerNetworks": ",".join(str(n) for lane in self.lanes for n in lane.networks),
            "PublicAddresses": ",".join(
                str(a) for lane in self.lanes for a in lane.public_addresses
            ),
        }

    def configure_partners(self) -> dict[str, Any]:
        """ConfigureGateway (PartnersPath), then ConfigureTunnel per partner, then
        InstallHealthAgent: each with the parameters its document declares (a parameter the
        tree's document does not declare yet is left out, and listed in ``missing``)."""
        results: dict[str, Any] = {}
        missing: list[str] = []
        gateway = self.aws.gateway_id
        gw_declared = declared("ConfigureGateway")
        params = self.gateway_parameters()
        missing += [f"ConfigureGateway.{k}" for k in params if k not in gw_declared]
        own = {k: v for k, v in params.items() if k in gw_declared}
        results["ConfigureGateway"] = self.commands.run(gateway, "ConfigureGateway", own)
        tunnel_declared = declared("ConfigureTunnel")
        for lane in self.lanes:
            params = tunnel_parameters(self.partners_plan[lane.name], lane)
            missing += [f"ConfigureTunnel.{k}" for k in params if k not in tunnel_declared]
            own = {k: v for k, v in params.items() if k in tunnel_declared}
            results[f"ConfigureTunnel {lane.name}"] = self.commands.run(
                gateway, "ConfigureTunnel", own
            )
        health_declared = declared("InstallHealthAgent")
        own = {k: v for k, v in self.health_parameters().items() if k in health_declared}
        if not accepts("InstallHealthAgent", "TunnelName", own["TunnelName"]):
            # As the stack does (stacks/health_agent.py) while the document takes one name: the
            # agent watches the first partner only; said in the report.
            first = own["TunnelName"].split(",")[0]
            missing.append(f"InstallHealthAgent.TunnelName takes one tunnel: {first} only")
            own["TunnelName"] = first
        self.health_tunnels = own["TunnelName"].split(",")
        try:
            results["InstallHealthAgent"] = self.commands.run(gateway, "InstallHealthAgent", own)
        except CommandError as exc:  # SendCommand's refusal (a parameter's pattern)
            results["InstallHealthAgent"] = Refused("InstallHealthAgent", str(exc))
        self.configured = results
        results["missing"] = sorted(set(missing))
        return results

    # -- observation ----------------------------------------------------------------------------
    def peers(self, name: str) -> list[str]:
        """Source addresses ``name``'s app server logged, oldest first."""
        log = SITES[name].app_log
        if not log.exists():
            return []
        return [line.split()[1] for line in log.read_text().splitlines() if line]

    def sas(self, ns: str = "tn-gw") -> dict[str, dict[str, Any]]:
        """Per connection on ``ns``'s charon: IKE version, IKE SA unique ids, INSTALLED
        CHILD_SAs (name -> count), from ``swanctl --list-sas --raw``'s vici records."""
        out = topo.in_ns(ns, ["swanctl", "--list-sas", "--raw"], check=False)
        return parse_list_sas(out)


def parse_list_sas(text: str) -> dict[str, dict[str, Any]]:
    """``swanctl --list-sas --raw`` (one ``list-sa event {...}`` per IKE SA) to
    {connection: {"version": 1|2, "ike_ids": [...], "state": [...], "children": {name: n},
    "selectors": {name: ([local-ts], [remote-ts])}, "reqids": {name: reqid}, "packets_in": n,
    "packets_out": n}}.
    Only the few keys we read; nested braces counted."""
    found: dict[str, dict[str, Any]] = {}
    for chunk in text.split("list-sa event")[1:]:
        body = chunk.strip()
        if not body.startswith("{"):
            continue
        tokens = _tokens(body)
        tree, _ = _parse(tokens, 1)
        for conn, ike in tree.items():
            if not isinstance(ike, dict):
                continue
            entry = found.setdefault(
                conn,
                {"version": 0, "ike_ids": [], "state": [], "children": {}, "selectors": {},
                 "reqids": {}, "packets_in": 0, "packets_out": 0},
            )  # fmt: skip
            entry["version"] = int(ike.get("version", 0) or 0)
            entry["ike_ids"].append(ike.get("uniqueid"))
            entry["state"].append(ike.get("state"))
            for child in (ike.get("child-sas") or {}).values():
                if not isinstance(child, dict):
                    continue
                if child.get("state") == "INSTALLED":
                    n = child.get("name", "?")
                    entry["children"][n] = entry["children"].get(n, 0) + 1
                    local, remote = child.get("local-ts", ""), child.get("remote-ts", "")
                    entry["selectors"][n] = (local.split(), remote.split())
                    entry["reqids"][n] = child.get("reqid")
                entry["packets_in"] += int(child.get("packets-in", 0) or 0)
                entry["packets_out"] += int(child.get("packets-out", 0) or 0)
    return found


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    for raw in text.replace("{", " { ").replace("}", " } ").split():
        out.append(raw)
    return out


def _parse(tokens: list[str], i: int) -> tuple[dict[str, Any], int]:
    """A vici raw dump from just after an opening brace: ``key=value``, ``key {`` sections,
    ``key [a b]`` lists (kept as text)."""
    result: dict[str, Any] = {}
    while i < len(tokens):
        tok = tokens[i]
        if tok == "}":
            return result, i + 1
        if "=" in tok:
            key, _, value = tok.partition("=")
            if value.startswith("["):
                items = [value.lstrip("[")]
                while not items[-1].endswith("]") and i + 1 < len(tokens):
                    i += 1
                    items.append(tokens[i])
                value = " ".join(items).strip("[]")
            result[key] = value
            i += 1
        elif i + 1 < len(tokens) and tokens[i + 1] == "{":
            result[tok], i = _parse(tokens, i + 2)
        else:
            i += 1
    return result, i


# -- enrolment per partner ----------------------------------------------------------------------


class PartnersController:
    """The real controller handler with ``TUNNELNAT_PARTNERS_PATH`` (each lane its own
    controller, as the stack runs it), driven by tag-change events for the lanes' tag keys."""

    def __init__(self, lab: PartnersLab) -> None:
        self.lab = lab
        self.printed: list[str] = []  # what each invocation printed
        self._saved = os.environ.get("TUNNELNAT_PARTNERS_PATH")
        os.environ["TUNNELNAT_PARTNERS_PATH"] = parameter_path(DEPLOYMENT)
        try:
            self.inner = LabController(lab)
            # One controller per lane, as the handler builds it from TUNNELNAT_PARTNERS_PATH
            # (handlers/controller.build_lanes), its commands through the lab's port.
            module = self.inner.module
            # No route-table mode with a partners file (the stack refuses it for now): the
            # stack sets neither of its variables.
            for key in ("TUNNELNAT_VPC_ID", "TUNNELNAT_GATEWAY_ENI_ID"):
                os.environ.pop(key, None)
            settings = module.ControllerSettings.from_environ()
            self.lanes = module.build_lanes(settings, commands=lab.commands)
            module.use_controller(self.lanes, lifecycle=self.inner.lifecycle)
        except BaseException:
            self._restore()
            raise

    def _restore(self) -> None:
        if self._saved is None:
            os.environ.pop("TUNNELNAT_PARTNERS_PATH", None)
        else:
            os.environ["TUNNELNAT_PARTNERS_PATH"] = self._saved

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self._restore()

    def __enter__(self) -> PartnersController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tag(self, name: str, partners: list[str], *, enrol: bool = True) -> dict[str, Any]:
        """Tag (or untag) instance ``name`` with ``partners``' lane keys in EC2, then deliver
        EventBridge's tag-change event naming those keys."""
        instance_id = self.lab.aws.instance_ids[name]
        keys = [self.lab.lane(p).tag_key for p in partners]
        for key in keys:
            if enrol:
                self.lab.aws.tag(instance_id, key, ENROLMENT_TAG[1])
            else:
                self.lab.aws.untag(instance_id, key)
        event = lab_aws.tag_change_event(
            instance_id,
            dict.fromkeys(keys, ""),
            self.lab.aws.tags(instance_id),
            event_id=str(uuid.uuid4()),
        )
        # What the handler prints is for CloudWatch Logs (EMF metric lines: the per-partner
        # PoolFreeAddresses is printed even with POWERTOOLS_METRICS_DISABLED), not the report.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            reply = self.inner.invoke(event)
        self.printed.append(printed.getvalue())
        return reply


def lane_mappings(lab: PartnersLab, name: str) -> dict[str, str]:
    """private -> S in lane ``name``'s own table."""
    reply = lab.aws.client("dynamodb").query(
        TableName=lab.lane(name).table,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": "mapping"}},
        ConsistentRead=True,
    )
    return {i["private_ip"]["S"]: i["public_ip"]["S"] for i in reply["Items"]}


def describe(results: dict[str, Any]) -> str:
    """One line per document run: status, and the tail of stderr when it failed."""
    parts = []
    for key, result in results.items():
        if key == "missing":
            continue
        text = f"{key} {result.status}"
        if not result.ok:
            text += f" ({result.stderr.strip()[-240:]!r})"
        parts.append(text)
    if results.get("missing"):
        parts.append("GAPS: " + ", ".join(results["missing"]))
    return "; ".join(parts)
