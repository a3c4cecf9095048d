"""Router datasets from collected steps: labels, a split by problem, and class balancing.

Each row of `arbitrage collect` becomes a `RouterExample`: the `RouterRequest` the loop
would send for that draft step (problem, history annotated "Model 0"/"Model 1" by
`format_router_input`, the draft step as candidate, the draft's own step features), its
advantage A = mean target score - draft score (a target step identical to the draft step
counts as a tie, whatever the PRM's numerical noise says: see `advantage`), the label
y = 1[A > margin], and the draft's PRM score (the ranking RSD uses, for comparison).

Problems, never steps, are split between train and validation: the problem ids are
ordered by sha256(f"{seed}:{id}") and the first round(val_fraction * n) (at least one,
when there are two or more problems) are held out. The order of a problem does not
depend on the other problems, so the split stays nearly the same when the data grows.
Only the training steps are balanced: the majority class is downsampled to the size of
the minority class with a seeded RNG. Validation keeps its natural label distribution.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from arbitrage.router import RouterRequest, format_router_input


@dataclass(frozen=True)
class RouterExample:
    """One draft step: the router's request, its advantage, label and draft PRM score."""

    problem_id: str
    step_index: int
    request: RouterRequest
    advantage: float
    label: int
    draft_score: float
    tie: bool = False  # the target step's text equals the draft step's

    @property
    def text(self) -> str:
        """The classifier's input text (paper format)."""
        r = self.request
        return format_router_input(r.problem, r.history, r.candidate)


@dataclass
class RouterDataset:
    """Balanced training steps, natural validation steps, and how they were made."""

    train: list[RouterExample]
    validation: list[RouterExample]
    train_problems: list[str]
    validation_problems: list[str]
    stats: dict = field(default_factory=dict)


def load_rows(path: str | Path) -> list[dict]:
    """All rows of finished problems in a collection file (read-only).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no finished problem.
    """
    from arbitrage.collect import read_collected

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no collection file {path}; write one with `arbitrage collect --out {path}`")
    done, _ = read_collected(path)
    rows = [r for rows in done.values() for r in rows]
    if not rows:
        raise ValueError(f"{path} holds no finished problem; run `arbitrage collect` first")
    return rows


def advantage(row: dict) -> float:
    """A = mean target score - draft score, where a target step identical to the draft step scores as the draft.

    The PRM's scores of one text differ slightly between calls (bf16, batch and cached
    prefix layout: up to ~0.015 with the embedded judge), so an identical target step
    would otherwise get a random-signed advantage and a random label.
    """
    d = float(row["draft_score"])
    scores = [d if t["text"] == row["draft"] else float(t["score"]) for t in row["targets"]]
    return sum(scores) / len(scores) - d


def example_from_row(row: dict, margin: float = 0.0) -> RouterExample:
    """A `RouterExample` from one collected row; y = 1[A > margin] with A from `advantage`."""
    history = tuple((a, t) for a, t in row["history"])
    req = RouterRequest(row["problem"], history, row["draft"], row.get("draft_features"), row.get("draft_hidden"))
    adv = advantage(row)
    return RouterExample(
        str(row["problem_id"]),
        int(row["step_index"]),
        req,
        adv,
        int(adv > margin),
        float(row["draft_score"]),
        tie=any(t["text"] == row["draft"] for t in row["targets"][:1]),
    )


def split_problems(problem_ids, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split problem ids into (train, validation), seeded, by hash order.

    Args:
        problem_ids: the problems (duplicates ignored).
        val_fraction: share held out, in [0, 1).
        seed: split seed.
    Returns:
        (train ids, validation ids), each sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(set(map(str, problem_ids)), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n_val = round(val_fraction * len(ids))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    return sorted(ids[n_val:]), sorted(ids[:n_val])


def balance(examples: list[RouterExample], seed: int = 0) -> list[RouterExample]:
    """Downsample the majority label to the minority's size (seeded); order is shuffled.

    Raises:
        ValueError: one label is absent (nothing to balance against).
    """
    pos = [e for e in examples if e.label == 1]
    neg = [e for e in examples if e.label == 0]
    if not pos or not neg:
        raise ValueError(
            f"cannot balance {len(pos)} positive and {len(neg)} negative steps; "
            "collect more problems or change --margin"
        )
    rng = random.Random(seed)
    n = min(len(pos), len(neg))
    kept = rng.sample(pos, n) + rng.sample(neg, n)
    rng.shuffle(kept)
    return kept


def build_dataset(
    rows: list[dict], margin: float = 0.0, val_fraction: float = 0.2, seed: int = 0, balance_train: bool = True
) -> RouterDataset:
    """Labels, a split by problem and a balanced training set from collected rows.

    Args:
        rows: rows of `arbitrage collect` (finished problems).
        margin: y = 1[A > margin].
        val_fraction: share of problems held out.
        seed: seed of the split and of the balancing.
        balance_train: downsample the training majority label.
    Returns:
        The dataset, with counts in `stats`.
    """
    examples = [example_from_row(r, margin) for r in rows]
    train_ids, val_ids = split_problems([e.problem_id for e in examples], val_fraction, seed)
    val_set = set(val_ids)
    train_all = [e for e in examples if e.problem_id not in val_set]
    val = [e for e in examples if e.problem_id in val_set]
    train = balance(train_all, seed) if balance_train else list(train_all)
    stats = {
        "problems": len(train_ids) + len(val_ids),
        "steps": len(examples),
        "positive_steps": sum(e.label for e in examples),
        "margin": margin,
        "seed": seed,
        "val_fraction": val_fraction,
        "train_problems": len(train_ids),
        "train_steps_unbalanced": len(train_all),
        "train_steps": len(train),
        "train_positive": sum(e.label for e in train),
        "validation_problems": len(val_ids),
        "validation_steps": len(val),
        "validation_positive": sum(e.label for e in val),
        "prm": sorted({str(r.get("prm")) for r in rows}),
        "collect_config": sorted({str(r.get("config")) for r in rows}),
        "k": sorted({int(r.get("k") or 1) for r in rows}),
    }
    return RouterDataset(train, val, train_ids, val_ids, stats)
