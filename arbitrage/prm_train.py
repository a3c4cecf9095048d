"""Train and evaluate the value-head PRM on Monte-Carlo labelled rows (`arbitrage train-prm`).

From labelled rows (`arbitrage.label`): every distinct (prefix, step) -- the draft step
and, unless a tie, the target step of each row -- is one example with soft label V. Its
feature is the backbone's hidden state after the step (`value_prm.step_prompt_ids`),
read through a llama.cpp engine with embeddings on. The head is fitted on the training
problems (`train_value_head`), its width chosen by held-out loss, and reported on held-out
problems only:

- step correctness: ROC-AUC of the score for 1[V >= 0.5], Spearman with V;
- chain correctness: ROC-AUC of the lowest score over a chain's accepted steps for the
  chain's final correctness, beside the same statistic of the PRM the rows were collected
  with (the LLM judge: its `draft_score` / `target_score`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from arbitrage.prm import PRMRequest
from arbitrage.router_data import split_problems
from arbitrage.router_train import roc_auc, spearman
from arbitrage.value_prm import HeadTraining, ValueHead, step_prompt_ids, train_value_head


def examples_from_rows(rows: list[dict]) -> list[dict]:
    """One example per distinct (problem, prefix, step): {problem_id, problem, steps, v, side, row}."""
    out, seen = [], set()
    for r in rows:
        prefix = tuple(t for _, t in r["history"])
        for side, text, v in (("draft", r["draft"], r["v_draft"]), ("target", r["targets"][0]["text"], r["v_target"])):
            key = (r["problem_id"], prefix, text)
            if key in seen:
                continue
            seen.add(key)
            out.append(
                {
                    "problem_id": str(r["problem_id"]),
                    "problem": r["problem"],
                    "steps": prefix + (text,),
                    "v": float(v),
                    "side": side,
                    "step_index": int(r["step_index"]),
                }
            )
    return out


def hidden_features(
    engine, examples: list[dict], system: str | None, chat: bool = True, batch: int = 16, progress=None
) -> torch.Tensor:
    """The backbone's hidden state after each example's step; [N, H].

    Examples are fed in step order with one KV key per (problem, side), so each prompt
    extends the KV of the one before it on the same problem (only the new step is prefilled).
    """
    order = sorted(range(len(examples)), key=lambda i: (examples[i]["step_index"], examples[i]["problem_id"]))
    feats: list[torch.Tensor | None] = [None] * len(examples)
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        reqs = [PRMRequest(examples[i]["problem"], examples[i]["steps"]) for i in idx]
        ids = [step_prompt_ids(engine.tokenizer, r, system, chat) for r in reqs]
        keys = [f"feat|{examples[i]['problem_id']}|{examples[i]['side']}" for i in idx]
        for i, h in zip(idx, engine.hidden_states(ids, keys)):
            feats[i] = h.float()
        if progress is not None:
            progress(len(idx))
    got = [h for h in feats if h is not None]
    if len(got) < len(feats):
        raise ValueError(
            f"the backbone engine returned no hidden state for {len(feats) - len(got)} of {len(feats)} steps"
        )
    return torch.stack(got)


def chain_auc(rows: list[dict], score_of) -> float | None:
    """ROC-AUC of a chain's lowest accepted-step score for its correctness (one point per problem)."""
    by_pid: dict[str, list[dict]] = {}
    for r in rows:
        by_pid.setdefault(str(r["problem_id"]), []).append(r)
    lows, ys = [], []
    for pid, rs in by_pid.items():
        if rs[0].get("correct") is None:
            continue
        scores = [score_of(r) for r in rs]
        scores = [s for s in scores if s is not None]
        if scores:
            lows.append(min(scores))
            ys.append(int(bool(rs[0]["correct"])))
    return roc_auc(lows, ys)


def step_metrics(scores: Sequence[float], values: Sequence[float]) -> dict:
    rho, _ = spearman(scores, values)
    return {"n": len(scores), "auc_v_ge_half": roc_auc(scores, [int(v >= 0.5) for v in values]), "spearman_v": rho}


