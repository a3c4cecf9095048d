"""Replay a sweep's traces through one step cache: what a single uninterrupted cached run saves.

`arbitrage eval` records the step-cache hits each chain actually got (`row["cache"]`), but
a sweep that was interrupted and resumed starts the next process with an empty cache. With
greedy decoding every model call of a chain is determined by its trace, so the calls a
single process would have made -- and which of them repeat an earlier call -- can be
counted exactly from `results.jsonl`:

    draft step   (problem, accepted steps so far)              for each step of a draft-using policy
    target step  (problem, accepted steps so far)              for each step the target wrote
    PRM score    (problem, accepted steps so far + the step)   for each step with prm_draft / prm_target

Groups are replayed in the order given by `--groups` (the sweep's run order), problems in
id order within a group (inside a group, problems never share a prefix, so the order there
does not matter).

    python benchmarks/cache_replay.py runs/sweep-gsm8k30 \
        --groups draft_only,rsd@0.65,router@0.65,rsd@0.7,router@0.55,rsd@0.75,router@0.45,target_only
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from cluster.evaluate import cache_totals, load_results, parse_groups


def chain_calls(row: dict) -> list[tuple[tuple, int]]:
    """(cache key, generated tokens or 0) for every model call the chain made, in order."""
    calls: list[tuple[tuple, int]] = []
    prefix: tuple[str, ...] = ()
    p = row["problem"]
    for st in row["steps"]:
        draft_text = (
            st["draft_text"] if st["draft_text"] is not None else (st["text"] if st["author"] == "draft" else None)
        )
        if draft_text is not None:
            calls.append((("draft", p, prefix), st["draft_tokens"]))
        if st["author"] == "target":
            calls.append((("target", p, prefix), st["target_tokens"]))
        if st["prm_draft"] is not None and draft_text is not None:
            calls.append((("prm", p, prefix + (draft_text,)), 0))
        if st["prm_target"] is not None:
            target_text = st["text"] if st["author"] == "target" else st["target_text"]
            calls.append((("prm", p, prefix + (target_text,)), 0))
        prefix = prefix + (st["text"],)
    return calls


def replay(rows: dict[str, dict], order: list) -> dict:
    """Hits, misses and saved tokens per group and role with one cache across the groups in `order`."""
    seen: set[tuple] = set()
    out = {}
    for g in order:
        rs = sorted(
            (r for r in rows.values() if r["policy"] == g.policy and float(r["threshold"]) == g.threshold),
            key=lambda r: r["problem_id"],
        )
        tot = {k: defaultdict(int) for k in ("hits", "misses", "tokens_saved")}
        for r in rs:
            for key, tokens in chain_calls(r):
                role = key[0]
                if key in seen:
                    tot["hits"][role] += 1
                    tot["tokens_saved"][role] += tokens
                else:
                    tot["misses"][role] += 1
                    seen.add(key)
        out[g.label] = {"chains": len(rs), **{k: dict(v) for k, v in tot.items()}, "recorded": cache_totals(rs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--groups", required=True, help="the sweep's cells in run order (as `arbitrage eval --groups`)")
    ap.add_argument("--out", type=Path, help="JSON file (default: <run_dir>/cache_replay.json)")
    a = ap.parse_args()
    res = replay(load_results(a.run_dir / "results.jsonl"), parse_groups(a.groups))
    (a.out or a.run_dir / "cache_replay.json").write_text(json.dumps(res, indent=2) + "\n")
    print(
        "| group | chains | draft hits / calls | target hits / calls | PRM hits / calls | tokens saved | recorded hits |"
    )
    print("|---|---|---|---|---|---|---|")
    all_h = all_n = 0
    for label, r in res.items():
        cells = []
        for role in ("draft", "target", "prm"):
            h, m = r["hits"].get(role, 0), r["misses"].get(role, 0)
            cells.append(f"{h} / {h + m}" if h + m else "-")
            all_h, all_n = all_h + h, all_n + h + m
        rec = sum(r["recorded"]["hits"].values())
        print(f"| {label} | {r['chains']} | " + " | ".join(cells) + f" | {sum(r['tokens_saved'].values())} | {rec} |")
    print(f"\nall groups: {all_h} of {all_n} model calls ({all_h / max(all_n, 1):.0%}) repeat an earlier call")


if __name__ == "__main__":
    main()
