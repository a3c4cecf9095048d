"""Router training pipeline on tiny random models: collect -> dataset -> train -> evaluate.

One in-process collection (configs/tiny.yaml, oracle chains, k = 2) feeds every test:
rows and resuming, labels / balancing / the split by problem, a classifier and a probe
that reload to identical probabilities, the probe's zero model forwards, and the metrics.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from arbitrage.collect import collect_in_process, load_collected, oracle_config
from arbitrage.router_data import build_dataset, load_rows, split_problems
from arbitrage.router_train import TrainSettings, evaluate_folder, format_table, roc_auc, spearman, train

PROBLEMS = [
    {"id": f"p{i}", "problem": f"Tom has {i} apples and buys {i + 2} more. How many?", "answer": str(2 * i + 2)}
    for i in range(8)
]


@pytest.fixture(scope="module")
def cfg():
    from configs import load_config

    return oracle_config(load_config("tiny"))


@pytest.fixture(scope="module")
def backend(cfg):
    from arbitrage.backend import LocalBackend

    return LocalBackend.from_config(cfg, roles=("draft", "target", "prm"))


@pytest.fixture(scope="module")
def collected(tmp_path_factory, cfg, backend):
    path = tmp_path_factory.mktemp("collect") / "collect.jsonl"
    stats = collect_in_process(cfg, PROBLEMS[:7], path, k=2, temperature=0.8, backend=backend)
    assert stats.problems_new == 7 and stats.problems_failed == 0
    return path


@pytest.fixture(scope="module")
def dataset(collected):
    rows = load_rows(collected)
    # the tiny judge rarely prefers the target: label at the median A so both classes exist
    return build_dataset(rows, margin=statistics.median(r["advantage"] for r in rows), val_fraction=0.3, seed=0)


def test_rows_follow_the_oracle_chain(collected, cfg):
    done = load_collected(collected)
    assert sorted(done) == [p["id"] for p in PROBLEMS[:7]]
    for rows in done.values():
        for i, r in enumerate(rows):
            assert r["step_index"] == i and r["num_steps"] == len(rows)
            assert len(r["targets"]) == 2 and [t["sampled"] for t in r["targets"]] == [False, True]
            assert r["target_score"] == pytest.approx(sum(t["score"] for t in r["targets"]) / 2)
            assert r["advantage"] == pytest.approx(r["target_score"] - r["draft_score"])
            assert set(r["draft_features"]) >= {"lp_mean", "lp_min", "lp_last", "ent_mean", "ent_max", "num_tokens"}
            # oracle at tau 0 continues with the greedy target step iff it scores higher
            assert (r["author"] == "target") == (r["targets"][0]["score"] > r["draft_score"])
            accepted = r["targets"][0]["text"] if r["author"] == "target" else r["draft"]
            if i + 1 < len(rows):
                assert rows[i + 1]["history"] == r["history"] + [[r["author"], accepted]]
            assert r["prm"].startswith("judge:") and r["k"] == 2


def test_resume_skips_finished_and_drops_partial(collected, cfg, backend, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(collected.read_bytes() + b'{"problem_id": "p7", "step_index": 0, "num_st')
    stats = collect_in_process(cfg, PROBLEMS, path, k=1, backend=backend)
    assert stats.problems_done_before == 7 and stats.problems_new == 1
    assert sorted(load_collected(path)) == sorted(p["id"] for p in PROBLEMS)


def test_balanced_and_split_by_problem(dataset):
    labels = [e.label for e in dataset.train]
    assert labels.count(0) == labels.count(1) > 0
    train_p = {e.problem_id for e in dataset.train}
    val_p = {e.problem_id for e in dataset.validation}
    assert val_p and not train_p & val_p and not set(dataset.train_problems) & set(dataset.validation_problems)
    assert split_problems([f"q{i}" for i in range(20)], 0.25, seed=3) == split_problems(
        [f"q{i}" for i in reversed(range(20))], 0.25, seed=3
    )
    e = dataset.validation[0]
    assert e.text.endswith(f"Model 0: {e.request.candidate}\n\n") and e.request.features is not None


def test_classifier_trains_saves_and_reloads(dataset, collected, tmp_path):
    from arbitrage.router import ClassifierRouter
    from arbitrage.router_factory import build_router
    from configs.schema import RouterConfig

    ts = TrainSettings(kind="classifier", backbone="random:tiny-llama", epochs=1, batch_size=8, max_length=128)
    router, info = train(dataset, tmp_path / "cls", ts, data_path=str(collected), log=lambda m: None)
    assert info["kind"] == "classifier" and len(info["train_loss"]) == 1
    reloaded = build_router(RouterConfig(kind="classifier", path=str(tmp_path / "cls"), max_length=128))
    assert isinstance(reloaded, ClassifierRouter)
    reqs = [e.request for e in dataset.validation]
    assert router.predict(reqs) == pytest.approx(reloaded.predict(reqs), abs=1e-6)
    report = evaluate_folder(tmp_path / "cls", collected)
    assert report["steps"] == len(dataset.validation) and set(report["rankings"]) == {"router", "draft_prm"}
    assert "draft PRM score, negated (RSD)" in format_table(report)
    assert report["labels"]["ties"] <= report["steps"] and "labels: Spearman" in format_table(report)
    with pytest.raises(ValueError, match="kind: classifier"):
        build_router(RouterConfig(kind="probe", path=str(tmp_path / "cls")))


def test_probe_reloads_and_runs_no_model_forward(dataset, collected, backend, tmp_path):
    from arbitrage.probe import ProbeRouter
    from arbitrage.router_factory import build_router
    from configs.schema import RouterConfig

    probe, info = train(dataset, tmp_path / "probe", TrainSettings(kind="probe", probe_steps=100), log=lambda m: None)
    reloaded = build_router(RouterConfig(kind="probe", path=str(tmp_path / "probe")))
    assert isinstance(reloaded, ProbeRouter) and not hasattr(reloaded, "model")
    assert sum(p.numel() for p in reloaded.head.parameters()) <= 32
    reqs = [e.request for e in dataset.validation]
    engines = (backend.draft, backend.target)
    before = [e.forward_calls for e in engines]
    probs = reloaded.predict(reqs)
    assert [e.forward_calls for e in engines] == before and reloaded.forward_calls == 0
    assert probs == pytest.approx(probe.predict(reqs), abs=1e-7) and all(0 <= p <= 1 for p in probs)
    report = evaluate_folder(tmp_path / "probe", collected)
    assert report["kind"] == "probe" and report["steps"] == len(dataset.validation)


def test_probe_routes_chains_through_the_loop(dataset, backend, tmp_path):
    import asyncio

    from arbitrage.backend import LocalBackend
    from arbitrage.loop import ChainInput, LoopSettings, run_chain
    from arbitrage.policies import make_policy
    from arbitrage.probe import ProbeRouter

    probe, _ = ProbeRouter.fit([e.request for e in dataset.train], [e.label for e in dataset.train], steps=20)
    local = LocalBackend(draft=backend.draft, target=backend.target, router=probe)
    res = asyncio.run(
        run_chain(
            ChainInput("x", "What is 2 + 2?"),
            local,
            make_policy("router", 0.5),
            LoopSettings(max_step_tokens=6, max_steps=3),
        )
    )
    assert res.router_calls == len(res.steps) >= 1 and probe.head_calls >= 1 and probe.forward_calls == 0
    assert all(s.router_prob is not None for s in res.steps)


def test_metrics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=g).tolist()  # ties on purpose
    labels = torch.randint(0, 2, (40,), generator=g).tolist()
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(brute)
    assert roc_auc([1, 2], [1, 1]) is None
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40])[0] == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == (None, None)


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    res = CliRunner().invoke(app, ["eval-router", "--data", str(tmp_path / "none.jsonl"), "--router", str(tmp_path)])
    assert res.exit_code == 2 and "router.json" in res.output
    res = CliRunner().invoke(
        app, ["train-router", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 2 and "arbitrage collect" in res.output


def test_identical_target_step_is_a_tie():
    from arbitrage.router_data import advantage, example_from_row

    row = {
        "problem_id": "p",
        "step_index": 0,
        "problem": "q",
        "history": [],
        "draft": "x = 2",
        "draft_score": 0.70,
        "draft_features": None,
        "advantage": 0.012,
        "targets": [{"text": "x = 2", "score": 0.712}, {"text": "x = 3", "score": 0.90}],
    }
    assert advantage(row) == pytest.approx((0.70 + 0.90) / 2 - 0.70)
    row["targets"] = row["targets"][:1]
    ex = example_from_row(row)
    assert ex.advantage == 0.0 and ex.label == 0


def test_label_quality_flags_a_prm_that_scores_both_steps_alike():
    from arbitrage.router_data import RouterExample
    from arbitrage.router_train import label_quality

    def examples(gaps):
        return [RouterExample(f"p{i}", 0, None, a, int(a > 0), 0.1 + 0.02 * i) for i, a in enumerate(gaps)]

    report = {
        "split": "all",
        "steps": 40,
        "problems": 40,
        "positive_rate": 0.5,
        "margin": 0.0,
        "kind": "probe",
        "rankings": {
            "router": {"spearman": 0.1, "spearman_p": 0.5, "auc": 0.55},
            "draft_prm": {"spearman": 0.1, "spearman_p": 0.5, "auc": 0.55},
        },
    }
    alike = label_quality(examples([0.001 * (-1) ** i for i in range(40)]))  # A: noise around equal scores
    assert alike["spearman_draft_target"] > 0.99 and alike["abs_advantage_median"] == pytest.approx(0.001)
    assert alike["ties"] == 0 and alike["draft_score_sd"] == pytest.approx(
        statistics.pstdev([0.1 + 0.02 * i for i in range(40)])
    )
    assert "mostly PRM noise" in format_table({**report, "labels": alike})
    g = torch.Generator().manual_seed(0)
    apart = label_quality(examples((torch.rand(40, generator=g) - 0.5).tolist()))  # the PRM separates steps
    assert apart["spearman_draft_target"] < 0.8
    table = format_table({**report, "labels": apart})
    assert "labels: Spearman(draft PRM, target PRM)" in table and "mostly PRM noise" not in table
