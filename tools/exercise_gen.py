"""Generate ``exercises/`` from ``solutions/`` (run ``make exercises``).

Exercises are written once, in ``solutions/NN_topic_solutions.ipynb``. Inside a function or class
body, the learner's part sits between two marker comments::

    def delta_rule_write(W, k, v, lr):
        # BEGIN SOLUTION
        # HINT: the gradient of 1/2 ||W k - v||^2 with respect to W is (W k - v) k^T
        err = W @ k - v
        return W - lr * torch.outer(err, k)
        # END SOLUTION

The generator replaces each marked block with ``raise NotImplementedError("<hint>")`` at the same
indentation (the hint is the block's ``# HINT:`` line), clears outputs, turns the title's
"solutions" into "exercises", points the Colab badge at the exercise notebook, and drops cells
tagged ``solution-only`` (cell metadata tags). Blocks must be indented (inside a ``def``/``class``)
so that the generated notebook still runs top to bottom: the check cells then report
"not implemented yet" instead of crashing.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

from tools import notebook_setup

BEGIN, END, HINT = "# BEGIN SOLUTION", "# END SOLUTION", "# HINT:"
DEFAULT_HINT = "replace this line with your implementation"


class ExerciseFormatError(ValueError):
    pass


def _src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def stub_source(source: str, where: str = "cell") -> str:
    """Replace every BEGIN/END SOLUTION block in ``source`` by a NotImplementedError stub."""
    out: list[str] = []
    lines = source.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == BEGIN:
            indent = line[: len(line) - len(line.lstrip())]
            if not indent:
                raise ExerciseFormatError(
                    f"{where}: '{BEGIN}' must be indented inside a function or class body, so the "
                    "generated exercise notebook still runs top to bottom"
                )
            hint = DEFAULT_HINT
            j = i + 1
            while j < len(lines) and lines[j].strip() != END:
                if lines[j].strip().startswith(HINT) and hint == DEFAULT_HINT:
                    hint = lines[j].strip()[len(HINT):].strip()
                if lines[j].strip() == BEGIN:
                    raise ExerciseFormatError(f"{where}: nested '{BEGIN}'")
                j += 1
            if j == len(lines):
                raise ExerciseFormatError(f"{where}: '{BEGIN}' without a matching '{END}'")
            out.append(f"{indent}raise NotImplementedError({json.dumps(hint, ensure_ascii=False)})")
            i = j + 1
            continue
        if line.strip() == END:
            raise ExerciseFormatError(f"{where}: '{END}' without a matching '{BEGIN}'")
        out.append(line)
        i += 1
    return "\n".join(out)


def exercise_path(solution_path: Path) -> Path:
    name = solution_path.name.replace("_solutions.ipynb", "_exercises.ipynb")
    if name == solution_path.name:
        raise ExerciseFormatError(f"{solution_path}: solution notebooks are named NN_topic_solutions.ipynb")
    return solution_path.parent.parent / "exercises" / name


def generate(nb: dict, exercise_relpath: str) -> dict:
    """Return the exercise notebook generated from solution notebook ``nb``."""
    out = copy.deepcopy(nb)
    cells = []
    n_blocks = 0
    for idx, cell in enumerate(out["cells"]):
        if "solution-only" in cell.get("metadata", {}).get("tags", []):
            continue
        if cell["cell_type"] == "code":
            src = _src(cell)
            n_blocks += src.count(BEGIN)
            cell["source"] = stub_source(src, where=f"cell {idx}")
            cell["outputs"] = []
            cell["execution_count"] = None
        cells.append(cell)
    if n_blocks == 0:
        raise ExerciseFormatError(f"{exercise_relpath}: the solutions notebook has no '{BEGIN}' blocks")
    title = _src(cells[0])
    first, _, rest = title.partition("\n")
    first = re.sub(r"(?i)solutions", lambda m: "Exercises" if m.group(0)[0].isupper() else "exercises", first)
    cells[0]["source"] = first + ("\n" + rest if rest else "")
    out["cells"] = cells
    notebook_setup.fix(out, exercise_relpath)
    return out


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def expected_exercises(root: Path) -> dict[Path, str]:
    """Map each exercise path to the text the generator would write."""
    result = {}
    for sol in sorted((root / "solutions").glob("*_solutions.ipynb")):
        target = exercise_path(sol)
        nb = json.loads(sol.read_text())
        result[target] = dumps(generate(nb, target.relative_to(root).as_posix()))
    return result


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    expected = expected_exercises(root)
    (root / "exercises").mkdir(exist_ok=True)
    for path, text in expected.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(root)}")
    stale = set((root / "exercises").glob("*_exercises.ipynb")) - set(expected)
    for path in sorted(stale):
        path.unlink()
        print(f"removed stale {path.relative_to(root)}")
    print(f"{len(expected)} exercise notebook(s) in sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
