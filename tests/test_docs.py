"""What the code and README cite is in the repository: no reference to specification files outside it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = ("fedvb/**/*.py", "tests/*.py", "benchmarks/*", "simulations/*", "configs/*", "docs/*", "scripts/*",
            "README.md", "pyproject.toml")  # fmt: skip
TEXT = [p for pattern in PATTERNS for p in ROOT.glob(pattern) if p.is_file()]


def test_every_cited_document_is_in_the_repository():
    cited = set()
    for path in TEXT:
        text = path.read_text(errors="replace")
        if path != Path(__file__).resolve():  # this file names the patterns it looks for
            outside = re.search(r"research/|papers\.md|DESIGN\.md", text)
            assert not outside, f"{path.relative_to(ROOT)} cites {outside.group()}, which is not in the repository"
        cited.update(re.findall(r"docs/[\w-]+\.md", text))
    assert cited, "nothing cites docs/"
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, f"cited but not in the repository: {missing}"


def test_section_references_into_the_algorithms_document_exist():
    sections = set(re.findall(r"^## §(\d+)", (ROOT / "docs" / "algorithms.md").read_text(), flags=re.MULTILINE))
    for path in TEXT:
        for number in re.findall(r"docs/algorithms\.md §(\d+)", path.read_text(errors="replace")):
            assert number in sections, f"{path.relative_to(ROOT)} cites docs/algorithms.md §{number}"


def test_the_readme_strategy_table_is_the_registry():
    from fedvb.config import algorithm_rows

    readme = (ROOT / "README.md").read_text()
    start = readme.index("| strategy | family | client solver | what it is | docs/algorithms.md |")
    lines = readme[start:].split("\n\n")[0].splitlines()[2:]
    rows = [tuple(cell.strip().strip("`") for cell in line.strip("|").split(" | ")) for line in lines]
    assert rows == algorithm_rows()
