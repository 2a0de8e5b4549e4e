"""The partner's tunnel as strongSwan configuration (docs/stack.md, Partner worksheet).

Standard library only: part of the gateway software, where ``tunnelnat-gateway configure-tunnel``
(gateway/tunnelnat_gateway/tunnel.py, ConfigureTunnel's verb) renders the tunnel with it;
``python3 -m tunnelnat.core.swanctl OUT`` with ``TN_*`` set writes the same files into OUT.
Policy is core/crypto.py's, checked at synthesis.
The NAT side (the nftables base: partner networks, NAT mode, MSS) is ConfigureGateway's.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

LB, RB = "{", "}"  # never two braces in a row: SSM would read them as a parameter


@dataclass(frozen=True)
class Tunnel:
    name: str
    partner: IPv4Address
    local_ts: tuple[IPv4Network, ...]
    remote_ts: tuple[IPv4Network, ...]
    local_id: str
    remote_id: str  # "": the partner's address
    ike: str  # proposals, comma-separated
    esp: str
    ike_life: tuple[int, int, int]  # rekey_time, over_time, rand_time
    child_life: tuple[int, int, int]  # rekey_time, life_time, rand_time
    dpd: tuple[int, int]  # delay, timeout
    keyingtries: int = 0
    layout: str = "single"  # per-pair: one CHILD_SA per (S, partner network)
    start: str = "start"  # none: the partner initiates
    encap: bool = False
    log: str = "/var/log/tunnelnat/charon.log"
    local_addr: IPv4Address | None = None  # a gateway pair: the address on the moving ENI
    ike_version: int = 2  # 1: a legacy peer, IKEv1 main mode (per-pair selectors only)
    reqid_base: int = 0  # 0: charon picks each CHILD_SA's reqid; else child n has base + n

    @property
    def children(self) -> list[tuple[str, str, str]]:
        """(name, local_ts, remote_ts) of each CHILD_SA."""
        if self.layout == "single":
            return [(self.name, _csv(self.local_ts), _csv(self.remote_ts))]
        pairs = [(s, r) for s in self.local_ts for r in self.remote_ts]
        return [(f"{self.name}-{i}", str(s), str(r)) for i, (s, r) in enumerate(pairs, 1)]


def _csv(items: object) -> str:
    return ",".join(map(str, items))  # type: ignore[call-overload]


def render_connection(t: Tunnel) -> str:
    """The swanctl connection: no close_action; start with dpd_action restart, or none with
    clear (DESIGN, Lessons). MOBIKE off: both endpoints are fixed."""
    (rekey, over, rand), (c_rekey, c_life, c_rand) = t.ike_life, t.child_life
    out = [f"connections {LB}", f"  {t.name} {LB}", f"    version = {t.ike_version}"]
    out.append(f"    remote_addrs = {t.partner}")
    if t.local_addr is not None:
        # A gateway pair: IKE only from the address on G's ENI (G; E in the lab). The standby
        # does not have it, so its charon cannot initiate from its own address (the kernel
        # refuses the source): it never reaches the partner until it holds the ENI.
        out.append(f"    local_addrs = {t.local_addr}")
    out.append(f"    encap = {'yes' if t.encap else 'no'}")
    if t.ike_version == 1:
        # Main mode: aggressive mode sends the ID and the PSK's hash in clear, open to an offline
        # dictionary attack (swanctl.conf(5), aggressive). IKEv1 cannot rekey an IKE SA, only
        # reauthenticate it (swanctl.conf(5), rekey_time: "supported in IKEv2 only, IKEv1
        # performs a reauthentication procedure instead"; docs.strongswan.org, config/rekeying):
        # IkeLifetimes' first value becomes reauth_time and rekey_time is off, so the renewal is
        # the one IKEv1 has, at the time the partner agreed. Quick-mode SAs are not bound to the
        # ISAKMP SA (RFC 2409, 5.5): the CHILD_SAs rekey on their own schedule as with IKEv2.
        out += ["    aggressive = no", f"    proposals = {t.ike}", "    rekey_time = 0s"]
        out.append(f"    reauth_time = {rekey}s")
    else:
        out += ["    mobike = no", f"    proposals = {t.ike}", f"    rekey_time = {rekey}s"]
    out += [f"    over_time = {over}s", f"    rand_time = {rand}s"]
    out.append(f"    dpd_delay = {t.dpd[0]}s")
    if t.ike_version == 1:
        # IKEv1's R_U_THERE has a timeout of its own (swanctl.conf(5), dpd_timeout: no effect
        # with IKEv2, where the retransmissions in charon's settings decide).
        out.append(f"    dpd_timeout = {t.dpd[1]}s")
    out.append(f"    keyingtries = {t.keyingtries}")
    # A partner that initiates too (AWS's startup action start) can complete a second IKE SA
    # with us answering, e.g. its retransmitted attempt from before we were up. replace: charon
    # then deletes the older one (10 s later, as for a reauthentication: make-before-break),
    # one IKE SA and CHILD_SA per selector set remain. Only the responder checks, so the two
    # sides never both delete. INITIAL_CONTACT is still sent: strongSwan's ike_auth.c build_i()
    # adds it to the first IKE_AUTH when unique is not never, the remote ID has no wildcards and
    # ike_sa_manager has_contact() knows no IKE SA between the two IDs; so a pair's new active
    # (which holds none) makes the partner drop the dead gateway's SAs (RFC 7296, 2.4).
    out.append("    unique = replace")
    for side, ident in (("local", t.local_id), ("remote", t.remote_id or t.partner)):
        out += [f"    {side} {LB}", "      auth = psk", f'      id = "{ident}"', f"    {RB}"]
    out.append(f"    children {LB}")
    for number, (name, local_ts, remote_ts) in enumerate(t.children, 1):
        out += [f"      {name} {LB}", f"        local_ts = {local_ts}"]
        out += [f"        remote_ts = {remote_ts}", f"        esp_proposals = {t.esp}"]
        out += [f"        rekey_time = {c_rekey}s", f"        life_time = {c_life}s"]
        out += [f"        rand_time = {c_rand}s", f"        start_action = {t.start}"]
        out += [f"        dpd_action = {'restart' if t.start == 'start' else 'clear'}"]
        if t.reqid_base:
            # Pinned: after a DPD restart charon 5.9 can hand two CHILD_SAs of different
            # selectors one reqid (strongSwan issue #1855), so one pair's packets leave on the
            # other's SA and the partner drops them while both read INSTALLED. A fixed reqid
            # needs each CHILD_SA config instantiated once at a time (swanctl.conf(5),
            # children.<child>.reqid): one site-to-site peer, fixed selectors.
            out.append(f"        reqid = {t.reqid_base + number}")
        out.append(f"      {RB}")
    return "\n".join([*out, f"    {RB}", f"  {RB}", RB, ""])


def render_charon_settings(t: Tunnel) -> str:
    """strongswan.conf: DPD's timeout as IKEv2 retransmits (docs/stack.md), the log."""
    return render_shared_charon_settings([(t.dpd[1], t.log)])


