"""The README and docs/ say what the code does: their links resolve, the README's quick starts run, and the
facts the pages list (the module map, the presets table, the CI test command) match the repository.

A README Python block may be preceded by a marker, shown in the rendered page's source:
``<!-- docs-test: slow (reason) -->`` runs it in the full suite only, in a fresh interpreter, offline;
``<!-- docs-test: skip (reason) -->`` only compiles it, and the test reports the reason as its skip.
An unmarked block runs in the inner loop, so it must be tiny.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run_python

REPOSITORY = Path(__file__).resolve().parents[1]
README = REPOSITORY / "README.md"
PAGES = [README, *sorted((REPOSITORY / "docs").glob("*.md"))]
# Pages written by a generator, not by hand; a link to one is checked once it has been generated.
GENERATED = {
    REPOSITORY / "docs" / "benchmarks.md": "python -m benchmarks --full --tasks backbone --report docs/benchmarks.md"
}

FENCE = re.compile(r"^(```|~~~)")
MARKER = re.compile(r"^<!-- docs-test: (slow|skip) \((.+)\) -->$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")
MODULE_PATH = re.compile(r"`((?:resnet_backbone|adapters|benchmarks)/[\w/]*\.py)`")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
        elif not in_fence:
            lines.append(line)
    return lines


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page`` (a repeated heading gets -1, -2, ...)."""
    seen: Counter[str] = Counter()
    anchors = set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link's text, not its target
        slug = _slug(text)
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading's text: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _links(page: Path) -> list[str]:
    return [
        target
        for line in _prose_lines(page.read_text(encoding="utf-8"))
        for target in LINK.findall(INLINE_CODE.sub("", line))
        if not re.match(r"^[a-z][a-z+.-]*:", target)  # https:, mailto: ...
    ]


def _broken_links(page: Path) -> tuple[list[str], list[Path]]:
    """The links of ``page`` whose file or heading does not exist, and the generated pages not generated yet."""
    broken, not_generated = [], []
    for target in _links(page):
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            if linked in GENERATED:
                not_generated.append(linked)
            else:
                broken.append(f"{target} (no file {linked.relative_to(REPOSITORY)})")
        elif anchor and (linked.suffix != ".md" or anchor not in _anchors(linked)):
            broken.append(f"{target} (no heading #{anchor} in {linked.relative_to(REPOSITORY)})")
    return broken, not_generated


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPOSITORY)))
def test_every_relative_link_resolves(page):
    broken, _ = _broken_links(page)
    assert not broken, f"{page.relative_to(REPOSITORY)} has broken links: {broken}"


def test_generated_pages_exist():
    linked = {path for page in PAGES for path in _broken_links(page)[1]}
    missing = [f"{path.relative_to(REPOSITORY)} (run `{GENERATED[path]}`)" for path in sorted(linked)]
    if missing:
        pytest.skip(f"linked but not generated yet: {', '.join(missing)}")


@dataclass(frozen=True)
class Block:
    section: str
    source: str
    marker: str | None  # "slow", "skip" or None
    reason: str | None


def _readme_blocks() -> list[Block]:
    blocks, section, marker, reason = [], "", None, None
    lines = iter(README.read_text(encoding="utf-8").splitlines())
    for line in lines:
        if line.startswith("#"):
            section = _slug(line.lstrip("#").strip())
        found = MARKER.match(line.strip())
        if found:
            marker, reason = found.groups()
        elif line.strip() == "```python":
            body = []
            for code in lines:
                if code.strip() == "```":
                    break
                body.append(code)
            blocks.append(Block(section, "\n".join(body) + "\n", marker, reason))
            marker = reason = None
        elif line.strip():
            marker = reason = None  # a marker applies to the block right after it
    return blocks


BLOCKS = _readme_blocks()


def _block_param(index: int, block: Block) -> object:
    marks = [pytest.mark.slow] if block.marker == "slow" else []
    return pytest.param(block, id=f"{index}-{block.section}", marks=marks)


def test_readme_has_a_quick_start_per_integration():
    assert len(BLOCKS) >= 6 and all(block.section for block in BLOCKS)
    assert any(block.marker is None for block in BLOCKS), "the inner loop should run at least one block"


@pytest.mark.parametrize("block", [_block_param(i, block) for i, block in enumerate(BLOCKS)])
def test_readme_python_block_compiles(block):
    compile(block.source, f"README.md ({block.section})", "exec")


@pytest.mark.parametrize("block", [_block_param(i, block) for i, block in enumerate(BLOCKS)])
def test_readme_python_block_runs(block, tmp_path, monkeypatch):
    """Files a block writes land in a temporary folder; slow blocks run offline in a fresh interpreter."""
    if block.marker == "skip":
        pytest.skip(f"README block in {block.section}: {block.reason}; test_readme_python_block_compiles checks it")
    if block.marker == "slow":
        run_python(f"import os; os.chdir({str(tmp_path)!r})\n" + block.source, env={"HF_HUB_OFFLINE": "1"})
        return
    monkeypatch.chdir(tmp_path)
    exec(compile(block.source, f"README.md ({block.section})", "exec"), {"__name__": "readme_block"})


def test_readme_test_command_is_what_ci_runs():
    """CI installs and tests exactly as the README tells a newcomer to (in a virtual environment of its own)."""
    commands = [
        line for line in (REPOSITORY / ".ci" / "run").read_text().splitlines() if line.startswith(("pip ", "pytest"))
    ]
    assert len(commands) == 2 and " && ".join(commands) in README.read_text(encoding="utf-8")


def _tree_modules() -> set[str]:
    return {
        str(path.relative_to(REPOSITORY))
        for folder in ("resnet_backbone", "adapters", "benchmarks")
        for path in (REPOSITORY / folder).rglob("*.py")
        if not any(part in {"adapters", "benchmarks"} for part in path.relative_to(REPOSITORY).parts[1:-1])
    }


def test_module_map_names_every_module_and_no_other():
    mapped = set(MODULE_PATH.findall((REPOSITORY / "docs" / "architecture.md").read_text(encoding="utf-8")))
    tree = _tree_modules()
    assert not tree - mapped, f"modules missing from docs/architecture.md: {sorted(tree - mapped)}"
    assert not mapped - tree, f"docs/architecture.md names modules that do not exist: {sorted(mapped - tree)}"


def _presets_table() -> dict[str, list[str]]:
    text = (REPOSITORY / "docs" / "configuration.md").read_text(encoding="utf-8")
    text = text.split("\n## Presets\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|(.*)\|$", text, flags=re.MULTILINE)
    return {name: [cell.strip() for cell in cells.split("|")] for name, cells in rows}


@pytest.mark.slow
def test_presets_table_matches_the_presets():
    """Counts every preset's parameters and FLOPs on the meta device (seconds for all of them)."""
    from resnet_backbone import PRESETS, ResNetConfig
    from resnet_backbone.cli.info import stage_rows

    table = _presets_table()
    assert list(table) == list(PRESETS)
    for name, cells in table.items():
        config = ResNetConfig.from_preset(name)
        rows = stage_rows(config, (3, 224, 224))
        stem = config.stem_type + (", avg_down" if config.avg_down else "")
        expected = [
            config.layer_type,
            ", ".join(map(str, config.depths)),
            f"{config.groups}x{config.width_per_group}",
            stem,
            ", ".join(map(str, config.hidden_sizes)),
            f"{sum(row.parameters for row in rows) / 1e6:.1f}",
            f"{sum(row.flops for row in rows) / 1e9:.1f}",
        ]
        assert cells == expected, f"docs/configuration.md's row for {name}"
