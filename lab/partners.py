"""The partner's side of the lab's tunnel: strongSwan configurations modelled on real peers.

The partner's VPN (tn-pvpn) is someone else's box, so the lab does not mirror our configuration:
each profile is what that kind of peer does by default, and the broken ones are what goes wrong
with real partners.

- ``aws``: like an AWS Site-to-Site VPN tunnel endpoint with its default tunnel options (EC2 API
  reference, VpnTunnelOptionsSpecification / ModifyVpnTunnelOptionsSpecification): IKEv2; phase
  1 and 2 encryption AES128/AES256 (and their GCM forms), integrity SHA1/SHA2-256/384/512, DH
  groups 2 and 14-24 (phase 2: 2, 5, 14-24); lifetimes 28,800 s and 3,600 s; DPD timeout 30 s
  with action ``clear``; startup action ``start``, so it initiates too. The lab's strongSwan has
  no GCM or ECP plugins (no libstrongswan-standard-plugins), so the profile lists the CBC and
  MODP part of that set.
- ``strict``: a policy-based peer (a Cisco ASA crypto map, a Fortigate in policy mode): one
  CHILD_SA per (partner network, S) pair, exactly one proposal, it never initiates. Our
  ``SelectorLayout per-pair`` fits it.
- broken: ``wrong-psk``, ``no-common-proposal`` (it accepts only AES128/SHA1 with group 5, which
  we never offer), ``selector-mismatch`` (it expects another range of S than ours), and
  ``down`` (the AWS-like peer whose daemon the lab starts only later).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# AWS's documented algorithms, as strongSwan keywords (the lab's plugins: CBC and MODP only).
AWS_ENCRYPTION = "aes128-aes256"
AWS_INTEGRITY = "sha1-sha256-sha384-sha512"
AWS_IKE_GROUPS = "modp1024-modp2048-modp3072-modp4096-modp6144-modp8192"
AWS_ESP_GROUPS = "modp1024-modp1536-modp2048-modp3072-modp4096-modp6144-modp8192"
STRICT_PROPOSAL = "aes256-sha256-modp2048"


@dataclass(frozen=True)
class Profile:
    name: str
    ike_proposals: str
    esp_proposals: str
    per_pair: bool = False
    start_action: str = "none"
    # Phase 1 and 2 lifetimes (hard) and the rekey margin before them (AWS: 270 s, fuzz 100 %).
    ike_life: int = 28_800
    child_life: int = 3_600
    margin: int = 270
    dpd_delay: int = 10
    psk_ok: bool = True
    remote_ts: str | None = None  # None: our S addresses
    description: str = ""


PROFILES = {
    "aws": Profile(
        "aws",
        f"{AWS_ENCRYPTION}-{AWS_INTEGRITY}-{AWS_IKE_GROUPS}",
        f"{AWS_ENCRYPTION}-{AWS_INTEGRITY}-{AWS_ESP_GROUPS}",
        start_action="start",
        description="AWS-VPN-like (its documented proposals, PFS groups, DPD 30 s, initiates)",
    ),
    "strict": Profile(
        "strict",
        STRICT_PROPOSAL,
        STRICT_PROPOSAL,
        per_pair=True,
        description="strict policy-based (one selector pair per SA, only its proposal)",
    ),
    "wrong-psk": Profile(
        "wrong-psk",
        f"{AWS_ENCRYPTION}-{AWS_INTEGRITY}-{AWS_IKE_GROUPS}",
        f"{AWS_ENCRYPTION}-{AWS_INTEGRITY}-{AWS_ESP_GROUPS}",
        psk_ok=False,
        description="a pre-shared key that is not ours",
    ),
    "no-common-proposal": Profile(
        "no-common-proposal",
        f"{AWS_ENCRYPTION}-{AWS_INTEGRITY}-{AWS_IKE_GROUPS}",
        "aes128-sha1-modp1536",
        description="accepts only aes128-sha1-modp1536 for ESP",
    ),
    "selector-mismatch": Profile(
        "selector-mismatch",
        f"{AWS_ENCRYPTION}-{AWS_INTEGRITY}-{AWS_IKE_GROUPS}",
        f"{AWS_ENCRYPTION}-{AWS_INTEGRITY}-{AWS_ESP_GROUPS}",
        remote_ts="203.0.113.200/29",
        description="expects our traffic from 203.0.113.200/29, not our S",
    ),
}
# AWS-like but waiting to be called: it comes up through our retries alone (keyingtries 0).
PROFILES["down"] = Profile(
    "down",
    PROFILES["aws"].ike_proposals,
    PROFILES["aws"].esp_proposals,
    description="AWS-like, down at first and started later; it does not initiate",
)


def render(
    profile: Profile,
    *,
    psk: str,
    endpoint: str,
    gateway: str,
    partner_net: str,
    our_selectors: list[str],
    tunnel: str,
    child_life: int | None = None,
    ike_life: int | None = None,
) -> str:
    """The partner's swanctl.conf. ``child_life``/``ike_life`` override its lifetimes (the
    rekey run: the partner rekeys too, on its own clock)."""
    c_life = child_life or profile.child_life
    i_life = ike_life or profile.ike_life
    margin = min(profile.margin, c_life // 4)
    remote = [profile.remote_ts] if profile.remote_ts else our_selectors
    if profile.per_pair:
        pairs = [(f"{tunnel}-{i}", partner_net, ts) for i, ts in enumerate(remote, 1)]
    else:
        pairs = [(tunnel, partner_net, ",".join(remote))]
    children = "".join(
        f"""
      {name} {{
        local_ts = {local}
        remote_ts = {ts}
        esp_proposals = {profile.esp_proposals}
        life_time = {c_life}s
        rekey_time = {c_life - margin}s
        rand_time = {margin}s
        dpd_action = clear
        start_action = {profile.start_action}
      }}"""
        for name, local, ts in pairs
    )
    secret = psk if profile.psk_ok else "not-" + psk
    i_margin = min(profile.margin, i_life // 4)
    return f"""\
