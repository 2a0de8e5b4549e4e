"""What a strict peer accepts: the checks behind the partner settings' context keys.

Checked at synthesis (stacks/settings.py), so a deployment never offers the partner a proposal
without a strong DH group (PFS on every CHILD_SA rekey) or an identity swanctl would misread.
The gateway's renderer (core/swanctl.py) only renders; the document's allowedPatterns keep
everything else out of the shell.
"""

from __future__ import annotations

import re

# Like AWS Site-to-Site VPN's: IKE SA 8 h, CHILD SA 1 h, each rekeyed 9 min early (its margin)
# minus up to 9 min at random (its fuzz); DPD after 10 s of silence, dead after 30 s.
DEFAULT_IKE_PROPOSALS = ("aes256-sha256-modp2048",)
DEFAULT_ESP_PROPOSALS = ("aes256-sha256-modp2048",)
DEFAULT_IKE_LIFETIMES = (28_260, 540, 540)  # rekey_time, over_time, rand_time
DEFAULT_CHILD_LIFETIMES = (3_060, 3_600, 540)  # rekey_time, life_time, rand_time
# The same expressions as ConfigureTunnel's allowedPatterns.
IDENTITY = re.compile(
    r"@?[A-Za-z0-9]([A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}"
    r"|[A-Za-z0-9._+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+|@#[0-9a-fA-F]{2,128}"
)
PROPOSAL = re.compile(r"[a-z0-9]{2,24}(-[a-z0-9]{2,24}){1,7}")
# DH groups a strict peer accepts: MODP 2048 and up (group 14+), ECP 256 and up (19-21),
# brainpool 256 and up (28-30), Curve25519/448 (31, 32).
STRONG_DH = re.compile(
    r"modp(2048|3072|4096|6144|8192)|ecp(256|384|521)|ecp(256|384|512)bp|curve(25519|448)"
    r"|x(25519|448)"
)
WEAK = re.compile(r"modp(768|1024|1536)|modp(1024|2048)s(160|224|256)|des|3des|md5|null")


def proposal_problems(proposal: str, *, esp: bool) -> list[str]:
    """Why a strict peer (or we) would refuse ``proposal``; empty when it is fine."""
    if not PROPOSAL.fullmatch(proposal):
        return [f"{proposal!r} is not a proposal (algorithm keywords joined by '-')"]
    words = proposal.split("-")
    problems = [f"{proposal}: {w} is too weak" for w in words if WEAK.fullmatch(w)]
    if not any(STRONG_DH.fullmatch(w) for w in words):
        what = "a DH group for PFS" if esp else "a DH group"
        problems.append(f"{proposal}: needs {what} of MODP-2048 (14), ECP-256 (19) or stronger")
    return problems


def lifetime_problems(kind: str, rekey: int, second: int, rand: int) -> list[str]:
    """IKE: (rekey_time, over_time, rand_time); CHILD: (rekey_time, life_time, rand_time)."""
    problems = []
    if not 0 <= rand < rekey:
        problems.append(f"{kind} rand_time {rand} must be below rekey_time {rekey}")
    if kind == "CHILD" and second <= rekey:
        problems.append(f"CHILD life_time {second} must exceed rekey_time {rekey}")
    if kind == "IKE" and second < 1:
        problems.append("IKE over_time must be at least 1 s")
    if rekey < (30 if kind == "IKE" else 10):
        problems.append(f"{kind} rekey_time {rekey} s is too short")
    return problems
