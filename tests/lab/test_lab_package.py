"""The lab runs the gateway software the stack ships: documents bound to the archive the lab
built, refused unbound (no lab machine needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import package
from lab.commands import LabCommands
from lab.ssm_runner import DocumentError, bound_document, run_document
from tools.gateway_package import PLACEHOLDERS

BINDING = {"sha256": "a" * 64, "bucket": "tn-lab-assets", "key": "a.pyz", "region": "us-east-1"}


def _document(tmp_path: Path) -> Path:
    path = tmp_path / "Doc.yaml"
    path.write_text(
        'schemaVersion: "2.2"\n'
        "description: a gateway document\n"
        "mainSteps:\n"
        "  - action: aws:runShellScript\n"
        "    name: run\n"
        "    inputs:\n"
        "      runCommand:\n"
        f"        - echo {PLACEHOLDERS['sha256']} {PLACEHOLDERS['bucket']}\n"
    )
    return path


def test_a_document_is_run_bound(tmp_path: Path) -> None:
    inv = run_document(_document(tmp_path), {}, binding=BINDING)
    assert inv.ok, inv.stderr
    assert inv.stdout.split() == ["a" * 64, "tn-lab-assets"]


def test_an_unbound_document_is_refused_before_it_runs(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match="not bound"):
        run_document(_document(tmp_path), {})
    with pytest.raises(DocumentError, match="not bound"):
        bound_document({"x": PLACEHOLDERS["key"]}, {**BINDING, "key": PLACEHOLDERS["key"]})


def test_lab_commands_refuse_a_document_without_a_binding(tmp_path: Path) -> None:
    commands = LabCommands({"i-1": "tn-web-1"}, "i-gw", {})
    path = _document(tmp_path)
    commands.document_path = lambda _name: path  # type: ignore[method-assign]
    with pytest.raises(DocumentError, match="not bound"):
        commands.run("i-1", "AddHostRoute", {})


def test_the_lab_installs_as_the_user_data_does() -> None:
    published = package.LabPackage(
        package=package.GatewayPackage(Path("/x.pyz"), "b" * 64, "0.1.0+x", 1),
        bucket="tn-lab-assets",
        key=f"{'b' * 64}.pyz",
        region="us-east-1",
        parameter=package.parameter_name("lab"),
    )
    argv = package.installer_argv(published)
    assert argv == [
        "sh",
        "-c",
        package.INSTALL_SCRIPT,
        "/tunnelnat/lab/gateway-software",
        "us-east-1",
    ]
    assert published.parameter_value()["version"] == "0.1.0+x"
    gateway = pytest.importorskip("stacks.gateway")
    assert package.INSTALL_SCRIPT == gateway.INSTALL_SCRIPT
    assert package.INSTALLER == gateway.INSTALLER_PATH
    assert package.CURRENT == gateway.PACKAGE_PATH
