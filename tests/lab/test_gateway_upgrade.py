"""Issue 22: new gateway software on a running pair under traffic (lab/upgrade_story.py).

One line of gateway code changed -> a new archive (a new SHA-256) in the asset bucket and the
deployment's parameter -> InstallGatewaySoftware run again on both gateways, one at a time (the
lab plays State Manager, and systemd's try-restart of the pair agent) -> both run the new version,
say so in DynamoDB, and nothing left in clear text.
"""

from __future__ import annotations

import json
import logging
import time

import pytest

from lab import topology as topo
from lab.controller import LabController
from lab.package import parameter_name
from lab.story import Story
from lab.upgrade_story import run_upgrade

pytestmark = pytest.mark.lab

WEB1 = "web-1"


@pytest.fixture(scope="module")
def upgrade():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with topo.Lab(instances_count=1, private_count=0, pair=True) as lab:
        with LabController(lab) as controller:
            story = Story(lab, controller)
            configured = lab.configure_gateway()
            assert configured.ok, configured.stderr[-1500:]
            assert story.enrol(WEB1).ok
            first = lab.software
            started = time.monotonic()
            report = run_upgrade(lab, WEB1)
            print(f"\nupgrade ({time.monotonic() - started:.0f}s): {report.figure()}")
            history = [(r.instance_id, r.document, r.status) for r in lab.commands.history]
            yield {"lab": lab, "first": first, "report": report, "history": history}
    assert lab.cleaned, "the lab left namespaces behind"


def test_the_change_is_a_new_archive_and_the_parameter_names_it(upgrade):
    lab, first, report = upgrade["lab"], upgrade["first"], upgrade["report"]
    assert report.sha256_before == first.sha256
    assert report.sha256_after != report.sha256_before
    assert report.version_after != report.version_before
    value = lab.aws.client("ssm").get_parameter(Name=parameter_name(topo.DEPLOYMENT))
    deployed = json.loads(value["Parameter"]["Value"])
    assert (deployed["sha256"], deployed["version"]) == (report.sha256_after, report.version_after)
    # Documents run from now on are bound to the new archive, as a new synthesis binds them.
    assert lab.commands.binding["sha256"] == report.sha256_after


def test_the_association_ran_again_on_both_gateways_one_at_a_time(upgrade):
    lab, report = upgrade["lab"], upgrade["report"]
    runs = [(i, s) for i, d, s in upgrade["history"] if d == "InstallGatewaySoftware"]
    assert sorted(i for i, _ in runs) == sorted(lab.gateway_namespaces()), runs
    assert all(s == "Success" for _, s in runs), report.figure()
    # The standby first, then the active; each installed the new archive and made it current.
    assert [u.role for u in report.upgrades] == ["standby", "active"], report.figure()
    for u in report.upgrades:
        assert u.result["sha256"] == report.sha256_after, u
        assert u.result["changed"] is True and u.result["previous"] == report.sha256_before, u
        assert u.restarted_by, u  # the pair agent runs the new archive (systemd, or the lab's)
        assert u.back_after is not None, u


def test_both_gateways_run_and_report_the_new_version(upgrade):
    report = upgrade["report"]
    for ns, found in report.installed.items():
        assert found["sha256"] == report.sha256_after, (ns, found)
        assert found["version"] == report.version_after, (ns, found)
    assert len(report.reported) == 2
    for instance_id, software in report.reported.items():
        assert software.get("sha256") == report.sha256_after, (instance_id, software)
        assert software.get("version") == report.version_after, (instance_id, software)


def test_tunnelnat_status_shows_the_new_version_on_both(upgrade):
    lab, report = upgrade["lab"], upgrade["report"]
    assert sorted(report.status_software) == sorted(lab.gateway_namespaces()), report.figure()
    for instance_id, shown in report.status_software.items():
        assert shown["version"] == report.version_after, (instance_id, shown)
        assert shown["sha256"] == report.sha256_after and shown["deployed"] is True, shown


def test_the_upgrade_sends_nothing_in_clear_text_and_fails_nothing_over(upgrade):
    report = upgrade["report"]
    assert report.clear == [], report.clear
    assert report.failovers_after == report.failovers_before, report.figure()
    assert sorted(report.roles_after.values()) == ["active", "standby"], report.roles_after
    assert report.sent > 0
    assert report.ok, report.figure()
