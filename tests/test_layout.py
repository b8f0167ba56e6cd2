"""The package keeps its shape: no method's name compared as a string outside its own module, and docs/layout.md
(the tree the README's layout section links) names the tree as it is."""

from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGE = REPO / "sigmascale_jax"
# where names are parsed from what users type: the command line and YAML configs
PARSERS = {"compress/cli.py"}


def registered() -> dict[str, str]:
    """Every registered method, allocator, refiner and encoding name -> the module that registers it."""
    from sigmascale_jax.compress import plan

    plan.load_methods()
    out = {}
    for table in (plan.ALLOCATORS, plan.FACTORIZERS, plan.REFINERS, plan.ENCODERS):
        for name, entry in table.items():
            out[name] = entry.build.__module__
    return out


def compared_strings(tree: ast.AST):
    """(line, string) of every string constant in a comparison (`==`, `!=`, `in`, `not in`), alone or in a
    tuple / list / set."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for item in items:
                    if isinstance(item, ast.Constant) and isinstance(item.value, str):
                        yield node.lineno, item.value


def test_no_registered_name_is_compared_outside_its_module():
    names = registered()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        module = "sigmascale_jax." + rel[:-3].replace("/", ".").removesuffix(".__init__")
        if rel in PARSERS:
            continue
        for line, value in compared_strings(ast.parse(path.read_text())):
            owner = names.get(value)
            if owner is not None and owner != module:
                found.append(f"{rel}:{line} compares {value!r} (registered by {owner})")
    assert not found, "\n".join(found)


def test_the_check_finds_a_comparison():
    tree = ast.parse('if enc == "pivga" or name in ("svd-llm", "x"):\n    pass\n')
    assert {v for _, v in compared_strings(tree)} == {"pivga", "svd-llm", "x"}


def test_documented_layout_matches_the_tree():
    assert "docs/layout.md" in (REPO / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    section = (REPO / "docs" / "layout.md").read_text()
    listed = set(re.findall(r"^\s*([a-z_]+/|[a-z_]+\.py)", section, re.M))
    top = {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    top |= {p.name for p in PACKAGE.glob("*.py")}
    sub = {p.name + "/" for d in PACKAGE.iterdir() if d.is_dir() for p in d.iterdir()
           if p.is_dir() and not p.name.startswith("__")}
    assert top | sub <= listed, f"docs/layout.md misses {sorted(top | sub - listed)}"
    assert len(list(PACKAGE.glob("*.py"))) <= 10
