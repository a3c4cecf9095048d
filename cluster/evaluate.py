"""Batch evaluation: resumable sweeps over (policy, threshold) on the Ray runtime.

Every finished (problem, policy, threshold) chain is appended to `results.jsonl` at
once and flushed, so an interrupt loses nothing already finished. Re-running the same
command reads the file back, drops a truncated or corrupt line (rewriting the file
without it), and runs only what is missing. Chains that ended in an error or timeout
are redone. Each run segment's wall time goes to `segments.jsonl` for throughput, with
the segment's step-cache use (`cache_totals` over its rows: hits, misses and saved tokens
per role; see `arbitrage.step_cache`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from arbitrage.policies import THRESHOLD_FREE
from arbitrage.types import FAILED_STOPS


@dataclass(frozen=True)
class Group:
    """One (policy, threshold) cell of a sweep."""

    policy: str
    threshold: float

    @property
    def label(self) -> str:
        return self.policy if self.policy in THRESHOLD_FREE else f"{self.policy}@{self.threshold:g}"


def sweep_groups(policies: Iterable[str], thresholds: Iterable[float] | Mapping[str, Iterable[float]]) -> list[Group]:
    """Policies x thresholds; threshold-free baselines appear once (threshold 0).

    `thresholds` is one list for every policy, or a list per policy name (a policy
    missing from the mapping is an error unless it is threshold-free).
    """
    out: list[Group] = []
    for p in policies:
        if p in THRESHOLD_FREE:
            taus: Iterable[float] = [0.0]
        elif isinstance(thresholds, Mapping):
            if p not in thresholds:
                raise ValueError(f"no thresholds given for policy {p!r}; add {p}=... to --thresholds")
            taus = thresholds[p]
        else:
            taus = thresholds
        for t in taus:
            if Group(p, float(t)) not in out:
                out.append(Group(p, float(t)))
    return out


def parse_groups(text: str) -> list[Group]:
    """Explicit cells in run order: 'draft_only,rsd@0.7,router@0.55,target_only'.

    Threshold-free baselines take no '@tau'; every other policy needs one in [0, 1].
    """
    from configs.schema import POLICY_NAMES

    out: list[Group] = []
    for cell in (c.strip() for c in text.split(",")):
        if not cell:
            continue
        policy, _, tau = cell.partition("@")
        if policy not in POLICY_NAMES:
            raise ValueError(f"--groups: unknown policy {policy!r}; choose from {', '.join(POLICY_NAMES)}")
        if policy in THRESHOLD_FREE:
            g = Group(policy, 0.0)
        else:
            try:
                t = float(tau)
            except ValueError:
                raise ValueError(f"--groups: {cell!r} needs a threshold, e.g. {policy}@0.5") from None
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"--groups: thresholds must lie in [0, 1], got {cell!r}")
            g = Group(policy, t)
        if g not in out:
            out.append(g)
    if not out:
        raise ValueError("--groups is empty")
    return out


def row_key(problem_id: str, policy: str, threshold: float) -> str:
    return f"{problem_id}|{policy}|{float(threshold):g}"


def load_results(path: Path) -> dict[str, dict]:
    """Finished rows by key; corrupt or truncated lines are dropped and the file rewritten."""
    if not path.exists():
        return {}
    rows: dict[str, dict] = {}
    bad = 0
    raw = path.read_bytes()
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = row["key"]
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if row.get("stop_reason") in FAILED_STOPS:
            bad += 1
            continue
        rows[key] = row
    if bad or (raw and not raw.endswith(b"\n")):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
        os.replace(tmp, path)
    return rows


def cache_totals(rows: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Step-cache hits, misses and saved tokens per role, summed over rows (rows without a cache count 0)."""
    tot: dict[str, dict[str, int]] = {k: {} for k in ("hits", "misses", "tokens_saved")}
    for r in rows:
        for kind, by_role in (r.get("cache") or {}).items():
            for role, n in by_role.items():
                tot[kind][role] = tot[kind].get(role, 0) + n
    return tot


def cache_line(rows: Iterable[dict]) -> str:
    """One line: model calls the step cache answered, per role and in all."""
    tot = cache_totals(rows)
    roles = sorted(set(tot["hits"]) | set(tot["misses"]))
    if not roles:
        return "step cache: off"
    parts = []
    for role in roles:
        h, m = tot["hits"].get(role, 0), tot["misses"].get(role, 0)
        saved = tot["tokens_saved"].get(role, 0)
        parts.append(f"{role} {h}/{h + m}" + (f" ({saved} tokens)" if saved else ""))
    h, n = sum(tot["hits"].values()), sum(tot["hits"].values()) + sum(tot["misses"].values())
    return f"step cache: {h} of {n} model calls answered from cache ({h / max(n, 1):.0%}): " + ", ".join(parts)


class ResultSink:
    """Appends one JSON line per finished chain and flushes it to disk immediately."""

    def __init__(self, path: Path):
        self.path = path
        self._f = path.open("a")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def run_sweep(
    cfg,
    problems: list,
    groups: list[Group],
    out_dir: Path,
    execute: Callable[[list[dict], str, float, Callable[[dict], None]], None],
    progress: bool = True,
) -> dict[str, dict]:
    """Run every missing (problem, group) row and append it to `out_dir/results.jsonl`.

    Args:
        cfg: the ArbitrageConfig (saved beside the results).
        problems: data.Problem list.
        groups: the (policy, threshold) cells.
        out_dir: run folder; created if missing.
        execute: runs items under (policy, threshold), calling back once per finished chain.
        progress: show a tqdm bar with rate and ETA.
    Returns:
        All finished rows by key (old and new).
    """
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    results_path = out_dir / "results.jsonl"
    done = load_results(results_path)
    todo = {g: [p for p in problems if row_key(p.id, g.policy, g.threshold) not in done] for g in groups}
    total = sum(len(v) for v in todo.values())
    bar = tqdm(total=total, desc="chains", unit="chain", disable=not progress, dynamic_ncols=True)
    sink = ResultSink(results_path)
    try:
        for g, pending in todo.items():
            if not pending:
                continue
            bar.set_postfix_str(g.label)
            items = [{"id": p.id, "problem": p.problem, "answer": p.answer} for p in pending]
            seg_rows: list[dict] = []

            def on_result(r: dict, g=g, seg_rows=seg_rows) -> None:
                row = {"key": row_key(r["problem_id"], g.policy, g.threshold), **r}
                if r.get("stop_reason") not in FAILED_STOPS:
                    done[row["key"]] = row
                sink.write(row)
                seg_rows.append(row)
                bar.update(1)

            t0 = time.time()
            execute(items, g.policy, g.threshold, on_result)
            seg = {
                "policy": g.policy,
                "threshold": g.threshold,
                "chains": len(items),
                "elapsed_s": time.time() - t0,
                "finished_at": time.time(),
                "cache": cache_totals(seg_rows),
            }
            with (out_dir / "segments.jsonl").open("a") as f:
                f.write(json.dumps(seg) + "\n")
    finally:
        sink.close()
        bar.close()
    return done
