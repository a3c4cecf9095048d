"""Correctness-grounded step values: Monte-Carlo rollouts for collected (prefix, draft, target) rows.

As in Math-Shepherd / OmegaPRM, the value of a partial solution is the share of k sampled
completions from it that reach the gold answer:

    V(prefix + step) = (1/k) * #{j : rollout j from prefix + step ends correct}   (math-verify)
    A_mc = V(prefix + target step) - V(prefix + draft step)

- A row's draft and target steps with identical text are a tie: one value serves both,
  and the row records `tie: true` (A_mc = 0 by construction, not by measurement).
- A step that already states a final answer (\\boxed{...}) is graded directly: V is 0 or 1.
- Rollouts are ordinary `draft_only` chains of the one step loop, continued from the row's
  prefix plus the step (`ChainInput.prefix`), sampled at `temperature` with a distinct seed
  per rollout (`ChainInput.seed`), through whatever runs chains (the Ray runtime or the
  in-process backend). Which model rolls out is the config's draft (see `label_settings`).
- A second, cheap signal for GSM8K: `reference_check` compares a step's arithmetic with the
  reference solution's `<<expr=result>>` annotations; `agreement` reports how often it and
  the Monte-Carlo value agree.

Resumable like `arbitrage.collect`: each labelled row is appended (flushed, fsynced) as soon
as all rollouts of both of its steps are done; re-running labels only the missing rows.

Every finished rollout is also appended to a rollouts file (`rollouts_path`: the labelled
file's name with `.rollouts.jsonl`): its unit (`<problem>@<step>/<side>`), seed index, the
steps it wrote and whether it reached the gold answer. Each prefix of a rollout is then an
outcome-labelled example of the draft policy's value (as in outcome-supervised value models),
which `arbitrage train-prm --rollouts` can add to the Monte-Carlo values.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from arbitrage.loop import ChainInput
from arbitrage.types import FAILED_STOPS

ROLLOUT_SEED_STRIDE = 104729  # rollout j's seed offset: stride * (j + 1)


@dataclass(frozen=True)
class LabelSettings:
    """How step values are estimated."""

    k: int = 4  # rollouts per step
    temperature: float = 0.7  # rollout sampling temperature
    rollout_model: str = "draft"  # which role writes the rollouts (provenance)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if not 0.0 < self.temperature <= 2.0:
            raise ValueError(f"--temperature must be in (0, 2], got {self.temperature}")


def row_key(row: dict) -> str:
    """A collected row's identity: problem and step index."""
    return f"{row['problem_id']}@{row['step_index']}"


def _steps_of(row: dict) -> dict[str, str]:
    return {"draft": row["draft"], "target": row["targets"][0]["text"]}


@dataclass
class _Unit:
    """One (prefix, step) whose value is estimated; shared by the rows' sides that name it."""

    key: str
    item_base: ChainInput
    direct: bool | None = None  # graded without rollouts (the step holds an answer)
    results: list[bool] = field(default_factory=list)

    def value(self) -> float:
        if self.direct is not None:
            return float(self.direct)
        return sum(self.results) / len(self.results)


def units_for(row: dict, ls: LabelSettings, separator: str = "\n\n") -> list[tuple[str, _Unit]]:
    """The (side, unit) pairs of a row: two units, or one shared unit for a tie."""
    from arbitrage.grading import is_correct

    prefix = tuple(text for _, text in row["history"])
    prefix_tokens = int(row.get("prefix_tokens") or 0)
    out: list[tuple[str, _Unit]] = []
    seen: dict[str, _Unit] = {}  # step text -> its unit (a tie shares one)
    for side, text in _steps_of(row).items():
        if text in seen:
            out.append((side, seen[text]))
            continue
        key = f"{row_key(row)}/{side}"
        base = ChainInput(
            id=key,
            problem=row["problem"],
            answer=row.get("reference"),
            prefix=prefix + (text,),
            prefix_tokens=prefix_tokens,
        )
        unit = _Unit(key, base)
        if "\\boxed" in text:
            reference = row.get("reference")  # none: not correct, as the loop grades a rollout without one
            unit.direct = reference is not None and bool(is_correct(separator.join(prefix + (text,)), reference))
        seen[text] = unit
        out.append((side, unit))
    return out


def rollout_items(unit: _Unit, ls: LabelSettings) -> list[ChainInput]:
    """The k rollouts of a unit: its prefix, distinct seeds, ids `<unit>#<j>`."""
    if unit.direct is not None:
        return []
    b = unit.item_base
    return [
        ChainInput(
            id=f"{unit.key}#{j}",
            problem=b.problem,
            answer=b.answer,
            prefix=b.prefix,
            prefix_tokens=b.prefix_tokens,
            seed=ROLLOUT_SEED_STRIDE * (j + 1),
        )
        for j in range(ls.k)
    ]


