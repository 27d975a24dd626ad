"""Citations in the product point only at things a learner has: the paper and docs/paper-map.md.

The rules (see the top of docs/paper-map.md):

* the paper is cited as "paper eq. N" (v1 numbering of arXiv 2501.00663; "NeurIPS eq. N" for the
  revised version); a bare "eq. N" with no "paper" / "v1" / "NeurIPS" earlier on its line is
  ambiguous, and "reference eq. N", "our reference §3" and the like point to a document that
  learners do not have;
* our decisions on the paper's ambiguities are D1–D11, each a heading of docs/paper-map.md;
* "paper-map §X" and links "paper-map.md#slug" must name a heading of docs/paper-map.md;
* developer documents that are not in the repository are never mentioned by name.

Product files are scanned line by line; notebooks cell by cell (cell numbers count from 0, as in
the notebook's JSON), source only. Every problem is reported as "file:line" (or
"file cell N line M") with the offending text.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAPER_MAP = ROOT / "docs" / "paper-map.md"

PRODUCT_GLOBS = (
    "titans_mini/**/*.py",
    "notebooks/*.ipynb",
    "solutions/*.ipynb",
    "exercises/*.ipynb",
    "README.md",
    "docs/*.md",
    "bench/*.py",
    "bench/*.md",
    "tools/**/*.py",
    "Makefile",
)

DECISIONS = [f"D{i}" for i in range(1, 12)]
# the paper's numbered equations: 1-31 in the main text, 32-35 in App. C (v1)
PAPER_EQUATIONS = range(1, 36)

# -- patterns ----------------------------------------------------------------------------------

# names of developer documents that are not shipped
DEV_DOC = re.compile(
    r"titans-reference|course-design|seed-notes|lm-memorization|shared/docs|\.\./shared", re.I)
# a decision id: "D5", "(D5)", "§D7", "D1–D11"; not "3D", "0xD5", "conv1D", "D5b"
DECISION_ID = re.compile(r"(?<![\w.])D(\d+)\b")
# citations of a non-shipped document's numbering
REF_CITATION = re.compile(
    r"\b(?:reference|ref\.)\s*(?:eqs?\.|equations?\b)"  # reference eq. 16, ref. eqs. 14-15
    r"|\b(?:reference|ref\.)\s*\(?§"  # reference §3.6, ref. (§2)
    r"|\bour\s+reference\b"  # "in our reference: §3.1", "our reference eqs. 4-5"
    r"|\breference\s+doc(?:ument)?s?\b",  # "the reference doc"
    re.I)
# an equation number: "eq. 16", "eqs. 14–15", "Eq. (8)", "equation 8"
EQUATION = re.compile(r"\b(?:eqs?\.|equations?)\s*\(?\d+", re.I)
# what makes an equation number a paper citation: "paper" / "v1" / "NeurIPS" earlier on the line,
# or "Titans" right before it
EQ_QUALIFIER = re.compile(r"\b(?:paper|papers|v1|NeurIPS)\b", re.I)
EQ_TITANS = re.compile(r"\bTitans'?\s*$")
# "paper-map §D5", "paper-map.md §C2", "(paper-map, §D6)"
MAP_SECTION = re.compile(r"paper-map(?:\.md)?[\s,]*§\s*([A-Za-z0-9]+(?:[.-][A-Za-z0-9]+)*)")
# "paper-map.md#d5--which-state-a-token-reads"
MAP_LINK = re.compile(r"paper-map\.md#([\w-]+)")
# an anchor heading of the paper map: "### D5 — Which state ...", "### C2 — ..."
ANCHOR_HEADING = re.compile(r"^#{1,6}\s+([A-Za-z][A-Za-z0-9]*)\s+—\s")
DECISION_FIELDS = ("**Ambiguity.**", "**Our choice.**", "**Why.**", "**Switch.**")


# -- the paper map -----------------------------------------------------------------------------


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces → '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def map_headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6}\s", line)]


def map_anchors(text: str) -> set[str]:
    """Ids usable as "paper-map §X": the first word of every heading "<id> — <title>"."""
    return {m.group(1) for line in text.splitlines() if (m := ANCHOR_HEADING.match(line))}


def decision_sections(text: str) -> dict[str, str]:
    """The body of every "### Dn — ..." section, up to the next heading of the same or a higher level."""
    sections: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = ANCHOR_HEADING.match(line)
        if not (m and re.fullmatch(r"D\d+", m.group(1))):
            continue
        level = len(line) - len(line.lstrip("#"))
        body = []
        for nxt in lines[i + 1:]:
            head = re.match(r"(#{1,6})\s", nxt)
            if head and len(head.group(1)) <= level:
                break
            body.append(nxt)
        sections[m.group(1)] = "\n".join(body)
    return sections


def equation_rows(text: str) -> set[int]:
    """Equation numbers that open a table row of the map: "| 16 | ..." or "| 26–28 | ..."."""
    found: set[int] = set()
    for line in text.splitlines():
        m = re.match(r"\|\s*(\d+)(?:\s*[–-]\s*(\d+))?\s*\|", line)
        if m:
            first = int(m.group(1))
            found.update(range(first, int(m.group(2) or first) + 1))
    return found


# -- scanning ----------------------------------------------------------------------------------


def product_files() -> list[Path]:
    files: set[Path] = set()
    for pattern in PRODUCT_GLOBS:
        files.update(p for p in ROOT.glob(pattern) if p.is_file())
    return sorted(files)


def file_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(location, line) for every source line; notebooks cell by cell."""
    rel = path.relative_to(ROOT).as_posix()
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text(encoding="utf-8"))
        for c, cell in enumerate(nb["cells"]):
            source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            for n, line in enumerate(source.splitlines(), 1):
                yield f"{rel} cell {c} line {n}", line
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield f"{rel}:{n}", line


