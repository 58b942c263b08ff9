"""Every Python block of the README runs on its own and prints what the README shows.

Each README block starts with ``# needs: pip install margin_regs [packages]`` and runs
in a fresh interpreter where the packages it does not state cannot be imported, so a
quickstart that works only after a larger install fails here. Its closing
``# Prints:`` comment is its expected output: the same words, the numbers equal to a
few percent (other jax versions and CPUs round differently). The guides' blocks that
start with such a line (the complete examples; the rest are fragments) run the same
way.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.DOTALL | re.MULTILINE)
NEEDS = re.compile(r"^# needs: pip install margin_regs((?: [\w-]+)*)\n")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
# Importable only when a block states the package (the extras' model libraries).
OPTIONAL = {"flax", "equinox", "sklearn", "matplotlib", "orbax", "mnist1d", "mlxtend"}
LINES = 250
FIRST_CODE_LINE = 100

# Run before the block: an import hook that refuses the packages not stated.
GUARD = """
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {refused!r}:
            raise ModuleNotFoundError(f"{{name}} is not in this block's install line")
sys.meta_path.insert(0, _Refuse())
"""


def blocks(text: str) -> list[tuple[str, str]]:
    """Each Python block with the output its ``# Prints:`` comment shows."""
    found = []
    for fence in FENCE.finditer(text):
        if fence.group(1) == "python":
            code, _, prints = fence.group(2).partition("# Prints:\n")
            expected = "".join(line[2:] for line in prints.splitlines(keepends=True))
            found.append((code, expected))
    return found


BLOCKS = blocks(README)
GUIDE_BLOCKS = {
    f"{path.stem}-{i}": block
    for path in GUIDES
    for i, block in enumerate(blocks(path.read_text()))
    if NEEDS.match(block[0])
}


def same_output(printed: str, expected: str) -> bool:
    words = NUMBER.split(printed), NUMBER.split(expected)
    numbers = NUMBER.findall(printed), NUMBER.findall(expected)
    return (
        [w.split() for w in words[0]] == [w.split() for w in words[1]]
        and len(numbers[0]) == len(numbers[1])
        and all(
            math.isclose(float(a), float(b), rel_tol=0.05, abs_tol=0.02)
            for a, b in zip(*numbers, strict=True)
        )
    )


def test_the_readme_is_a_front_page():
    lines = README.splitlines()
    assert len(lines) <= LINES
    first = next(i for i, line in enumerate(lines) if line == "```python")
    assert first < FIRST_CODE_LINE
    for command in (
        'pip install -e ".[experiments]" && margin-regs compare',
        'pip install -e ".[dev]" && pytest',
    ):
        assert f"python3 -m venv .venv && . .venv/bin/activate && {command}" in README
    assert len(BLOCKS) >= 4


def test_same_output_compares_words_exactly_and_numbers_to_a_few_percent():
    assert same_output("loss 0.101 {'a/kernel': 2.0}", "loss 0.1 {'a/kernel': 2.02}")
    assert not same_output("loss 0.2", "loss 0.1")
    assert not same_output("loss 0.1", "gain 0.1")
    assert not same_output("loss 0.1 0.1", "loss 0.1")


def run_block(code: str, expected: str) -> None:
    """Runs ``code`` after exactly its install line; checks it prints ``expected``."""
    needs = NEEDS.match(code)
    assert needs, "a block starts with '# needs: pip install margin_regs ...'"
    stated = set(needs.group(1).split())
    for package in stated:  # absent only in the floors' core environment
        pytest.importorskip(package)
    result = subprocess.run(
        [sys.executable, "-c", GUARD.format(refused=OPTIONAL - stated) + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert expected, "a block ends with a '# Prints:' comment of its output"
    assert same_output(result.stdout, expected), result.stdout


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_after_its_install_line(index):
    run_block(*BLOCKS[index])


@pytest.mark.parametrize("name", sorted(GUIDE_BLOCKS))
def test_guide_example_runs_after_its_install_line(name):
    run_block(*GUIDE_BLOCKS[name])