def labelled_row(row: dict, sides: list[tuple[str, _Unit]], ls: LabelSettings, solution: str | None = None) -> dict:
    """The collected row plus its Monte-Carlo values, tie flag and reference check."""
    v = {side: unit.value() for side, unit in sides}
    texts = _steps_of(row)
    out = dict(row)
    out.update(
        v_draft=v["draft"],
        v_target=v["target"],
        a_mc=v["target"] - v["draft"],
        tie=texts["draft"] == texts["target"],
        mc_k=ls.k,
        mc_temperature=ls.temperature,
        mc_model=ls.rollout_model,
        mc_direct={side: unit.direct is not None for side, unit in sides},
    )
    if solution is not None:
        out["ref_draft"] = reference_check(texts["draft"], solution, row.get("reference"))
        out["ref_target"] = reference_check(texts["target"], solution, row.get("reference"))
    return out


# ---- the GSM8K reference check ---------------------------------------------------------------

_NUM = r"-?\d[\d,]*(?:\.\d+)?"
_EQUATION = re.compile(rf"((?:{_NUM}|[\s+\-*/x×÷().$])+?)\s*=\s*\$?\s*({_NUM})")
_ANNOTATION = re.compile(r"<<[^=<>]*=([^<>]*)>>")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def _evaluate(expr: str) -> float | None:
    """The value of a plain arithmetic expression (digits, + - * / x × ÷, parentheses), else None."""
    e = expr.replace(",", "").replace("$", "").replace("×", "*").replace("÷", "/")
    e = re.sub(r"(?<=\d)\s*x\s*(?=[\d(])", "*", e)
    if not re.search(r"\d", e) or not re.fullmatch(r"[\d\s+\-*/().]+", e) or not re.search(r"[+\-*/]", e.strip()[1:]):
        return None
    try:
        return float(eval(e, {"__builtins__": {}}, {}))  # noqa: S307 - only digits and operators reach here
    except (SyntaxError, ZeroDivisionError, TypeError, ValueError):
        return None


def reference_check(step: str, solution: str, answer: str | None = None) -> dict:
    """A step's arithmetic against a GSM8K reference solution.

    Returns:
        {"equations": n, "arith_ok": all n right (None when n = 0),
         "matches_ref": some result equals a reference intermediate or the answer (None when n = 0)}
    """
    refs = {x for x in (_number(m) for m in _ANNOTATION.findall(solution)) if x is not None}
    final = _number(str(answer)) if answer is not None else None
    if final is not None:
        refs.add(final)
    n, ok, match = 0, True, False
    for lhs, rhs in _EQUATION.findall(step):
        want, got = _evaluate(lhs), _number(rhs)
        if want is None or got is None:
            continue
        n += 1
        ok = ok and abs(want - got) <= 1e-6 * max(1.0, abs(want))
        match = match or any(abs(got - r) <= 1e-6 * max(1.0, abs(r)) for r in refs)
    return {"equations": n, "arith_ok": ok if n else None, "matches_ref": match if n else None}


# ---- running ---------------------------------------------------------------------------------


def read_labelled(path: Path) -> dict[str, dict]:
    """Labelled rows already on disk by `row_key` (corrupt or unterminated lines dropped)."""
    path = Path(path)
    if not path.exists():
        return {}
    done = {}
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done[row_key(row)] = row
        except (ValueError, KeyError, TypeError):
            continue
    return done