def render_shared_charon_settings(tunnels: list[tuple[int, str]]) -> str:
    """strongswan.conf for every tunnel on the gateway, from each one's (DPD timeout, log).

    charon's retransmission settings are global (strongswan.conf(5), charon.retransmit_*: no
    per-connection form), so the smallest DpdTimeout wins: no partner is declared dead later
    than its own DpdTimeout says (sooner for the others). A filelog logs every connection
    (strongswan.conf(5), charon.filelog), so one section per distinct CharonLog: tunnels that
    share the default share one log, and ``ike_name`` lets the health agent pick its tunnel's
    lines. One tunnel renders exactly what render_charon_settings always did."""
    timeout = min(dpd for dpd, _ in tunnels)
    logs = sorted({log for _, log in tunnels})
    out = [f"charon-systemd {LB}", f"  retransmit_timeout = {timeout / 5:g}"]
    out += ["  retransmit_base = 1", "  retransmit_tries = 4", f"  filelog {LB}"]
    for log in logs:
        # CharonLog is /var/log/tunnelnat/NAME.log: NAME is unique among them, a valid section.
        name = "tunnelnat" if len(logs) == 1 else f"tunnelnat-{log.rsplit('/', 1)[-1][:-4]}"
        out += [f"    {name} {LB}", f"      path = {log}", "      time_format = %s"]
        out += ["      ike_name = yes", "      flush_line = yes", "      default = 1"]
        out += ["      enc = 0", "      net = 0", f"    {RB}"]
    return "\n".join([*out, f"  {RB}", RB, ""])


def _ints(text: str, n: int) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != n:
        raise ValueError(f"{text!r}: {n} numbers expected")
    return values


