"""The demo's story, step by step, with real packets: shared by ``make demo`` and tests/lab.

Issue 2's data path (tunnel, enrolment, S at the app server, partner-initiated connections, an
unenrolled instance refused, fail-closed, unenrolment), with the operator's ``tunnelnat status``
and ``tunnelnat doctor`` (issue 7), the healing tunnel (issue 5, ``lab.healing_story``) and the
Auto Scaling burst (issue 4, ``lab.burst_story``) in between, and the private subnet behind the
VPC router (issue 13, route-table mode: ``lab.vpc_router`` applies moto's route tables).

Each step acts, then observes what actually happened (routes, nftables maps and counters, the
app server's log, packets on the wire) and returns a ``Step`` with a verdict, a one-line figure
and the raw observations, so the demo can print it and the tests can assert on it.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from lab import topology as topo
from lab.burst_story import BurstReport, run_burst_story, run_scale_in
from lab.cli import doctor_json, quiet_moto_errors, run_cli, status_json
from lab.controller import LabController
from lab.failover_story import figure as failover_figure
from lab.failover_story import run_failover
from lab.healing_story import agent_program, run_agent, run_healing_story
from lab.impostor_story import figure as impostor_figure
from lab.impostor_story import run_impostor
from lab.pair_stories import run_rolling_replacement, run_slow_aws, run_switchover
from lab.partners import count_rekeys
from lab.upgrade_story import run_upgrade

WEB1, WEB2 = "web-1", "web-2"
PRIV1, PRIV2 = "priv-1", "priv-2"  # the private subnet's instances (route-table mode)
FOREIGN_APPLIANCE = "10.10.2.50"  # another team's appliance in the private subnet


@dataclass
class Step:
    title: str
    ok: bool
    figure: str
    data: dict[str, Any] = field(default_factory=dict)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


# How long a second IKE SA with the partner may live: charon's uniqueness policy (our
# unique = replace) deletes the older one 10 s after the newer is established (a fixed delay, as
# for a reauthentication: make-before-break), plus margin for a DELETE and a rekey in flight.
SETTLE_SECONDS = 25.0


def tunnel_sas(ns: str, name: str = topo.TUNNEL) -> tuple[int, int]:
    """(IKE SAs in any state, INSTALLED CHILD_SAs) of connection ``name`` as charon in ``ns``
    lists them (an IKE SA's line starts at column 0, its CHILD_SAs' are indented)."""
    out = topo.in_ns(ns, ["swanctl", "--list-sas"], check=False)
    ike = re.findall(rf"^{re.escape(name)}: #\d+, ", out, re.MULTILINE)
    child = re.findall(rf"^\s+{re.escape(name)}: #\d+, reqid \d+, INSTALLED", out, re.MULTILINE)
    return len(ike), len(child)


def settle_sas(timeout: float = SETTLE_SECONDS) -> dict[str, Any]:
    """Wait until each side has exactly one IKE SA and one INSTALLED CHILD_SA of the tunnel.

    Both sides initiate (our start_action start, the AWS-like partner's startup action start), so
    a second IKE SA is legitimate for a while: until the uniqueness policy deletes the older one
    (SETTLE_SECONDS), as an overlapping CHILD_SA is while a rekey makes before it breaks. Returns
    the counts last seen (``one_each`` says whether they settled), when, and the most IKE SAs
    either side had meanwhile."""
    started = time.monotonic()
    most = 0
    while True:
        gateway, partner = tunnel_sas("tn-gw"), tunnel_sas("tn-pvpn")
        most = max(most, gateway[0], partner[0])
        one_each = gateway == partner == (1, 1)
        elapsed = time.monotonic() - started
        if one_each or elapsed > timeout:
            return {
                "one_each": one_each,
                "gateway": gateway,
                "partner": partner,
                "seconds": round(elapsed, 1),
                "most_ike": most,
            }
        time.sleep(0.5)


class Story:
    def __init__(self, lab: topo.Lab, controller: LabController) -> None:
        self.lab = lab
        self.controller = controller
        self.public: str | None = None  # the S web-1 was given
        self.private_public: str | None = None  # the S priv-1 was given
        self.burst_report: BurstReport | None = None

    def app_url(self, name: str) -> str:
        return f"http://{topo.APP}:{topo.APP_PORT}/from-{name}"

    # -- 1 -------------------------------------------------------------------------------------
    def tunnel(self) -> Step:
        started = time.monotonic()
        result = self.lab.configure_gateway()
        seconds = time.monotonic() - started
        report = _last_json(result.stdout)
        installed = self.lab.child_sas_installed()
        partner = self.lab.child_sas_installed("tn-pvpn")
        # Up when the document returns; one IKE SA and CHILD_SA a side once any duplicate from
        # both sides initiating is replaced (settle_sas).
        settled = settle_sas() if result.ok else {"one_each": False}
        ok = result.ok and report.get("up") is True and installed >= 1 and settled["one_each"]
        figure = (
            f"ConfigureGateway {result.status} in {seconds:.2f}s; child SA INSTALLED "
            f"(gateway {installed}, partner {partner})"
        )
        if result.ok:
            figure += (
                f"; one IKE SA and CHILD_SA a side after {settled['seconds']}s: "
                f"{'yes' if settled['one_each'] else 'NO'} (at most {settled['most_ike']} IKE SAs)"
            )
        if not result.ok:
            figure += f": {result.stderr.strip()[-200:]}"
        return Step(
            "IPsec tunnel gateway <-> partner established",
            ok,
            figure,
            {
                "seconds": seconds,
                "report": report,
                "status": result.status,
                "installed": installed,
                "partner_installed": partner,
                "settled": settled,
            },
        )

    # -- 2 -------------------------------------------------------------------------------------
    def enrol(self, name: str = WEB1) -> Step:
        inst = self.lab.instance(name)
        started = time.monotonic()
        reply = self.controller.tag_changed(name, enrol=True)
        seconds = time.monotonic() - started
        outcome = (reply.get("outcomes") or [{}])[0]
        self.public = outcome.get("public_ip")
        route = any(
            r.startswith(f"{topo.PARTNER_NET} via {topo.GW_ENI}") for r in self.lab.routes(inst.ns)
        )
        snat = self.lab.nft_elements("map", "snat_map")
        dnat = self.lab.nft_elements("map", "dnat_map")
        mapped = f"{inst.private_ip} : {self.public}" in snat
        ok = outcome.get("status") == "enrolled" and route and mapped
        figure = (
            f"tag -> event -> handler in {seconds:.2f}s: {outcome.get('status')}, "
            f"S={self.public}; route {topo.PARTNER_NET} via {topo.GW_ENI} on {name}: "
            f"{'yes' if route else 'NO'}; gateway SNAT {inst.private_ip}->{self.public}: "
            f"{'yes' if mapped else 'NO'}"
        )
        runs = [r.document for r in self.lab.commands.history]
        return Step(
            f"{name} tagged: route on {name}, NAT on the gateway",
            ok,
            figure,
            {
                "outcome": outcome,
                "seconds": seconds,
                "route": route,
                "snat": snat,
                "dnat": dnat,
                "runs": runs,
            },
        )

    # -- 3 -------------------------------------------------------------------------------------
    def request_arrives_as_s(self, name: str = WEB1) -> Step:
        before = len(self.lab.app_peers())
        counters_before = self.lab.ipsec_counters()
        with self.lab.capture("tn-inet", "to-gw", "udp port 4500 or host 192.0.2.80") as packets:
            answered, body = self.lab.http(self.lab.instance(name).ns, self.app_url(name))
        new_peers = self.lab.app_peers()[before:]
        esp = [p for p in packets if ".4500 >" in p and "192.0.2.80" not in p]
        clear = [p for p in packets if "192.0.2.80" in p]
        counters = self.lab.ipsec_counters()
        through = counters["packets-out"] - counters_before["packets-out"]
        ok = answered and new_peers == [self.public] and len(esp) > 0 and not clear
        figure = (
            f"{name} GET -> {body!r}; app log: {', '.join(new_peers) or 'nothing'}; "
            f"on the internet link: {len(esp)} ESP-in-UDP/4500 packets E<->T, "
            f"{len(clear)} clear-text packets to A; {through} packets out through the child SA"
        )
        return Step(
            f"HTTP from {name} reaches the app server, which logs S",
            ok,
            figure,
            {
                "answered": answered,
                "body": body,
                "peers": new_peers,
                "esp": len(esp),
                "clear": len(clear),
                "child_out": through,
            },
        )

    # -- 4 -------------------------------------------------------------------------------------
    def partner_reaches_instance(self, name: str = WEB1) -> Step:
        url = f"http://{self.public}:{topo.INSTANCE_PORT}/from-partner"
        answered, body = self.lab.http("tn-app", url)
        ok = answered and body == f"{name} saw {topo.APP}"
        figure = f"app server GET {url} -> {body!r}"
        return Step(
            f"the app server opens a connection to S and reaches {name}",
            ok,
            figure,
            {"answered": answered, "body": body},
        )

    # -- 5 -------------------------------------------------------------------------------------
    def unenrolled_blocked(self, name: str = WEB2) -> Step:
        inst = self.lab.instance(name)
        before = len(self.lab.app_peers())
        no_route, err_no_route = self.lab.http(inst.ns, self.app_url(name), timeout=2)
        # The instance adds the host route by hand; the gateway must still refuse it.
        topo.in_ns(inst.ns, ["ip", "route", "replace", topo.PARTNER_NET, "via", topo.GW_ENI])
        dropped_before = self.lab.nft_counter("dropped_unenrolled")
        try:
            answered, err = self.lab.http(inst.ns, self.app_url(name), timeout=2)
        finally:
            topo.in_ns(inst.ns, ["ip", "route", "del", topo.PARTNER_NET], check=False)
        dropped = self.lab.nft_counter("dropped_unenrolled") - dropped_before
        arrived = self.lab.app_peers()[before:]
        ok = not no_route and not answered and not arrived and dropped > 0
        figure = (
            f"untagged {name}: without a route -> {err_no_route.rsplit(':', 1)[-1].strip()}; "
            f"with a hand-made route -> {err.rsplit(':', 1)[-1].strip()}; "
            f"gateway dropped {dropped} packets (dropped_unenrolled); "
            f"app log: {'nothing new' if not arrived else arrived}"
        )
        return Step(
            f"untagged {name} does not reach the app server, even with a host route",
            ok,
            figure,
            {
                "answered": answered,
                "arrived": arrived,
                "dropped": dropped,
                "without_route_answered": no_route,
            },
        )

    # -- the private subnet: route-table mode (issue 13) ---------------------------------------
    def private_request(self, name: str, timeout: float = 2) -> tuple[bool, str, int, list[str]]:
        """GET A from a private instance: (answered, body or error, packets from it that reached
        G, new peers in the app's log). What reaches G shows where its subnet's table sends A."""
        inst = self.lab.instance(name)
        before = len(self.lab.app_peers())
        bpf = f"src host {inst.private_ip} and dst host {topo.APP}"
        with self.lab.capture("tn-gw", topo.ENI_LINK, bpf) as at_g:
            answered, body = self.lab.http(inst.ns, self.app_url(name), timeout=timeout)
        return answered, body, len([p for p in at_g if p.strip()]), self.lab.app_peers()[before:]

    def private_table_route(self) -> tuple[str | None, str | None]:
        """The partner route in the private subnet's table: (target in EC2, the router's route)."""
        self.lab.vpc_router.sync()  # the next poll would do it within a second; don't wait
        target = self.lab.aws.routes(self.lab.aws.private_route_table_id).get(topo.PARTNER_NET)
        kernel = self.lab.vpc_router.kernel_table(self.lab.aws.private_subnet_id)
        return target, next((r for r in kernel if r.startswith(f"{topo.PARTNER_NET} ")), None)

    def _asked(self, name: str) -> list[str]:
        """Documents the controller asked to run on ``name`` (an instance without an agent)."""
        instance_id = self.lab.aws.instance_ids[name]
        return [doc for target, doc in self.lab.commands.asked if target == instance_id]

    def private_enrol(self, name: str = PRIV1) -> Step:
        """An instance in the private subnet, with no SSM agent, is tagged: the controller puts
        the partner's networks -> G's ENI in its subnet's route table, the VPC router applies
        what EC2 holds, and its requests reach A as its own S (and A reaches it back)."""
        step_started = time.monotonic()
        inst = self.lab.instance(name)
        rtb = self.lab.aws.private_route_table_id
        before_answered, _, before_at_g, _ = self.private_request(name)
        target_before, _ = self.private_table_route()
        started = time.monotonic()
        reply = self.controller.tag_changed(name, enrol=True)
        seconds = time.monotonic() - started
        outcome = (reply.get("outcomes") or [{}])[0]
        public = self.private_public = outcome.get("public_ip")
        target, kernel = self.private_table_route()
        answered, body, at_g, peers = self.private_request(name, timeout=3)
        self._private_listener(inst)
        inbound, inbound_body = self.lab.http(
            "tn-app", f"http://{public}:{topo.INSTANCE_PORT}/from-partner", timeout=3
        )
        asked = self._asked(name)
        ok = (
            not before_answered
            and before_at_g == 0
            and target_before is None
            and outcome.get("status") == "enrolled"
            and target == self.lab.aws.eni_id
            and kernel == f"{topo.PARTNER_NET} via {topo.GW_ENI} dev sn-1"
            and answered
            and peers == [public]
            and inbound_body == f"{name} saw {topo.APP}"
            and not asked
        )
        figure = (
            f"before: no {topo.PARTNER_NET} route in {rtb}: the VPC router drops it (GET "
            f"{'ANSWERED' if before_answered else 'no answer'}, {before_at_g} packets at G); "
            f"tag -> handler in {seconds:.2f}s: {outcome.get('status')}, S={public}; {rtb}: "
            f"{topo.PARTNER_NET} -> {target or 'none'}; router: {kernel or 'no route'}; "
            f"documents sent to {name}: {len(asked)}; GET -> {body!r} ({at_g} packets via G); "
            f"app log: {', '.join(peers) or 'nothing'}; partner -> S:{topo.INSTANCE_PORT} -> "
            f"{inbound_body!r}"
        )
        return Step(
            f"{name} in the private subnet (no SSM agent) tagged: route table -> G, reaches A as S",
            ok,
            figure,
            {
                "step_seconds": time.monotonic() - step_started,
                "outcome": outcome,
                "seconds": seconds,
                "before_answered": before_answered,
                "before_at_g": before_at_g,
                "target_before": target_before,
                "target": target,
                "kernel": kernel,
                "answered": answered,
                "body": body,
                "at_g": at_g,
                "peers": peers,
                "inbound": inbound,
                "inbound_body": inbound_body,
                "asked": asked,
            },
        )

    def _private_listener(self, inst: topo.Instance) -> None:
        """The listener the partner connects to, on a private instance (once)."""
        if self.lab.spawned(f"{inst.name}-listener"):
            return
        log = self.lab.listener_log(inst.name)
        py = str(topo.REPO / ".venv" / "bin" / "python")
        argv = [py, "-m", "lab.app_server", "--name", inst.name]
        argv += ["--port", str(topo.INSTANCE_PORT), "--log", str(log)]
        self.lab.spawn(f"{inst.name}-listener", inst.ns, argv)
        self.lab.wait_listening(inst.ns, topo.INSTANCE_PORT)

    def private_neighbour_dropped(self, name: str = PRIV2) -> Step:
        """The untagged neighbour behind the same table: its packets for the partner now reach
        the gateway (the table sends the partner's networks there), which drops them, counted."""
        step_started = time.monotonic()
        dropped_before = self.lab.nft_counter("dropped_unenrolled")
        target, kernel = self.private_table_route()
        answered, body, at_g, peers = self.private_request(name)
        dropped = self.lab.nft_counter("dropped_unenrolled") - dropped_before
        asked = self._asked(name)
        ok = (
            target == self.lab.aws.eni_id
            and not answered
            and at_g > 0
            and dropped > 0
            and not peers
            and not asked
        )
        figure = (
            f"untagged {name}, same table ({topo.PARTNER_NET} -> {target}): GET -> "
            f"{body.rsplit(':', 1)[-1].strip() if not answered else repr(body)}; {at_g} packets "
            f"reached G; gateway dropped {dropped} (dropped_unenrolled); app log: "
            f"{'nothing new' if not peers else peers}"
        )
        return Step(
            f"untagged {name} behind the same table is dropped at the gateway (counted)",
            ok,
            figure,
            {
                "step_seconds": time.monotonic() - step_started,
                "target": target,
                "answered": answered,
                "at_g": at_g,
                "dropped": dropped,
                "peers": peers,
                "asked": asked,
            },
        )

    def private_last_leaves(self, name: str = PRIV1) -> Step:
        """The last enrolled instance behind the table is untagged: the route goes, in EC2 and
        therefore on the VPC router; its mapping goes; its packets no longer reach G."""
        step_started = time.monotonic()
        inst = self.lab.instance(name)
        rtb = self.lab.aws.private_route_table_id
        started = time.monotonic()
        reply = self.controller.tag_changed(name, enrol=False)
        seconds = time.monotonic() - started
        outcome = (reply.get("outcomes") or [{}])[0]
        target, kernel = self.private_table_route()
        stored = self.lab.aws.mappings()
        answered, body, at_g, peers = self.private_request(name)
        asked = self._asked(name)
        ok = (
            outcome.get("status") == "not-tagged"
            and target is None
            and kernel is None
            and inst.private_ip not in stored
            and not answered
            and at_g == 0
            and not peers
            and not asked
        )
        figure = (
            f"untag -> handler in {seconds:.2f}s: {outcome.get('status')}; {rtb}: "
            f"{topo.PARTNER_NET} {'-> ' + target if target else 'gone'} (DeleteRoute); router: "
            f"{kernel or 'no route, dropped'}; mapping "
            f"{'STILL THERE' if inst.private_ip in stored else 'gone'}; GET "
            f"{'ANSWERED' if answered else 'no answer'}, {at_g} packets at G"
        )
        return Step(
            f"the last enrolled instance behind the table leaves: the route is gone ({name})",
            ok,
            figure,
            {
                "step_seconds": time.monotonic() - step_started,
                "outcome": outcome,
                "target": target,
                "kernel": kernel,
                "stored": stored,
                "answered": answered,
                "at_g": at_g,
                "peers": peers,
                "asked": asked,
            },
        )

    def foreign_route_left_alone(self, name: str = PRIV1) -> Step:
        """Another team routes the partner's network in the private table to their own appliance
        (an instance at 10.10.2.50, its check off). Tagging ``name`` then is ``route-conflict``,
        naming table and route; the route is never replaced, nor deleted when ``name`` leaves."""
        step_started = time.monotonic()
        ec2 = self.lab.aws.client("ec2")
        rtb = self.lab.aws.private_route_table_id
        appliance = self.lab.aws.run_appliance(FOREIGN_APPLIANCE)
        eni = appliance["eni_id"]
        ec2.create_route(
            RouteTableId=rtb, DestinationCidrBlock=topo.PARTNER_NET, NetworkInterfaceId=eni
        )
        try:
            _, kernel_before = self.private_table_route()
            reply = self.controller.tag_changed(name, enrol=True)
            outcome = (reply.get("outcomes") or [{}])[0]
            target, kernel = self.private_table_route()
            status_tag = self.lab.aws.tags(self.lab.aws.instance_ids[name]).get(
                f"tunnelnat:status:{topo.DEPLOYMENT}"
            )
            answered, _, at_g, peers = self.private_request(name)
            reply = self.controller.tag_changed(name, enrol=False)
            left = (reply.get("outcomes") or [{}])[0]
            target_after_leave, _ = self.private_table_route()
        finally:
            # The other team takes its route and appliance away again.
            ec2.delete_route(RouteTableId=rtb, DestinationCidrBlock=topo.PARTNER_NET)
            ec2.terminate_instances(InstanceIds=[appliance["instance_id"]])
            self.lab.vpc_router.sync()
        reason = str(outcome.get("reason", ""))
        asked = self._asked(name)
        ok = (
            outcome.get("status") == "route-conflict"
            and rtb in reason
            and eni in reason
            and status_tag == "route-conflict"
            and target == eni
            and kernel == kernel_before == f"{topo.PARTNER_NET} via {FOREIGN_APPLIANCE} dev sn-2"
            and not answered
            and at_g == 0
            and not peers
            and left.get("status") == "not-tagged"
            and target_after_leave == eni
            and not asked
        )
        figure = (
            f"{rtb} already sends {topo.PARTNER_NET} -> {eni} (another team's appliance "
            f"{FOREIGN_APPLIANCE}); tag {name} -> {outcome.get('status')}: {reason!r}; status tag "
            f"{status_tag}; route left alone: {topo.PARTNER_NET} -> {target} (router: {kernel}); "
            f"GET {'ANSWERED' if answered else 'no answer'}, {at_g} packets at G; untag -> "
            f"{left.get('status')}, their route still -> {target_after_leave}"
        )
        return Step(
            "a route someone else put in the table is left alone and reported (route-conflict)",
            ok,
            figure,
            {
                "step_seconds": time.monotonic() - step_started,
                "outcome": outcome,
                "reason": reason,
                "status_tag": status_tag,
                "eni": eni,
                "target": target,
                "kernel": kernel,
                "kernel_before": kernel_before,
                "answered": answered,
                "at_g": at_g,
                "peers": peers,
                "left": left,
                "target_after_leave": target_after_leave,
                "asked": asked,
            },
        )

    # -- 6 -------------------------------------------------------------------------------------
    def fail_closed(self, name: str = WEB1) -> Step:
        inst = self.lab.instance(name)
        self.lab.kill_gateway_charon()
        dropped_before = self.lab.nft_counter("dropped_cleartext")
        with self.lab.capture("tn-inet", "to-gw", f"host {topo.APP}") as clear:
            answered, _ = self.lab.http(inst.ns, self.app_url(name), timeout=2)
        dropped = self.lab.nft_counter("dropped_cleartext") - dropped_before
        started = time.monotonic()
        self.lab.start_gateway_charon()
        back = False
        while not back and time.monotonic() - started < 15:
            back, _ = self.lab.http(inst.ns, self.app_url(name), timeout=1)
        seconds = time.monotonic() - started
        ok = not answered and not clear and dropped > 0 and back
        figure = (
            f"gateway charon killed (-9): {name} GET {'ANSWERED' if answered else 'no answer'}; "
            f"{len(clear)} clear-text packets to A on the internet link; gateway dropped "
            f"{dropped} (dropped_cleartext); charon restarted -> traffic again after "
            f"{seconds:.2f}s" + ("" if back else " (NEVER)")
        )
        return Step(
            "the gateway fails closed while its IKE daemon is down",
            ok,
            figure,
            {
                "answered": answered,
                "clear": len(clear),
                "dropped": dropped,
                "back": back,
                "seconds": seconds,
            },
        )

    # -- gateway reboot (issue 11) ------------------------------------------------------------
    def gateway_reboot(self, name: str = WEB1) -> Step:
        """The gateway reboots while ``name`` keeps sending to A: its boot units (the same files
        its user data writes) bring it back on their own, fail-closed throughout, and the NAT
        table comes back from DynamoDB without the controller."""
        inst = self.lab.instance(name)
        public = self.public or ""
        documents_before = len(self.lab.commands.history)
        # A new flow per datagram (a fresh socket, a new source port): each one is NATed by the
        # table as it is at that moment, never by a connection-tracking entry from before.
        sender = (
            "import socket, time\n"
            "while True:\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"    s.sendto(b'reboot', ('{topo.APP}', 9))\n"
            "    s.close()\n"
            "    time.sleep(0.02)\n"
        )
        at_a = f"udp and dst port 9 and src host {public}"
        with (
            self.lab.capture("tn-inet", "to-gw", f"host {topo.APP}") as clear,
            self.lab.capture("tn-app", "eth0", at_a, epoch=True) as arrived,
        ):
            proc = subprocess.Popen(
                topo.machine_argv(inst.ns, [sys.executable, "-c", sender]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                time.sleep(0.5)  # flowing before the reboot
                self.lab.power_off_gateway()
                powered_off = time.time()
                time.sleep(0.5)  # off: nothing of the gateway answers
                booted = time.time()
                boot = self.lab.boot_gateway()
                boot_seconds = time.time() - booted
                back = False
                while not back and time.time() - booted < 30:
                    back, _ = self.lab.http(inst.ns, self.app_url(name), timeout=1)
                time.sleep(0.3)
            finally:
                topo.stop_group(proc)
        times = sorted(float(line.split()[0]) for line in arrived if line.strip())
        during_off = [t for t in times if powered_off < t < booted]
        after = [t for t in times if t >= booted]
        to_a = after[0] - booted if after else None
        runs = {r.name: r for r in boot.runs}
        sync = runs.get("tunnelnat-sync.service")
        synced = _last_json(sync.output) if sync else {}
        snat = self.lab.nft_elements("map", "snat_map")
        applied = self.lab.nft_elements("set", "applied_generation")
        documents = len(self.lab.commands.history) - documents_before
        mapped = f"{inst.private_ip} : {public}" in snat
        ok = (
            not clear
            and not during_off
            and to_a is not None
            and back
            and mapped
            and bool(applied)
            and documents == 0
            and all(r.state == "done" for r in boot.runs)
            and synced.get("action") == "full"
        )
        order = " -> ".join(
            f"{r.name.removesuffix('.service')} {r.state} {r.seconds:.2f}s"
            for r in boot.runs
            if r.name.startswith(("tunnelnat", "strongswan"))
        )
        figure = (
            f"reboot while {name} sends to A every 20 ms: {len(clear)} clear-text packets to A on "
            f"the internet link; boot units in {boot_seconds:.2f}s ({order}); NAT back from "
            f"DynamoDB without the controller ({documents} documents run; sync "
            f"{synced.get('action')}, generation {synced.get('applied_generation')}, "
            f"{synced.get('mappings')} mappings); boot start -> first packet at A as S "
            + (f"{to_a:.2f}s" if to_a is not None else "NEVER")
        )
        return Step(
            "the gateway reboots: guard first, ENI, table from DynamoDB; traffic back on its own",
            ok,
            figure,
            {
                "clear": len(clear),
                "clear_packets": clear[:10],
                "arrived_while_off": len(during_off),
                "boot_seconds": boot_seconds,
                "boot_to_a": to_a,
                "units": [
                    (r.name, r.state, round(r.started, 3), round(r.seconds, 3)) for r in boot.runs
                ],
                "sync": synced,
                "documents": documents,
                "mapped": mapped,
                "applied_generation": applied,
                "answered": back,
            },
        )

    # -- gateway pair failover (issue 15) --------------------------------------------------------
    def gateway_failover(self, name: str = WEB1) -> Step:
        """The standby (built now, if the lab has none) takes over from a powered-off active
        while ``name`` sends to A (lab.failover_story). ``name`` is enrolled first if it is not."""

        inst = self.lab.instance(name)
        enrolled = self.lab.aws.mappings().get(inst.private_ip)
        prefix = ""
        if enrolled is None:
            step = self.enrol(name)
            if not step.ok:
                return Step("gateway failover", False, f"could not enrol {name}: {step.figure}")
            enrolled = self.public
            prefix = f"{name} tagged again (S={enrolled}); "
        report = run_failover(self.lab, name, enrolled or "")
        built = report.standby_built_seconds
        if built is not None:
            prefix += (
                f"standby {topo.STANDBY_NS} built, booted as standby, configured and synced in "
                f"{built:.1f}s; "
            )
        seen, ok = self._pair_status()
        return Step(
            "gateway failover: the standby takes G's ENI from a powered-off active",
            report.ok and ok,
            prefix + failover_figure(report) + "; " + seen,
            {"failover": report},
        )

    # -- the pair as EC2 and CloudFormation behave (issue 20, lab.pair_stories) -----------------
    def _pair_ready(self, name: str) -> tuple[str, str | None]:
        """The standby built (booted as standby, configured, synced) if the lab has none, and
        ``name`` enrolled; (what was done, a problem or None)."""
        done = ""
        if not self.lab.standby_id:
            started = time.monotonic()
            self.lab.add_standby_gateway()
            done += (
                f"standby {topo.STANDBY_NS} built, booted as standby, configured and synced in "
                f"{time.monotonic() - started:.1f}s; "
            )
        inst = self.lab.instance(name)
        if self.lab.aws.mappings().get(inst.private_ip) is None:
            step = self.enrol(name)
            if not step.ok:
                return done, f"could not enrol {name}: {step.figure}"
            done += f"{name} tagged again (S={self.public}); "
        return done, None

    def pair_switchover(self, name: str = WEB1) -> Step:
        """A planned switchover (the Switchover document's request) while ``name`` sends."""

        title = "planned switchover: the active hands G's ENI to the standby under traffic"
        done, problem = self._pair_ready(name)
        if problem:
            return Step(title, False, problem)
        report = run_switchover(self.lab, name)
        return Step(title, report.ok, done + report.figure(), {"switchover": report})

    def pair_upgrade(self, name: str = WEB1) -> Step:
        """New gateway software on both gateways (the association, one at a time) under
        traffic (issue 22)."""

        title = "gateway software upgraded on the running pair (the association) under traffic"
        done, problem = self._pair_ready(name)
        if problem:
            return Step(title, False, problem)
        report = run_upgrade(self.lab, name)
        return Step(title, report.ok, done + report.figure(), {"upgrade": report})

    def pair_slow_aws(self, name: str = WEB1, duration: float = 60.0) -> Step:
        """Every EC2/DynamoDB call of the active delayed 3 s for a minute: no failover."""

        title = "slow AWS on the active (3 s a call for a minute): no failover"
        done, problem = self._pair_ready(name)
        if problem:
            return Step(title, False, problem)
        report = run_slow_aws(self.lab, name, duration=duration)
        return Step(title, report.ok, done + report.figure(), {"slow_aws": report})

    def pair_rolling(self, name: str = WEB1) -> Step:
        """Both gateways replaced one at a time, as CloudFormation's rolling update does it."""

        title = "rolling replacement of both gateways (termination hook, signal) under traffic"
        done, problem = self._pair_ready(name)
        if problem:
            return Step(title, False, problem)
        report = run_rolling_replacement(self.lab, name)
        return Step(title, report.ok, done + report.figure(), {"rolling": report})

    def _pair_status(self) -> tuple[str, bool]:
        """What ``tunnelnat status`` says of the pair after the failover, and whether it names
        the instance that now holds G's ENI as the active."""

        try:
            pair = status_json(self.lab)["pair"] or {}
        except (topo.LabError, ValueError, KeyError) as exc:
            return f"tunnelnat status failed: {exc}", False
        last = pair.get("last_failover") or {}
        holder = self.lab.eni_holder()
        text = (
            f"`tunnelnat status`: active {pair.get('active')}, standby "
            f"{', '.join(s['instance_id'] for s in pair.get('standbys', [])) or 'none'}, "
            f"last failover {last.get('from')} -> {last.get('to')} ({pair.get('failovers', 0)} "
            "in all)"
        )
        return text, pair.get("active") == holder and last.get("to") == holder

    # -- 7 -------------------------------------------------------------------------------------
    def restart_tunnel(self, name: str = WEB1) -> Step:
        # As the healer sends it: a tunnel whose CHILD_SAs are installed and received packets
        # in the last QuietSeconds (120 by default) is left alone (issue 21: a forged alarm cuts
        # nothing); QuietSeconds 0 restarts it whatever it carries, as an operator may.
        gateway = self.lab.aws.gateway_id
        gentle = self.lab.commands.run(gateway, "RestartTunnel", {"TunnelName": topo.TUNNEL})
        first = _last_json(gentle.stdout)
        result = self.lab.commands.run(
            gateway, "RestartTunnel", {"TunnelName": topo.TUNNEL, "QuietSeconds": "0"}
        )
        report = _last_json(result.stdout)
        answered, body = self.lab.http(self.lab.instance(name).ns, self.app_url(name))
        ok = gentle.ok and first.get("up") is True
        ok = ok and result.ok and report.get("up") is True and "skipped" not in report
        ok = ok and answered
        left = (
            f"left alone ({first['skipped']}: its SA received packets "
            f"{first.get('inbound_seconds')}s ago)"
            if first.get("skipped")
            else f"restarted (no recent traffic), up after {first.get('seconds')}s"
        )
        figure = (
            f"RestartTunnel as the healer sends it: {left}; with QuietSeconds=0 "
            f"{result.status}: up={report.get('up')} after {report.get('seconds')}s; "
            f"{name} GET afterwards -> {body!r}"
        )
        return Step(
            "RestartTunnel leaves a healthy tunnel alone, restarts on demand, traffic flows",
            ok,
            figure,
            {"first": first, "report": report, "answered": answered},
        )

    # -- 8 -------------------------------------------------------------------------------------
    def unenrol(self, name: str = WEB1) -> Step:
        inst = self.lab.instance(name)
        before = len(self.lab.app_peers())
        started = time.monotonic()
        reply = self.controller.tag_changed(name, enrol=False)
        seconds = time.monotonic() - started
        outcome = (reply.get("outcomes") or [{}])[0]
        route = any(r.startswith(topo.PARTNER_NET) for r in self.lab.routes(inst.ns))
        snat = self.lab.nft_elements("map", "snat_map")
        dnat = self.lab.nft_elements("map", "dnat_map")
        stored = self.lab.aws.mappings()
        answered, err = self.lab.http(inst.ns, self.app_url(name), timeout=2)
        # And with the route put back by hand, the gateway refuses it like any stranger.
        topo.in_ns(inst.ns, ["ip", "route", "replace", topo.PARTNER_NET, "via", topo.GW_ENI])
        try:
            answered_by_hand, _ = self.lab.http(inst.ns, self.app_url(name), timeout=2)
        finally:
            topo.in_ns(inst.ns, ["ip", "route", "del", topo.PARTNER_NET], check=False)
        inbound, _ = self.lab.http(
            "tn-app", f"http://{self.public}:{topo.INSTANCE_PORT}/after-untag", timeout=2
        )
        arrived = self.lab.app_peers()[before:]
        # Only web-1's own entries must go: other instances (the burst's) stay mapped.
        own_snat = [e for e in snat if e.split(" : ")[0] == inst.private_ip]
        own_dnat = [e for e in dnat if e.split(" : ")[-1] == inst.private_ip]
        gone = not route and not own_snat and not own_dnat and inst.private_ip not in stored
        ok = gone and not answered and not answered_by_hand and not inbound and not arrived

        def yes_no(flag: bool) -> str:
            return "answered" if flag else "no answer"

        figure = (
            f"untag -> event -> handler in {seconds:.2f}s: {outcome.get('status')}; route on "
            f"{name}: {'STILL THERE' if route else 'gone'}; gateway maps: "
            f"{'STILL ' + str(own_snat + own_dnat) if own_snat or own_dnat else 'its entries gone'}"
            f"{f' ({len(snat)} other mappings stay)' if snat else ' (empty)'}; "
            f"GET: {yes_no(answered)} "
            f"(with a hand-made route: {yes_no(answered_by_hand)}); partner -> S: "
            f"{yes_no(inbound)}; app log: {'nothing new' if not arrived else arrived}"
        )
        return Step(
            f"{name} untagged: route and mapping gone, traffic no longer arrives",
            ok,
            figure,
            {
                "outcome": outcome,
                "route": route,
                "snat": snat,
                "dnat": dnat,
                "stored": stored,
                "answered": answered,
                "answered_by_hand": answered_by_hand,
                "inbound": inbound,
                "arrived": arrived,
            },
        )

    # -- the operator's view -----------------------------------------------------------------
    def status_cli(self, name: str = WEB1) -> Step:
        """``tunnelnat status`` (the installed CLI) against the lab: ``name`` enrolled with S."""
        inst = self.lab.instance(name)
        text = run_cli(self.lab, "status")
        doc = status_json(self.lab)
        row = next((r for r in doc["instances"] if r["instance_id"] == inst.instance_id), {})
        ok = (
            text.returncode == 0
            and row.get("status") == "enrolled"
            and row.get("public_ip") == self.public
            and row.get("private_ip") == inst.private_ip
        )
        figure = (
            f"`tunnelnat status` (exit {text.returncode}): {name} {row.get('status')} with "
            f"S={row.get('public_ip')}; gateway generation applied "
            f"{doc['gateway']['applied_generation']} / desired "
            f"{doc['gateway']['desired_generation']}"
        )
        return Step(
            f"the operator's `tunnelnat status` shows {name} enrolled with S",
            ok,
            figure,
            {"output": text.stdout, "stderr": text.stderr, "json": doc, "row": row},
        )

    def wait_tunnel_metric_up(self, timeout: float = 120) -> float:
        """Run the gateway's health agent (as its timer would) until ``tunnelnat status`` reads
        every tunnel up; the seconds that took. The CLI judges the newest 1-minute Minimum of
        TunnelUp, so after a kill (the healing story) it reads down until that minute is over."""
        started = time.monotonic()
        while True:
            run_agent(self.lab)
            tunnels = status_json(self.lab)["tunnels"]
            if tunnels and all(t["state"] == "up" for t in tunnels):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                return time.monotonic() - started
            time.sleep(3)

    def doctor_cli(self) -> Step:
        """``tunnelnat doctor`` against the lab: no finding; what moto cannot answer is said."""
        waited = self.wait_tunnel_metric_up()
        with quiet_moto_errors():
            proc = run_cli(self.lab, "doctor")
        code, report = doctor_json(self.lab)
        failed = [f for f in report["findings"] if f["status"] == "fail"]
        unknown = [f for f in report["findings"] if f["status"] == "unknown"]
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        summary = lines[-1] if lines else proc.stderr.strip()
        eni = [f for f in report["findings"] if f["check"] == "fixed-eni"]
        ok = not failed and bool(eni) and all(f["status"] == "ok" for f in eni)
        figure = (
            f"`tunnelnat doctor` (after {waited:.0f}s for TunnelUp's last minute to read up): "
            f"{summary!r} ({report['counts']['ok']} checks ok"
        )
        if unknown:
            figure += "; could not run: " + "; ".join(
                f"{f['check']}: {f['summary']}" for f in unknown
            )
        figure += ")"
        if failed:
            figure += "; FINDINGS: " + "; ".join(f"{f['check']}: {f['summary']}" for f in failed)
        return Step(
            "the operator's `tunnelnat doctor` finds nothing wrong",
            ok,
            figure,
            {"output": proc.stdout, "exit": code, "report": report, "summary": summary},
        )

    def impostor(self, name: str = WEB2) -> Step:
        """Issue 21: an instance labelled like the gateway gets no command; doctor names it
        (lab/impostor_story.py). ``name`` is enrolled and unenrolled to make the controller
        sync."""

        result = run_impostor(self.lab, self.controller, name)
        return Step(
            "an impostor labelled like the gateway gets no command, and doctor names it",
            result["ok"],
            impostor_figure(result),
            result,
        )

    # -- issue 5 and issue 4's stories ---------------------------------------------------------
    def healing(self, name: str = WEB1) -> Step:
        report = run_healing_story(
            self.lab, self.controller, public=self.public or "", instance=name
        )
        return Step(
            "the gateway's charon is killed; alarm -> healer -> RestartTunnel heal the tunnel",
            report.ok,
            report.figure(),
            {"report": report, "kill_to_restored": report.kill_to_restored},
        )

    def burst(self, count: int = 20) -> Step:
        report = self.burst_report = run_burst_story(self.lab, self.controller, count=count)
        return Step(
            f"Auto Scaling burst: {count} launches held at the hook, enrolled, released",
            report.ok,
            report.figure(),
            {"report": report},
        )

    def scale_in(self) -> Step:
        if self.burst_report is None:
            return Step("Auto Scaling scale-in", False, "no burst to scale in")
        report = run_scale_in(self.lab, self.controller, self.burst_report)
        return Step(
            f"Auto Scaling scale-in: {len(report.instances)} terminations held until their "
            "mappings and addresses are gone",
            report.ok,
            report.figure(),
            {"scale_in": report},
        )

    # -- real partners (issue 12) ---------------------------------------------------------------
    def rekey(self, name: str = WEB1, *, deadline: float = 70.0, wanted: int = 3) -> Step:
        """A 100 packets/s stream from ``name`` to A across CHILD_SA and IKE_SA rekeys started
        by both sides. The partner (AWS-like profile, short lifetimes: its CHILD_SA rekeys 10-15 s
        into each SA's life, its IKE_SA 20-30 s) rekeys on its own clock; ours are as short
        (CHILD 18-20 s, IKE 38-40 s), so to rekey as often ourselves we start one with ``swanctl
        --rekey`` (the exchange our lifetimes start) 2 s after each of the partner's."""

        inst = self.lab.instance(name)
        public = self.public or ""
        self.lab.stop_partner_charon()
        self.lab.write_partner(self.lab.partner, child_life=20, ike_life=40)
        configured = self.lab.configure_gateway(ChildLifetimes="20,30,2", IkeLifetimes="40,10,2")
        # The stale SA goes; the AWS-like partner initiates as it starts.
        topo.in_ns(
            "tn-gw", ["swanctl", "--terminate", "--ike", topo.TUNNEL, "--force"], check=False
        )
        self.lab.start_partner_charon()
        _wait(lambda: self.lab.child_sas_installed() >= 1, 15)
        ours_log, theirs_log = self._charon_logs()
        sender = (
            "import signal, socket, sys, time\n"
            "n = 0\n"
            "def stop(*_):\n"
            "    print(n, flush=True)\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "start = time.monotonic()\n"
            "while True:\n"
            f"    s.sendto(n.to_bytes(4, 'big'), ('{topo.APP}', 9))\n"
            "    n += 1\n"
            "    time.sleep(max(0, start + n / 100 - time.monotonic()))\n"
        )
        at_a = f"udp and dst port 9 and src host {public}"
        started = time.monotonic()
        ours = theirs = ike_ours = 0
        with (
            self.lab.capture("tn-inet", "to-gw", f"host {topo.APP}") as clear,
            self.lab.capture("tn-app", "eth0", at_a) as arrived,
        ):
            proc = subprocess.Popen(
                topo.machine_argv(inst.ns, [sys.executable, "-c", sender]),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
            try:
                seen = 0
                while time.monotonic() - started < deadline:
                    gw_now, pvpn_now = self._charon_logs()
                    theirs = count_rekeys(pvpn_now[len(theirs_log) :]).child_initiated
                    ike = count_rekeys(gw_now[len(ours_log) :]).ike_rekeyed
                    if theirs >= wanted and ours >= wanted and ike >= 2:
                        break  # and an IKE_SA rekey each: ours, and the partner's by lifetime
                    if theirs > seen:  # the partner just rekeyed: our turn in 2 s
                        seen = theirs
                        time.sleep(2)
                        what = "--ike" if ours == 1 and not ike_ours else "--child"
                        topo.in_ns("tn-gw", ["swanctl", "--rekey", what, topo.TUNNEL], check=False)
                        ike_ours += what == "--ike"
                        ours += what == "--child"
                    time.sleep(0.2)
                time.sleep(1)  # the last packets in flight
            finally:
                proc.send_signal(signal.SIGTERM)
                out, _ = proc.communicate(timeout=5)
        seconds = time.monotonic() - started
        sent = int(out.strip() or 0)
        received = len([line for line in arrived if line.strip()])
        gw_log, pvpn_log = self._charon_logs()
        mine = count_rekeys(gw_log[len(ours_log) :])
        partner = count_rekeys(pvpn_log[len(theirs_log) :])
        lost = sent - received
        ok = (
            configured.ok
            and lost == 0
            and not clear
            and mine.child_initiated >= wanted
            and partner.child_initiated >= wanted
            and mine.ike_rekeyed >= 2
            and mine.make_before_break
            and partner.make_before_break
            and sent >= 50 * seconds * 0.9
        )
        figure = (
            f"{sent} packets from {name} to A in {seconds:.0f}s ({sent / seconds:.0f}/s) across "
            f"{mine.child_initiated} CHILD_SA rekeys we started and {partner.child_initiated} "
            f"the partner started, {mine.ike_rekeyed} IKE_SA rekeys: {lost} lost, {len(clear)} "
            f"clear-text packets; new SA installed before the old one closed: "
            f"{'yes' if mine.make_before_break and partner.make_before_break else 'NO'}"
        )
        restored = self._restore_partner()
        return Step(
            "rekeys without loss: CHILD_SA and IKE_SA, started by us and by the partner",
            ok and restored,
            figure,
            {
                "sent": sent,
                "received": received,
                "lost": lost,
                "clear": len(clear),
                "seconds": seconds,
                "ours": mine.child_initiated,
                "theirs": partner.child_initiated,
                "ike": mine.ike_rekeyed,
                "make_before_break": mine.make_before_break and partner.make_before_break,
            },
        )

    def broken_partner(self, profile: str = "no-common-proposal") -> Step:
        """A partner that cannot work, and the health agent's one line on why (read from
        charon's log on the gateway); then the AWS-like partner again."""
        line = diagnose_partner(self.lab, profile)
        restored = self._restore_partner()
        return Step(
            f"broken partner ({profile}): the health agent names the cause",
            bool(line) and restored,
            f"health agent: {line}",
            {"diagnosis": line},
        )

    def _charon_logs(self) -> tuple[str, str]:
        ours = topo.in_ns("tn-gw", ["cat", topo.CHARON_LOG], check=False)
        theirs = (topo.LOGS / "tn-pvpn-charon.log").read_text(errors="replace")
        return ours, theirs

    def _restore_partner(self) -> bool:
        """The AWS-like partner with its own lifetimes, ours the defaults; tunnel up again."""
        self.lab.stop_partner_charon()
        self.lab.write_partner(self.lab.partner)
        result = self.lab.configure_gateway()
        topo.in_ns(
            "tn-gw", ["swanctl", "--terminate", "--ike", topo.TUNNEL, "--force"], check=False
        )
        self.lab.start_partner_charon()
        return result.ok and _wait(lambda: self.lab.child_sas_installed() >= 1, 15)

    def all_steps(self, *, burst: int = 20) -> list[Any]:
        """The story in order (callables, so a runner can stop or report as it goes)."""
        steps = [
            self.tunnel,
            self.enrol,
            self.status_cli,
            self.request_arrives_as_s,
            self.partner_reaches_instance,
            self.unenrolled_blocked,
            self.private_enrol,
            self.private_neighbour_dropped,
            self.private_last_leaves,
            self.foreign_route_left_alone,
            self.fail_closed,
            self.gateway_reboot,
            self.restart_tunnel,
            self.healing,
        ]
        if burst:
            steps += [functools.partial(self.burst, burst), self.scale_in]
        return [
            *steps,
            self.rekey,
            self.broken_partner,
            self.doctor_cli,
            self.impostor,
            self.unenrol,
            # The pair (issue 20): built by the first of these; web-1 enrolled again.
            self.pair_switchover,
            self.pair_upgrade,
            self.pair_slow_aws,
            self.pair_rolling,
            # Last: the active gateway stays powered off (the pair is one gateway short after).
            self.gateway_failover,
        ]


def _wait(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return bool(check())


def run_health_agent(lab: topo.Lab) -> dict[str, Any]:
    """The installed health agent, once, without publishing: its JSON line."""
    argv = [*agent_program("tn-gw"), "--tunnels", topo.TUNNEL]
    argv += ["--gateway-id", "i-lab", "--region", topo.REGION, "--dry-run"]
    argv += ["--state-file", "/etc/tunnelnat/lab-diagnosis-counters.json"]
    argv += ["--established-file", "/etc/tunnelnat/lab-diagnosis-established.json"]
    return _last_json(topo.in_ns("tn-gw", argv, check=False))


def diagnose_partner(lab: topo.Lab, profile: str, *, settle: float = 3.0) -> str | None:
    """Give the partner ``profile``, make our side try again, return the agent's diagnosis."""
    lab.reconfigure_partner(profile, start=profile != "down")
    topo.in_ns("tn-gw", ["swanctl", "--terminate", "--ike", topo.TUNNEL, "--force"], check=False)
    initiate = ["swanctl", "--initiate", "--child", topo.TUNNEL, "--timeout", "3"]
    topo.in_ns("tn-gw", initiate, check=False)
    time.sleep(settle)
    line = run_health_agent(lab)
    tunnels = line.get("tunnels") or [{}]
    return tunnels[0].get("diagnosis")
