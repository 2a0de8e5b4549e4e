"""gateway/install_package.py, the gateway software's installer, against moto's S3 and SSM.

The user data runs it with ``--parameter`` at first boot, InstallGatewaySoftware with
``--current`` on every change, and every gateway document (embedded) when its package is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import install_package
import pytest
from moto import mock_aws

from tests.unit.imports import third_party_imports

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "gateway" / "install_package.py"
REGION = "eu-west-1"
BUCKET = "cdk-hnb659fds-assets-123456789012-eu-west-1"
PARAMETER = "/tunnelnat/lab/gateway-software"


def archive(n: int) -> bytes:
    return b"#!/usr/bin/env python3\n" + f"package {n}\n".encode() * 100


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@pytest.fixture
def aws(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield s3


def upload(s3, body: bytes) -> str:
    key = f"{sha(body)}.pyz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return key


def put_parameter(body: bytes, key: str, **changes: str) -> None:
    value = {"sha256": sha(body), "version": "0.1.0+x", "bucket": BUCKET, "key": key}
    value |= {"region": REGION, **changes}
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name=PARAMETER, Value=json.dumps(value), Type="String", Overwrite=True
    )


@pytest.fixture
def run(monkeypatch, capsys):
    """main() with LIB (TUNNELNAT_LIB on a gateway's lab) at ``lib``: its one JSON line."""

    def run(lib: Path, *argv: str) -> dict:
        monkeypatch.setattr(install_package, "LIB", str(lib))
        assert install_package.main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    return run


def test_installs_content_addressed_and_executable(aws, tmp_path):
    body = archive(1)
    key = upload(aws, body)
    result = install_package.install(BUCKET, key, sha(body), REGION, lib=str(tmp_path))
    path = tmp_path / "gateway" / f"{sha(body)}.pyz"
    assert result == {
        "sha256": sha(body),
        "path": str(path),
        "downloaded": True,
        "current": False,
        "previous": None,
        "changed": False,
    }
    assert path.read_bytes() == body and path.stat().st_mode & 0o111
    # Without --current the units' link is not made.
    assert not (tmp_path / "tunnelnat-gateway.pyz").exists()
    # Installed already: no download.
    again = install_package.install(BUCKET, key, sha(body), REGION, lib=str(tmp_path))
    assert again["downloaded"] is False


def test_a_download_with_another_sha256_is_refused_and_nothing_changes(aws, tmp_path):
    good, bad = archive(1), archive(2)
    key = upload(aws, good)
    install_package.install(BUCKET, key, sha(good), REGION, current=True, lib=str(tmp_path))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    aws.put_object(Bucket=BUCKET, Key="swapped.pyz", Body=bad)
    with pytest.raises(SystemExit, match=f"is {sha(bad)}, not {'0' * 64}"):
        install_package.install(
            BUCKET, "swapped.pyz", "0" * 64, REGION, current=True, lib=str(tmp_path)
        )
    with pytest.raises(SystemExit, match=f"is {sha(bad)}, not"):
        install_package.install(
            BUCKET, "swapped.pyz", sha(good)[:63] + "0", REGION, current=True, lib=str(tmp_path)
        )
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no temporary file left
    link = tmp_path / "tunnelnat-gateway.pyz"
    assert os.readlink(link) == f"gateway/{sha(good)}.pyz"


def test_a_half_written_archive_is_never_seen_under_its_name(aws, tmp_path, monkeypatch):
    """Written beside itself and renamed: a crash mid-write leaves the name absent (or the old
    whole file), never a partial archive a document would run."""
    body = archive(1)
    key = upload(aws, body)
    real_fsync = os.fsync

    def crash(fd):
        real_fsync(fd)
        raise OSError("power cut")

    monkeypatch.setattr(install_package.os, "fsync", crash)
    with pytest.raises(OSError, match="power cut"):
        install_package.install(BUCKET, key, sha(body), REGION, lib=str(tmp_path))
    assert not (tmp_path / "gateway" / f"{sha(body)}.pyz").exists()
    monkeypatch.setattr(install_package.os, "fsync", real_fsync)
    result = install_package.install(BUCKET, key, sha(body), REGION, lib=str(tmp_path))
    assert Path(result["path"]).read_bytes() == body


def test_current_swaps_the_units_link_in_one_rename(aws, tmp_path):
    one, two = archive(1), archive(2)
    key1, key2 = upload(aws, one), upload(aws, two)
    first = install_package.install(BUCKET, key1, sha(one), REGION, current=True, lib=str(tmp_path))
    assert (first["previous"], first["changed"]) == (None, True)
    link = tmp_path / "tunnelnat-gateway.pyz"
    assert link.is_symlink() and link.read_bytes() == one
    # Relative: the lib directory can be looked at from anywhere (a chroot, the lab's).
    assert os.readlink(link) == f"gateway/{sha(one)}.pyz"
    second = install_package.install(
        BUCKET, key2, sha(two), REGION, current=True, lib=str(tmp_path)
    )
    assert (second["previous"], second["changed"]) == (sha(one), True)
    assert link.read_bytes() == two
    # The previous archive stays: a document that is running it keeps its file.
    assert (tmp_path / "gateway" / f"{sha(one)}.pyz").read_bytes() == one
    same = install_package.install(BUCKET, key2, sha(two), REGION, current=True, lib=str(tmp_path))
    assert (same["previous"], same["changed"], same["downloaded"]) == (sha(two), False, False)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_old_archives_are_pruned_but_the_current_the_previous_and_young_ones_stay(aws, tmp_path):
    bodies = [archive(n) for n in range(6)]
    keys = [upload(aws, b) for b in bodies]
    versions = tmp_path / "gateway"
    for n, (body, key) in enumerate(zip(bodies, keys, strict=True)):
        install_package.install(BUCKET, key, sha(body), REGION, current=True, lib=str(tmp_path))
        # Each an hour older than the next (a young archive may be a document's in flight).
        path = versions / f"{sha(body)}.pyz"
        age = time.time() - 3600 * (10 - n)
        os.utime(path, (age, age))
    # One more install of the newest (no download) prunes with the ages set: the KEEP newest
    # stay, the rest are gone.
    install_package.install(
        BUCKET, keys[-1], sha(bodies[-1]), REGION, current=True, lib=str(tmp_path)
    )
    names = {p.name for p in versions.iterdir()}
    assert names == {f"{sha(b)}.pyz" for b in bodies[-install_package.KEEP :]}
    # The previous one is kept even when it is older than the KEEP newest.
    old, new = archive(10), archive(11)
    ko, kn = upload(aws, old), upload(aws, new)
    install_package.install(BUCKET, ko, sha(old), REGION, current=True, lib=str(tmp_path))
    path = versions / f"{sha(old)}.pyz"
    os.utime(path, (1, 1))  # the oldest of all
    install_package.install(BUCKET, kn, sha(new), REGION, current=True, lib=str(tmp_path))
    assert path.exists()  # previous of the current link


def test_parameter_names_the_archive(aws, tmp_path, run):
    body = archive(3)
    key = upload(aws, body)
    put_parameter(body, key)
    result = run(tmp_path, "--parameter", PARAMETER, "--region", REGION, "--current")
    assert result["sha256"] == sha(body) and result["changed"] is True
    assert (tmp_path / "tunnelnat-gateway.pyz").read_bytes() == body


def test_a_parameter_that_is_not_the_software_s_json_is_refused(aws, tmp_path, run):
    body = archive(3)
    key = upload(aws, body)
    for broken in ('{"sha256": "x"}', "not json", '["a"]'):
        boto3.client("ssm", region_name=REGION).put_parameter(
            Name=PARAMETER, Value=broken, Type="String", Overwrite=True
        )
        with pytest.raises(SystemExit, match="is not the gateway software's JSON"):
            run(tmp_path, "--parameter", PARAMETER, "--region", REGION)
    # A parameter naming an archive whose hash is not the one it says: refused on download.
    put_parameter(body, key, sha256="0" * 64)
    with pytest.raises(SystemExit, match="not 0000"):
        run(tmp_path, "--parameter", PARAMETER, "--region", REGION)
    assert not (tmp_path / "tunnelnat-gateway.pyz").exists()


def test_the_command_line_wants_the_archive_or_the_parameter(aws, tmp_path, capsys):
    with pytest.raises(SystemExit):
        install_package.main(["--bucket", BUCKET, "--key", "k"])
    assert "(or --parameter) are required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        install_package.main(["--parameter", PARAMETER, "--sha256", "0" * 64])
    assert "no --bucket, --key or --sha256" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is not a SHA-256"):
        install_package.main(
            ["--bucket", BUCKET, "--key", "k", "--sha256", "../etc", "--region", REGION]
        )


def test_the_installer_uses_only_the_standard_library_and_boto3():
    assert third_party_imports(INSTALLER) == {"boto3", "botocore"}
    # Runs with nothing of the repository on the path (as on a gateway, and as documents run it
    # from stdin).
    proc = subprocess.run(
        [sys.executable, "-I", "-", "--help"],
        input=INSTALLER.read_text(),
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert proc.returncode == 0 and "--parameter" in proc.stdout, proc.stderr


def test_the_compact_copy_documents_embed_is_the_same_program():
    """What tools/build_documents.py embeds in gateway documents: the installer without
    docstrings, comments and annotations, the same program otherwise."""
    import ast

    from tools.build_documents import embedded, strip_tree

    compact = embedded("gateway/install_package.py")
    assert ast.dump(ast.parse(compact)) == ast.dump(strip_tree(ast.parse(INSTALLER.read_text())))
    assert len(compact) < 0.7 * len(INSTALLER.read_text())
    assert "{{" not in compact
