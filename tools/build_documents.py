"""Copy the gateway's Python files into the SSM documents that run them.

A document marks each embedded file with ``# >>> embed PATH`` and ``# <<< embed``; this tool
replaces what lies between with PATH's current content, indented like the marker, so the document
that ships runs exactly the code the tests exercise. ``--check`` fails when a document is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ROOT / "ssm_documents"
BEGIN = re.compile(r"^(?P<indent>[ ]*)# >>> embed (?P<path>\S+)\s*$")
END = re.compile(r"^[ ]*# <<< embed\s*$")


class EmbedError(ValueError):
    pass


def expand(text: str, root: Path = ROOT) -> str:
    """``text`` with every embed block refreshed from the file it names."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        begin = BEGIN.match(line)
        i += 1
        if not begin:
            continue
        while i < len(lines) and not END.match(lines[i]):
            i += 1
        if i == len(lines):
            raise EmbedError(f"embed of {begin['path']} has no '# <<< embed' line")
        source = (root / begin["path"]).read_text()
        if "{{" in source:
            # SSM would treat it as a parameter reference and rewrite the code.
            raise EmbedError(f"{begin['path']} contains '{{{{', which SSM would substitute")
        indent = begin["indent"]
        out.extend(f"{indent}{src}" if src else "" for src in source.splitlines())
        out.append(lines[i])
        i += 1
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a document is stale")
    args = parser.parse_args(argv)
    stale = []
    for path in sorted(DOCUMENTS.glob("*.yaml")):
        old = path.read_text()
        new = expand(old)
        if new != old:
            stale.append(path.name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"stale documents (run 'make documents'): {', '.join(stale)}", file=sys.stderr)
        return 1
    verb = "stale" if args.check else "updated"
    print(f"documents: {len(stale)} {verb}" if stale else "documents: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