def line_problems(line: str, anchors: set[str], slugs: set[str]) -> list[str]:
    """What is wrong with the citations on one line (empty if nothing)."""
    problems = []
    dev_docs = list(DEV_DOC.finditer(line))
    for m in dev_docs:
        problems.append(f"mentions the developer document {m.group(0)!r}")
    for m in DECISION_ID.finditer(line):
        if m.group(0) not in anchors:
            problems.append(f"decision {m.group(0)} is not a heading of docs/paper-map.md")
    # "titans-reference §3" is reported once, as a developer document
    refs = [r for r in REF_CITATION.finditer(line)
            if not any(d.start() <= r.start() < d.end() for d in dev_docs)]
    for m in refs:
        problems.append(f"{m.group(0)!r} cites a document learners do not have "
                        "(write 'paper eq. N' or 'paper-map §X')")
    for m in EQUATION.finditer(line):
        if any(r.start() <= m.start() and not line[r.end():m.start()].strip() for r in refs):
            continue  # already reported as a "reference eq." citation
        before = line[: m.start()]
        if not (EQ_QUALIFIER.search(before) or EQ_TITANS.search(before)):
            problems.append(f"bare {m.group(0)!r}: say 'paper eq. N' (v1) or "
                            "'NeurIPS eq. N', or cite a derived formula as 'paper-map §Cn'")
    for m in MAP_SECTION.finditer(line):
        if m.group(1) not in anchors:
            problems.append(f"'paper-map §{m.group(1)}' is not an anchor of docs/paper-map.md")
    for m in MAP_LINK.finditer(line):
        if m.group(1) not in slugs:
            problems.append(f"link 'paper-map.md#{m.group(1)}' matches no heading of docs/paper-map.md")
    return problems


def scan(lines: Iterable[tuple[str, str]], anchors: set[str], slugs: set[str]) -> list[str]:
    return [f"{where}: {problem}: {line.strip()[:120]}"
            for where, line in lines for problem in line_problems(line, anchors, slugs)]


@pytest.fixture(scope="module")
def paper_map() -> str:
    assert PAPER_MAP.is_file(), "docs/paper-map.md is missing"
    return PAPER_MAP.read_text(encoding="utf-8")


# -- the paper map itself ------------------------------------------------------------------------


def test_paper_map_defines_every_decision(paper_map):
    anchors = map_anchors(paper_map)
    missing = [d for d in DECISIONS if d not in anchors]
    assert not missing, f"docs/paper-map.md has no heading '### Dn — ...' for {missing}"
    sections = decision_sections(paper_map)
    incomplete = {d: [f for f in DECISION_FIELDS if f not in sections[d]] for d in DECISIONS}
    incomplete = {d: fields for d, fields in incomplete.items() if fields}
    assert not incomplete, f"decision sections without these fields: {incomplete}"


def test_paper_map_lists_every_equation(paper_map):
    missing = sorted(set(PAPER_EQUATIONS) - equation_rows(paper_map))
    assert not missing, f"docs/paper-map.md has no table row for paper eqs. {missing}"


