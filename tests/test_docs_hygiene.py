"""The repository says what the code is and does, never how it came to be: no work tickets, no sessions, no
old figures, no notes on what could not be measured. Such words go stale the day they are written and send the
reader looking for context that is not in the repository (history belongs in git, figures on the generated
benchmark page)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = (".py", ".md", ".toml", ".cfg", ".txt")
TEXT_FILES = (".ci/run",)


def _words(*words: str) -> str:
    """A pattern for ``words`` as a phrase: separated by spaces or underscores (so that identifiers such as
    test names are read too), and not part of longer words."""
    return r"(?<![a-z])" + r"[\s_]+".join(words) + r"(?![a-z])"


# What each pattern finds, and why it does not belong in the repository.
HISTORY_PATTERNS = {
    "a work ticket, not a reason": _words("the", "issues?"),
    "a ticket number (a link to an upstream issue is fine)": r"(?<!upstream )(?<![a-z/])issues?[\s_]*#?\d+",
    "a work session": _words("(this|last|previous|earlier)", "sessions?"),
    "superseded figures": _words("(old|previous|earlier)", "figures?"),
    "a note on what was not run": _words(r"could(n't|[\s_]+not)", "be", "(run|measured|tested)"),
}


def tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (REPOSITORY / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPOSITORY, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    return [REPOSITORY / name for name in listed if name.endswith(TEXT_SUFFIXES) or name in TEXT_FILES]


def history_findings(path: Path) -> list[str]:
    """``file:line: 'matched words' (why)`` for each history phrase in ``path``."""
    findings = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        for why, pattern in HISTORY_PATTERNS.items():
            for match in re.finditer(pattern, line, flags=re.IGNORECASE):
                findings.append(f"{path.relative_to(REPOSITORY)}:{number}: {match.group()!r} ({why})")
    return findings


def test_no_tracked_text_file_speaks_of_history_tickets_or_sessions():
    files = tracked_text_files()
    assert any(path.name == "pyproject.toml" for path in files)  # the listing found the repository's files
    examples = Path(__file__).resolve()  # this file quotes the phrases to test the patterns
    findings = [finding for path in files if path.is_file() and path != examples for finding in history_findings(path)]
    assert not findings, "Say what the code is and why, not how it came to be:\n" + "\n".join(findings)


@pytest.mark.parametrize(
    "line",
    [
        "The issue's speed targets",
        "def test_the_issues_config_builds():",
        "see issue #21",
        "fixed in the last session",
        "the old figures, 607 / 607",
        "the compiled modes could not be measured here",
    ],
)
def test_each_history_phrase_is_found(line):
    assert any(re.search(pattern, line, flags=re.IGNORECASE) for pattern in HISTORY_PATTERNS.values())


@pytest.mark.parametrize(
    "line",
    [
        "an upstream issue #118884 limits torch.export",
        "https://github.com/pytorch/pytorch/issues/118884",
        "pytorch/pytorch#118884",
        "session = onnxruntime.InferenceSession(str(path))",
        "a problem with the checkpoint, not an issue of the reader",
        "skipped: why it did not run here",
    ],
)
def test_legitimate_words_are_not_flagged(line):
    assert not any(re.search(pattern, line, flags=re.IGNORECASE) for pattern in HISTORY_PATTERNS.values())