def from_environ(env: dict[str, str]) -> Tunnel:
    """The Tunnel from ``TN_*``."""
    nets = tuple(IPv4Network(x) for x in env["TN_NETS"].split(","))
    public = tuple(IPv4Network(x) for x in env["TN_PUBLIC"].split(","))
    partner = IPv4Address(env["TN_PARTNER"])
    dpd = _ints(env["TN_DPD"], 2)
    ike, child = _ints(env["TN_IKE_LIFE"], 3), _ints(env["TN_CHILD_LIFE"], 3)
    if any(partner in x for x in nets) or any(p.overlaps(x) for p in public for x in nets):
        raise ValueError("PartnerEndpoint or PublicAddresses overlap PartnerNetworks")
    if not (5 <= dpd[0] <= 300 and 10 <= dpd[1] <= 600):
        raise ValueError("DpdDelay 5-300 and DpdTimeout 10-600 s")
    if not (ike[2] < ike[0] and ike[1] > 0 and child[2] < child[0] < child[1]):
        raise ValueError("lifetimes: rand_time < rekey_time < life_time, over_time > 0")
    for ident in (env["TN_LOCAL_ID"], env["TN_REMOTE_ID"]):
        if ident.replace(".", "").isdigit():
            IPv4Address(ident)  # a dotted quad is an address, never an FQDN
    libipsec = env["TN_BACKEND"] == "libipsec"
    local = IPv4Address(env["TN_LOCAL_ADDR"]) if env.get("TN_LOCAL_ADDR") else None
    version = env.get("TN_IKE_VERSION") or "2"  # an older document's environment: IKEv2
    if version not in ("1", "2"):
        raise ValueError(f"IkeVersion {version!r}: 1 or 2")
    tunnel = Tunnel(
        env["TN_TUNNEL"], partner, public, nets, env["TN_LOCAL_ID"], env["TN_REMOTE_ID"],
        env["TN_IKE"], env["TN_ESP"], ike, child, dpd, int(env["TN_KEYINGTRIES"]),
        env["TN_LAYOUT"], env["TN_START"], libipsec, env["TN_LOG"], local, int(version),
    )  # fmt: skip
    if len(tunnel.children) > 256:
        raise ValueError("per-pair: more than 256 CHILD_SAs")
    if tunnel.ike_version == 1 and len(tunnel.local_ts) * len(tunnel.remote_ts) > 1:
        if tunnel.layout == "single":
            # Quick mode carries one selector pair: charon would negotiate only the first of a
            # multi-selector CHILD_SA (swanctl.conf(5), children.<child>.local_ts: "When IKEv1
            # is used only the first selector is interpreted"), the other networks would never
            # reach the tunnel. A policy-based peer wants one SA per pair: per-pair.
            raise ValueError(
                "IKEv1 negotiates one selector pair per CHILD_SA: SelectorLayout per-pair "
                "for several PublicAddresses or PartnerNetworks"
            )
    return tunnel


def render_files(t: Tunnel) -> dict[str, str]:
    """What ConfigureTunnel installs, by name: the connection, charon's settings, the facts the
    health agent reads, the IKE IDs the secret is for, the addresses libipsec wants on lo."""
    # libipsec routes need a local address inside local_ts: the first of each S entry, on lo
    # (ConfigureTunnel keeps them in /etc/tunnelnat/lo-addresses, which the boot restores).
    lo = [p.network_address if p.prefixlen == 32 else next(p.hosts()) for p in t.local_ts]
    facts: dict[str, object] = {"children": [c[0] for c in t.children], "ike": t.ike}
    facts |= {"esp": t.esp, "log": t.log}
    if t.ike_version == 1:  # only then: IKEv2 tunnels' facts stay as they were
        facts["ike_version"] = 1
    return {
        "tunnel.conf": render_connection(t),
        "charon.conf": render_charon_settings(t),
        "tunnel.json": json.dumps(facts) + "\n",  # for the health agent
        "ids": f"{t.local_id} {t.remote_id or t.partner}\n",
        "lo_addresses": "".join(f"{a}\n" for a in lo),
    }


def main(out: str) -> int:
    try:
        t = from_environ(dict(os.environ))
    except (ValueError, KeyError) as exc:
        print(f"ConfigureTunnel: {exc}", file=sys.stderr)
        return 1
    for name, text in render_files(t).items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