# The partner's side, profile {profile.name}: {profile.description}
connections {{
  {tunnel} {{
    version = 2
    local_addrs = {endpoint}
    remote_addrs = {gateway}
    encap = yes
    # A restarted gateway replaces its stale IKE SA here instead of adding a second one.
    unique = replace
    proposals = {profile.ike_proposals}
    rekey_time = {i_life - i_margin}s
    over_time = {i_margin}s
    rand_time = {i_margin}s
    dpd_delay = {profile.dpd_delay}s
    keyingtries = 0
    local {{
      auth = psk
      id = {endpoint}
    }}
    remote {{
      auth = psk
      id = {gateway}
    }}
    children {{{children}
    }}
  }}
}}
secrets {{
  ike-tunnelnat {{
    id-1 = {gateway}
    secret = "{secret}"
  }}
}}
"""


@dataclass(frozen=True)
class Rekeys:
    """CHILD_SA and IKE_SA rekeys one side's charon log shows (its level-1 lines)."""

    child_initiated: int  # CREATE_CHILD_SA rekeys this side started
    ike_rekeyed: int  # IKE SAs rekeyed (either side started them)
    make_before_break: bool  # every closed CHILD_SA was replaced by an installed one first
    closed: int


def count_rekeys(log_text: str) -> Rekeys:
    """From charon's log: an initiated rekey is ``establishing CHILD_SA name{n} reqid r`` (the
    first CHILD_SA of an IKE SA has no reqid yet). Make-before-break: before each ``closing
    CHILD_SA`` of a rekeyed SA, a new ``inbound CHILD_SA ... established`` since the previous
    close (the new SA takes traffic before the old one goes)."""
    initiated = ike = closed = 0
    installed_since_close = 0
    mbb = True
    for line in log_text.splitlines():
        if re.search(r"establishing CHILD_SA \S+ reqid \d+", line):
            initiated += 1
        elif re.search(r"IKE_SA \S+ rekeyed between", line):
            ike += 1
        elif re.search(r"inbound CHILD_SA \S+ established", line):
            installed_since_close += 1
        elif re.search(r"closing CHILD_SA \S+ with SPIs", line):
            closed += 1
            mbb = mbb and installed_since_close > 0
            installed_since_close = 0
    return Rekeys(initiated, ike, mbb, closed)