def train_prm(
    rows: list[dict],
    engine,
    out: str | Path,
    backbone: str,
    system: str | None,
    chat: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
    widths=(0, 64),
    progress=None,
) -> dict:
    """Extract features, fit heads of each width on the training problems, keep the best, report.

    Returns:
        The report written to `<out>/value_head.json` (also the head's metadata).
    """
    t0 = time.perf_counter()
    examples = examples_from_rows(rows)
    x = hidden_features(engine, examples, system, chat, progress=progress)
    v = torch.tensor([e["v"] for e in examples])
    train_ids, val_ids = split_problems(sorted({e["problem_id"] for e in examples}), val_fraction, seed)
    val_set = set(val_ids)
    # Early stopping and the width are chosen on development problems carved out of the training
    # problems, so the reported validation problems play no part in fitting.
    fit_ids, dev_ids = split_problems(train_ids, 0.2, seed + 1)
    dev_set = set(dev_ids)
    fit_m = torch.tensor([e["problem_id"] in set(fit_ids) for e in examples])
    dev_m = torch.tensor([e["problem_id"] in dev_set for e in examples])
    best = None
    for width in widths:
        ts = HeadTraining(width=width, seed=seed)
        _, fit = train_value_head(x[fit_m], v[fit_m], ts, x[dev_m], v[dev_m])
        if best is None or fit["val_loss"] < best[1]["val_loss"]:
            best = (ts, fit)
    if best is None:
        raise ValueError("train_prm needs at least one head width to try (widths is empty)")
    # refit on all training problems for the chosen width and epoch count
    ts = HeadTraining(width=best[0].width, epochs=best[1]["best_epoch"] + 1, seed=seed)
    tr = fit_m | dev_m
    head, fit = train_value_head(x[tr], v[tr], ts)
    fit = {**fit, "dev_loss": best[1]["val_loss"], "dev_problems": len(dev_ids)}
    with torch.no_grad():
        scores = torch.sigmoid(head(x)).tolist()
    score_of = {(e["problem_id"], e["steps"]): s for e, s in zip(examples, scores)}
    hidden_of = {(e["problem_id"], e["steps"]): h for e, h in zip(examples, x)}
    val_ex = [(s, e["v"]) for e, s in zip(examples, scores) if e["problem_id"] in val_set]
    val_rows = [r for r in rows if str(r["problem_id"]) in val_set]

    def accepted(r):  # the accepted step's key: the draft's, or the target's when it wrote the step
        text = r["draft"] if r["author"] == "draft" else r["targets"][0]["text"]
        return str(r["problem_id"]), tuple(t for _, t in r["history"]) + (text,)

    def judge(r):
        return r.get("draft_score") if r["author"] == "draft" else r["targets"][0].get("score")

    report = {
        "backbone": backbone,
        "examples": len(examples),
        "train_problems": len(train_ids),
        "validation_problems": len(val_ids),
        "hidden_size": int(x.shape[1]),
        "training": {**asdict(ts), **fit},
        "validation": {
            "step": step_metrics([s for s, _ in val_ex], [v for _, v in val_ex]),
            "chain_auc_min_step": chain_auc(val_rows, lambda r: score_of.get(accepted(r))),
            "judge_chain_auc_min_step": chain_auc(val_rows, judge),
            "judge_step": step_metrics(
                *zip(
                    *[
                        (judge(r), r["v_draft"] if r["author"] == "draft" else r["v_target"])
                        for r in val_rows
                        if judge(r) is not None
                    ]
                )
            )
            if any(judge(r) is not None for r in val_rows)
            else None,
        },
        "validation_problem_ids": sorted(val_set),
        "train_seconds": time.perf_counter() - t0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    head.save(out, report)
    hidden = (lambda pid, steps: hidden_of[(pid, steps)]) if backbone == "draft" else None
    write_scored_rows(
        rows, lambda pid, steps: score_of[(pid, steps)], Path(out) / "scored.jsonl", f"value:{Path(out).name}", hidden
    )
    write_scored_rows(rows, None, Path(out) / "mc.jsonl", "mc", hidden)
    write_scored_rows(
        rows,
        lambda pid, steps: score_of[(pid, steps)],
        Path(out) / "mc_prm_baseline.jsonl",
        f"value:{Path(out).name} (draft score) / A_mc",
        hidden,
        mc_advantage=True,
    )
    return report


def write_scored_rows(rows: list[dict], score, path: Path, name: str, hidden=None, mc_advantage: bool = False) -> None:
    """The rows re-scored for router training (`arbitrage train-router --data`).

    `draft_score` and the greedy target's `score` become the trained PRM's (or, with
    `score` None, the Monte-Carlo values V), so the router pipeline's advantage
    A = target score - draft score is the new PRM's (or A_mc). Extra target samples are dropped.
    With `mc_advantage`, the draft keeps the new PRM's score and the target gets draft score + A_mc:
    `eval-router` then ranks on the true advantage A_mc beside RSD's ranking by the deployed PRM
    (on `mc.jsonl` that ranking would read V_mc(draft), half of the label).
    With `hidden` (the draft backbone's state after the draft step), rows carry it as
    `draft_hidden` (4 significant digits) for the hidden-state router (`--kind hidden`).
    """
    lines = []
    for r in rows:
        pid, prefix = str(r["problem_id"]), tuple(t for _, t in r["history"])
        target = r["targets"][0]
        if score is None:
            d, t = float(r["v_draft"]), float(r["v_target"])
        elif mc_advantage:
            d = score(pid, prefix + (r["draft"],))
            t = d + float(r["v_target"]) - float(r["v_draft"])
        else:
            d, t = score(pid, prefix + (r["draft"],)), score(pid, prefix + (target["text"],))
        extra = {}
        if hidden is not None:
            extra["draft_hidden"] = [float(f"{v:.4g}") for v in hidden(pid, prefix + (r["draft"],)).tolist()]
        lines.append(
            json.dumps(
                {
                    **r,
                    "draft_score": d,
                    "targets": [{**target, "score": t}],
                    "target_score": t,
                    "advantage": t - d,
                    "prm": name,
                    "k": 1,
                    **extra,
                }
            )
        )
    path.write_text("".join(line + "\n" for line in lines))


def read_rows(path: str | Path, check, what: str) -> list[dict]:
    """Rows of a JSONL file, each passed to `check` (raises KeyError / IndexError / TypeError when
    the row is not `what`); a bad line is named by file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data: no such file: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            check(row)
        except (ValueError, KeyError, TypeError, IndexError):
            raise ValueError(f"--data: {path}:{n} is not {what}") from None
        rows.append(row)
    if not rows:
        raise ValueError(f"--data: {path} has no rows")
    return rows


def load_labelled(path: str | Path) -> list[dict]:
    """Labelled rows from a JSONL file (`arbitrage label --out`)."""
    return read_rows(path, lambda r: (r["v_draft"], r["v_target"]), "a labelled row (run `arbitrage label` first)")


__all__ = ["ValueHead", "chain_auc", "examples_from_rows", "hidden_features", "load_labelled", "train_prm"]
