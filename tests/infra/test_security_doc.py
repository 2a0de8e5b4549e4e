"""docs/security.md's least-privilege table is what tools/iam_table.py prints from the example
deployment's synthesized template (issue 21: the table is generated, and kept current here)."""

from __future__ import annotations

import pytest

from tests.infra.conftest import ROOT, synthesize
from tools.iam_table import BEGIN, END, table

DOC = ROOT / "docs" / "security.md"


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cdk.out"), nag=False)


def test_the_documented_table_is_the_generated_one(s):
    text = DOC.read_text()
    assert BEGIN in text and END in text
    documented = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    generated = table(s.json)
    assert documented == generated, (
        "docs/security.md is out of date: replace the table between the markers with "
        "`.venv/bin/python -m tools.iam_table cdk.out/tunnelnat.template.json` after `make synth`"
    )


def test_stack_md_points_to_it_instead_of_a_table_of_its_own():
    text = (ROOT / "docs" / "stack.md").read_text()
    assert "docs/security.md" in text or "(security.md" in text
    assert "| controller | `ssm:SendCommand` |" not in text
