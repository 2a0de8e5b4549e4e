"""Copy the few files documents carry into the SSM documents that run them.

A document marks each embedded file with ``# >>> embed PATH`` and ``# <<< embed``; this tool
replaces what lies between with PATH's current content, indented like the marker, so the document
that ships runs exactly the code the tests exercise. ``--check`` fails when a document is stale.

Since issue 22 only two kinds of file are embedded: what instances run (AddHostRoute's route
helper, instance/: instances are not ours to install a package on), as it is; and the gateway
documents' two shared pieces, gateway/package_check.sh and gateway/install_package.py, compact
(``compact``: the same program without its comments and docstrings), because a gateway document
must stay within 8 KB (stacks/documents.py). The gateway's own code is the package's.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ROOT / "ssm_documents"
BEGIN = re.compile(r"^(?P<indent>[ ]*)# >>> embed (?P<path>\S+)\s*$")
END = re.compile(r"^[ ]*# <<< embed\s*$")


# Embedded compact (comments and docstrings dropped): the gateway documents' shared pieces.
COMPACT_PREFIX = "gateway/"
# The only files a document may embed: what instances run, and the gateway documents' two shared
# pieces. Gateway code is the package's (a document runs its verb), never a document's copy.
EMBEDDABLE = ("instance/", "gateway/package_check.sh", "gateway/install_package.py")


class EmbedError(ValueError):
    pass


def compact(path: str, source: str) -> str:
    """``source`` as a gateway document carries it. Python: the same program without docstrings,
    comments and annotations (``strip_tree`` then ``ast.unparse``), indented by one space (every
    leading space ``ast.unparse`` writes is indentation: it writes no multi-line literal). Shell:
    without its comment-only and blank lines (the ``#!`` line stays) and leading blanks.
    tests/unit/test_install_package.py compares the trees."""
    if path.endswith(".py"):
        text = ast.unparse(strip_tree(ast.parse(source)))
        out = []
        for line in text.splitlines():
            body = line.lstrip(" ")
            out.append(" " * ((len(line) - len(body)) // 4) + body)
        return "\n".join(out) + "\n"
    # Leading blanks mean nothing to the shell outside a here-document (these pieces have none).
    assert "<<" not in source, f"{path}: no here-document in a compact shell piece"
    lines = source.splitlines()
    kept = [
        line.strip()
        for i, line in enumerate(lines)
        if line.strip()
        and not (line.lstrip().startswith("#") and not (i == 0 and line.startswith("#!")))
    ]
    return "\n".join(kept) + "\n"


def strip_tree(tree: ast.Module) -> ast.Module:
    """``tree`` without docstrings and annotations (what runs is the same)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.returns = None
            arguments = node.args
            for arg in (
                *arguments.posonlyargs,
                *arguments.args,
                *arguments.kwonlyargs,
                *filter(None, (arguments.vararg, arguments.kwarg)),
            ):
                arg.annotation = None
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if isinstance(statements, list):
                setattr(
                    node,
                    field,
                    [
                        ast.Assign(targets=[s.target], value=s.value, lineno=s.lineno)
                        if isinstance(s, ast.AnnAssign) and s.value is not None
                        else s
                        for s in statements
                    ],
                )
    return ast.fix_missing_locations(tree)


def embedded(path: str, root: Path = ROOT) -> str:
    """What a document carries for PATH (refused if SSM would rewrite it)."""
    if not path.startswith(EMBEDDABLE):
        raise EmbedError(f"{path}: documents embed only {', '.join(EMBEDDABLE)} (issue 22)")
    source = (root / path).read_text()
    if path.startswith(COMPACT_PREFIX):
        source = compact(path, source)
    if "{{" in source:
        # SSM would treat it as a parameter reference and rewrite the code.
        raise EmbedError(f"{path} contains '{{{{', which SSM would substitute")
    return source


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
        source = embedded(begin["path"], root)
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