def test_paper_map_names_exist(paper_map):
    """Every `titans_mini.module.name[.attr]` the map cites can be imported."""
    names = sorted(set(re.findall(r"`(titans_mini(?:\.\w+)+)", paper_map)))
    assert names, "the paper map cites no library names"
    missing = []
    for name in names:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable module prefix
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, f"docs/paper-map.md cites names that do not exist: {missing}"


# -- the product -----------------------------------------------------------------------------


def test_product_citations(paper_map):
    anchors = map_anchors(paper_map)
    slugs = {github_slug(h) for h in map_headings(paper_map)}
    problems = scan((item for path in product_files() for item in file_lines(path)), anchors, slugs)
    assert not problems, f"{len(problems)} citation problems:\n" + "\n".join(problems)


def test_product_files_are_found():
    rels = {p.relative_to(ROOT).as_posix() for p in product_files()}
    for expected in ("titans_mini/memory.py", "notebooks/00_welcome.ipynb", "README.md",
                     "docs/paper-map.md", "Makefile"):
        assert expected in rels


# -- the checks can fail (synthetic text) ------------------------------------------------------

ANCHORS = {"D1", "D5", "D11", "C2"}
SLUGS = {"d5--which-state-a-token-reads"}


@pytest.mark.parametrize("line", [
    "Equation numbers refer to ``titans-reference.md`` (our numbering).",
    "see course-design §4",
    "notes in seed-notes.md",
    "measured as in lm-memorization.md",
    "open /work/shared/docs/x.md",
    "[link](../shared/x.md)",
    "reads at the chunk start (D7)",
    "decision D12 says",
    "the choice of §D3",
    "D0 is not a decision",
    "the gate (reference eq. 6)",
    "then (reference eqs. 18–19)",
    "the recurrence (ref. eq. 17)",
    "Ref. Eq. (16) gives",
    "In our reference: §3.1–3.6",
    "as our reference suggests",
    "the zero-M₀ trap (reference §2.2)",
    "see the reference doc",
    "(eq. 16, and the stable recurrence eq. 17)",
    "ℓ(Φ) = ½‖M(k; Φ) − v‖²  (eq. 2, paper eq. 12)",
    "Equation (8) is the plain gradient step",
    "see paper-map §D9",
    "see paper-map §C7.",
    "see (paper-map, §X1)",
    "[D5](docs/paper-map.md#d5-reads)",
])
def test_checks_flag_bad_citations(line):
    assert line_problems(line, ANCHORS, SLUGS), f"not flagged: {line!r}"


@pytest.mark.parametrize("line", [
    "Titans v1 §3.2 (eqs. 16–18) and the NeurIPS version §2.2",
    "paper eq. 16 and paper eqs. 9–10 and 13–14",
    "the update (paper eq. 14; decision D5 in paper-map)",
    "NeurIPS eq. 3 differs",
    "Titans eq. 10 is momentum",
    "decisions D1–D11 (paper-map §D1, paper-map §D11.)",
    "the weighted sum (paper-map §C2)",
    "[why](../docs/paper-map.md#d5--which-state-a-token-reads)",
    "a 3D plot, the colour 0xD5D5D5, a Conv1D, shape (B, D)",
    "the sequential_reference loop is the reference",
    "the reference implementation and its reference solution",
    "torch.eq(a, b) and x.eq(1)",
])
def test_checks_accept_good_citations(line):
    assert line_problems(line, ANCHORS, SLUGS) == [], line_problems(line, ANCHORS, SLUGS)


def test_paper_map_helpers_on_synthetic_text():
    text = "\n".join([
        "# Title",
        "| 1 | Q = xW_Q | x |",
        "| 26–28 | MAG | y |",
        "### D5 — Which state a token reads",
        "**Ambiguity.** a", "**Our choice.** b", "**Why.** c",
        "### C2 — The end of a chunk",
        "## Other",
    ])
    assert map_anchors(text) == {"D5", "C2"}
    assert equation_rows(text) == {1, 26, 27, 28}
    assert "**Switch.**" not in decision_sections(text)["D5"]
    assert "**Why.** c" in decision_sections(text)["D5"]
    assert github_slug("D5 — Which state a token reads") == "d5--which-state-a-token-reads"
    assert github_slug("The `chunk_update`, step (1)") == "the-chunk_update-step-1"
    located = scan([("f.py:3", "see (reference eq. 6) and D12")], {"D1"}, set())
    assert len(located) == 2 and all(p.startswith("f.py:3: ") for p in located)
    # one citation, one report
    for line in ("(our reference eqs. 4–5)", "(titans-reference §3.4)", "(reference eq. 17)"):
        assert len(line_problems(line, set(), set())) == 1, line_problems(line, set(), set())