def rollouts_path(out: Path) -> Path:
    """Where the rollouts of a labelled file go: `<name>.rollouts.jsonl` beside it."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".rollouts.jsonl")


def label_rows(
    rows: list[dict],
    out: Path,
    ls: LabelSettings,
    run: Callable[[list[ChainInput], Callable[[dict], None]], None],
    solutions: dict[str, str] | None = None,
    separator: str = "\n\n",
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Label the rows not yet in `out`, appending each as soon as its rollouts are all done.

    Args:
        rows: collected rows (`arbitrage.collect`).
        out: the labelled JSONL file (appended; rows already there are skipped).
        ls: rollouts per step and temperature.
        run: runs draft_only chains at the rollout temperature: `run(items, on_result)`,
            calling `on_result(result_dict)` per finished chain (any order).
        solutions: problem id -> reference solution text (GSM8K), for `reference_check`.
        separator: the step separator (to grade a step's answer in context).
        on_row: called with each labelled row.
    Returns:
        {"done_before", "labelled", "rollouts", "failed_rollouts"}.
    """
    out = Path(out)
    done = read_labelled(out)
    _rewrite_clean(out, done)
    todo = [r for r in rows if row_key(r) not in done]
    stats = {"done_before": len(done), "labelled": 0, "rollouts": 0, "failed_rollouts": 0}
    if not todo:
        return stats
    sides_of = {row_key(r): units_for(r, ls, separator) for r in todo}
    units = {u.key: u for sides in sides_of.values() for _, u in sides}
    rows_of_unit: dict[str, list[str]] = {}
    for rk, sides in sides_of.items():
        for _, u in sides:
            rows_of_unit.setdefault(u.key, []).append(rk)
    by_key = {row_key(r): r for r in todo}
    out.parent.mkdir(parents=True, exist_ok=True)
    sink = out.open("a")
    roll_sink = rollouts_path(out).open("a")

    def complete(u: _Unit) -> bool:
        return u.direct is not None or len(u.results) >= ls.k

    def emit_ready(rk: str) -> None:
        sides = sides_of.get(rk)
        if sides is None or not all(complete(u) for _, u in sides):
            return
        row = by_key[rk]
        lab = labelled_row(row, sides, ls, (solutions or {}).get(str(row["problem_id"])))
        sink.write(json.dumps(lab) + "\n")
        sink.flush()
        os.fsync(sink.fileno())
        del sides_of[rk]
        stats["labelled"] += 1
        if on_row is not None:
            on_row(lab)

    def on_result(res: dict) -> None:
        unit_key = str(res["problem_id"]).rsplit("#", 1)[0]
        u = units[unit_key]
        failed = res.get("stop_reason") in FAILED_STOPS
        stats["rollouts"] += 1
        stats["failed_rollouts"] += int(failed)
        u.results.append(bool(res.get("correct")) and not failed)
        if not failed:
            roll_sink.write(
                json.dumps(
                    {
                        "unit": unit_key,
                        "rollout": str(res["problem_id"]).rsplit("#", 1)[1],
                        "steps": [s["text"] for s in res.get("steps", [])],
                        "correct": bool(res.get("correct")),
                        "stop_reason": res.get("stop_reason"),
                    }
                )
                + "\n"
            )
            roll_sink.flush()
        if complete(u):
            for rk in rows_of_unit[unit_key]:
                emit_ready(rk)

    try:
        for rk in list(sides_of):  # rows whose steps are all graded directly
            emit_ready(rk)
        items = [it for u in units.values() for it in rollout_items(u, ls)]
        if items:
            run(items, on_result)
    finally:
        sink.close()
        roll_sink.close()
    return stats


def _rewrite_clean(path: Path, done: dict[str, dict]) -> None:
    """Drop corrupt lines (an interrupted write) before appending."""
    if not path.exists():
        return
    raw = path.read_bytes()
    lines = [ln for ln in raw.split(b"\n") if ln.strip()]
    if len(lines) != len(done) or (raw and not raw.endswith(b"\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
        os.replace(tmp, path)


# ---- statistics ------------------------------------------------------------------------------


def label_statistics(rows: Iterable[dict]) -> dict:
    """Tie share, distribution of V and A_mc, and MC / reference-check agreement."""
    rows = list(rows)
    n = len(rows)
    if not n:
        return {"rows": 0}
    ties = sum(1 for r in rows if r["tie"])
    vs = [r["v_draft"] for r in rows] + [r["v_target"] for r in rows if not r["tie"]]
    a = [r["a_mc"] for r in rows if not r["tie"]]
    hist = {f"{b / 4:.2f}": 0 for b in range(5)}
    for v in vs:
        hist[f"{round(v * 4) / 4:.2f}"] = hist.get(f"{round(v * 4) / 4:.2f}", 0) + 1
    agree = total = 0
    for r in rows:
        for side in ("draft", "target"):
            ref = r.get(f"ref_{side}")
            if not ref or ref.get("arith_ok") is None:
                continue
            ref_good = bool(ref["arith_ok"] and ref["matches_ref"])
            total += 1
            agree += int(ref_good == (r[f"v_{side}"] >= 0.5))
    return {
        "rows": n,
        "problems": len({r["problem_id"] for r in rows}),
        "ties": ties,
        "tie_share": ties / n,
        "v_histogram": hist,
        "a_mc_positive": sum(1 for x in a if x > 0),
        "a_mc_negative": sum(1 for x in a if x < 0),
        "a_mc_zero_non_tie": sum(1 for x in a if x == 0),
        "a_mc_mean_non_tie": sum(a) / len(a) if a else None,
        "ref_checked_steps": total,
        "ref_mc_agreement": agree / total if total else None,
    }
