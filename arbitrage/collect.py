"""Router training data: draft vs. target steps from the same prefix, PRM-scored, along oracle chains.

The chains are ordinary runs of the one step loop (`arbitrage.loop`) under the `oracle`
policy at tau = 0: at every step it decodes a draft step and a target step from the same
prefix, scores both with the PRM and continues with the better one, and its trace keeps
both texts (`TraceStep.draft_text` / `target_text`). Each finished chain becomes one JSONL
row per step:

    problem_id, step_index, num_steps, problem, reference, correct,
    history   [[author, text], ...]   the accepted steps before this one
    draft     the draft step's text;  draft_tokens, draft_score, draft_features
    targets   [{text, score, num_tokens, sampled}]   the greedy target step, then k - 1 samples
    target_score = mean of the targets' scores;  advantage A = target_score - draft_score
    author    who wrote the accepted step;  prm, config, k   provenance

With k > 1 the extra target samples (temperature > 0, distinct seeds) are drawn after the
chain finishes, from each step's prefix, through the same `ModelBackend` the chain used
(`sample_targets`); the chain itself is not changed by them.

Resumable, in the pattern of `cluster.evaluate`: a problem's rows are written together in
one flushed and fsynced write, so a problem is finished exactly when all of its
`num_steps` rows are on disk. `load_collected` drops corrupt lines and incomplete problems
(rewriting the file without them), and re-running collects only the missing problems.
Chains that ended in an error or timeout write nothing and are retried on the next run.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from arbitrage.backend import ModelBackend
from arbitrage.loop import ChainInput, LoopSettings
from arbitrage.prm import PRMRequest
from arbitrage.types import FAILED_STOPS, SamplingParams, StepRequest

SAMPLE_SEED_STRIDE = 7919  # seeds of extra sample j: settings.seed + stride * j + step index


@dataclass
class CollectStats:
    """What one `collect` call did."""

    problems_done_before: int = 0
    problems_new: int = 0
    problems_failed: int = 0
    steps_new: int = 0
    elapsed_s: float = 0.0
    failures: list[str] = field(default_factory=list)


def collect_meta(cfg, k: int, temperature: float) -> dict:
    """Provenance fields copied into every row (config name, PRM, k, sample temperature)."""
    prm = cfg.models.prm
    prm_name = (
        None if prm is None else f"{prm.kind}:{prm.source.name}" + (" (reuses target)" if prm.reuse_target else "")
    )
    return {"config": cfg.name, "prm": prm_name, "k": k, "sample_temperature": temperature if k > 1 else None}


def oracle_config(cfg):
    """The config to collect with: oracle policy at tau = 0, no router loaded."""
    return cfg.with_overrides(**{"policy.name": "oracle", "policy.threshold": 0.0, "models.router": None})


# ---- rows -----------------------------------------------------------------------------


def rows_from_chain(result: dict, extra: list[list[dict]] | None = None, meta: dict | None = None) -> list[dict]:
    """One row per step of a finished oracle chain.

    Args:
        result: `ChainResult.to_dict()` of an oracle chain (both steps kept in its trace).
        extra: per step, the extra target samples `{text, score, num_tokens}` (k > 1).
        meta: provenance fields added to each row.
    Returns:
        The chain's rows, in step order.
    """
    steps = result["steps"]
    rows: list[dict] = []
    history: list[tuple[str, str]] = []  # (author, text) of the steps before step i
    for i, st in enumerate(steps):
        if st.get("prm_draft") is None or st.get("prm_target") is None:
            raise ValueError(f"{result['problem_id']} step {i} lacks PRM scores; collect with the oracle policy")
        draft = st["draft_text"] if st.get("draft_text") is not None else st["text"]
        greedy = st["target_text"] if st.get("target_text") is not None else st["text"]
        targets = [{"text": greedy, "score": st["prm_target"], "num_tokens": st["target_tokens"], "sampled": False}]
        targets += [{**e, "sampled": True} for e in (extra[i] if extra else [])]
        target_score = sum(t["score"] for t in targets) / len(targets)
        rows.append(
            {
                "problem_id": result["problem_id"],
                "step_index": i,
                "num_steps": len(steps),
                "problem": result["problem"],
                "reference": result.get("reference"),
                "correct": result.get("correct"),
                "history": [list(h) for h in history],
                "draft": draft,
                "draft_tokens": st["draft_tokens"],
                "draft_score": st["prm_draft"],
                "draft_features": st.get("draft_features"),
                "targets": targets,
                "target_score": target_score,
                "advantage": target_score - st["prm_draft"],
                "author": st["author"],
                **(meta or {}),
            }
        )
        history.append((st["author"], st["text"]))
    return rows


async def sample_targets(
    backend: ModelBackend, s: LoopSettings, item: ChainInput, steps: list[dict], n: int, temperature: float
) -> list[list[dict]]:
    """`n` extra target steps per step of a finished chain, each from that step's prefix, PRM-scored.

    Args:
        backend: the backend the chain ran on (target and PRM roles).
        s: the chain's loop settings (the step's token budget is recomputed as the loop does).
        item: the problem.
        steps: the chain's trace steps (dicts).
        n: samples per step (k - 1).
        temperature: sampling temperature (> 0).
    Returns:
        Per step, `n` dicts {text, score, num_tokens}.
    """
    if n <= 0:
        return [[] for _ in steps]
    if temperature <= 0:
        raise ValueError(f"extra target samples need a temperature > 0, got {temperature}")

    async def one(i: int, j: int) -> dict:
        prefix = tuple(st["text"] for st in steps[:i])
        used = sum(st["num_tokens"] for st in steps[:i])
        params = SamplingParams(
            separator=s.separator,
            max_tokens=max(1, min(s.max_total_tokens - used, s.max_step_tokens)),
            temperature=temperature,
            top_p=s.top_p,
            seed=s.seed + SAMPLE_SEED_STRIDE * (j + 1) + i,
        )
        req = StepRequest(
            problem=item.problem, steps=prefix, system=s.system_prompt, chat=s.use_chat_template, params=params
        )
        out = await backend.target_step(req)
        score = await backend.prm_score(PRMRequest(item.problem, prefix + (out.text,)))
        return {"text": out.text, "score": score, "num_tokens": out.num_tokens}

    flat = await asyncio.gather(*(one(i, j) for i in range(len(steps)) for j in range(n)))
    return [list(flat[i * n : (i + 1) * n]) for i in range(len(steps))]


# ---- the resumable file ---------------------------------------------------------------


def read_collected(path: Path) -> tuple[dict[str, list[dict]], bool]:
    """Finished problems' rows by problem id, read without touching the file.

    A problem is finished when rows 0 .. num_steps - 1 are all present; corrupt lines
    and incomplete problems are left out.

    Args:
        path: the collection JSONL file (may not exist).
    Returns:
        (problem id -> its rows sorted by step index, in order of first appearance;
        whether anything was left out or the last line is unterminated).
    """
    path = Path(path)
    if not path.exists():
        return {}, False
    raw = path.read_bytes()
    groups: dict[str, dict[int, dict]] = {}
    bad = 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["num_steps"])
            groups.setdefault(str(row["problem_id"]), {})[int(row["step_index"])] = row
        except (ValueError, KeyError, TypeError):
            bad += 1
    done: dict[str, list[dict]] = {}
    for pid, by_step in groups.items():
        n = int(next(iter(by_step.values()))["num_steps"])
        if n > 0 and set(by_step) == set(range(n)):
            done[pid] = [by_step[i] for i in range(n)]
        else:
            bad += 1
    return done, bool(bad) or bool(raw and not raw.endswith(b"\n"))


def load_collected(path: Path) -> dict[str, list[dict]]:
    """`read_collected`, then rewrite the file without what was left out (before appending to it).

    Args:
        path: the collection JSONL file (may not exist).
    Returns:
        problem id -> its rows sorted by step index.
    """
    path = Path(path)
    done, dirty = read_collected(path)
    if dirty:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for rows in done.values() for r in rows))
        os.replace(tmp, path)
    return done


class RowSink:
    """Appends all rows of one problem in a single flushed, fsynced write."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a")

    def write_problem(self, rows: list[dict]) -> None:
        self._f.write("".join(json.dumps(r) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def pending_items(problems: Iterable, done: dict[str, list[dict]]) -> list[ChainInput]:
    """The problems not yet collected, as ChainInputs."""
    from arbitrage.runner import as_input

    return [it for it in map(as_input, problems) if it.id not in done]


# ---- one collection run, whatever runs its chains ----------------------------------------


class Collection:
    """One resumable collection run: the problems left, the sink, and how a finished chain
    becomes rows. Both drivers -- `collect_in_process` and `cluster.router_cli.collect_on_runtime`
    -- run `todo` as oracle chains inside `with collection:` and hand each result to `finish`."""

    def __init__(
        self,
        cfg,
        problems: list,
        out: Path,
        k: int = 1,
        temperature: float = 0.7,
        on_problem: Callable[[dict, list[dict]], None] | None = None,
    ):
        """Args: cfg: the collection config (`oracle_config`); problems, out, k, temperature,
        on_problem: as for `collect_in_process`."""
        if k < 1:
            raise ValueError(f"--k must be >= 1, got {k}")
        done = load_collected(out)
        self.todo = pending_items(problems, done)
        self.stats = CollectStats(problems_done_before=len(done))
        self.settings = LoopSettings.from_config(cfg)
        self.out, self.k, self.temperature, self.on_problem = Path(out), k, temperature, on_problem
        self._meta = collect_meta(cfg, k, temperature)
        self._by_id = {it.id: it for it in self.todo}
        self._sink: RowSink | None = None
        self._t0 = 0.0

    def __enter__(self) -> "Collection":
        self._sink, self._t0 = RowSink(self.out), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._sink is not None:
            self._sink.close()
        self.stats.elapsed_s = time.perf_counter() - self._t0

    async def finish(self, backend: ModelBackend, result: dict) -> None:
        """A finished chain (`ChainResult.to_dict()`): its extra target samples, rows, record."""
        assert self._sink is not None, "use the Collection as a context manager"
        rows = None
        if result["stop_reason"] not in FAILED_STOPS:
            item, n = self._by_id[result["problem_id"]], self.k - 1
            extra = await sample_targets(backend, self.settings, item, result["steps"], n, self.temperature)
            rows = rows_from_chain(result, extra, self._meta)
        record(self.stats, self._sink, result, rows, self.on_problem)


def collect_in_process(
    cfg,
    problems: list,
    out: Path,
    k: int = 1,
    temperature: float = 0.7,
    backend: ModelBackend | None = None,
    on_problem: Callable[[dict, list[dict]], None] | None = None,
) -> CollectStats:
    """Collect router training rows for the missing problems with the core loop in this process.

    Args:
        cfg: an ArbitrageConfig with a PRM (policy and router are overridden: oracle, tau 0).
        problems: data.Problems (or dicts / ChainInputs).
        out: the JSONL file (appended; finished problems are skipped).
        k: target steps per step (1 greedy + k - 1 samples at `temperature`).
        temperature: temperature of the extra samples.
        backend: reuse loaded models (draft, target, prm); by default loaded from `cfg`.
        on_problem: called with (chain result dict, its rows) per finished problem.
    Returns:
        Counts and timing.
    """
    from arbitrage.backend import LocalBackend
    from arbitrage.loop import run_chains
    from arbitrage.policies import make_policy

    cfg = oracle_config(cfg)
    job = Collection(cfg, problems, out, k, temperature, on_problem)
    if not job.todo:
        return job.stats
    backend = backend or LocalBackend.from_config(cfg, roles=("draft", "target", "prm"))

    async def on_result(res) -> None:
        await job.finish(backend, res.to_dict())

    with job:
        asyncio.run(
            run_chains(
                job.todo,
                backend,
                make_policy("oracle", 0.0, seed=cfg.generation.seed),
                job.settings,
                max_concurrent=cfg.runtime.max_concurrent_chains,
                timeout_s=cfg.runtime.chain_timeout_s,
                on_result=on_result,
            )
        )
    return job.stats


def record(
    stats: CollectStats,
    sink: RowSink,
    result: dict,
    rows: list[dict] | None,
    on_problem: Callable[[dict, list[dict]], None] | None,
) -> None:
    """Write a finished problem's rows (or count its failure) and report it."""
    if rows:
        sink.write_problem(rows)
        stats.problems_new += 1
        stats.steps_new += len(rows)
    else:
        stats.problems_failed += 1
        stats.failures.append(f"{result['problem_id']}: {result.get('error') or result['stop_reason']}")
    if on_problem is not None:
        on_problem(result, rows or [])
