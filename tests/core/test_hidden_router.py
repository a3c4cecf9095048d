"""The hidden-state router: starts as 1 - V of its PRM, learns advantage labels, loads by config."""

import asyncio
import json

import pytest
import torch

from arbitrage.hidden_router import HiddenRouter
from arbitrage.router import RouterRequest
from arbitrage.router_factory import InProcessRouter, build_router
from arbitrage.service import check_service_stats
from arbitrage.router_data import build_dataset
from arbitrage.router_train import TrainSettings, train
from arbitrage.value_prm import HeadTraining, ValueHead, train_value_head
from configs.schema import RouterConfig

DIM = 12


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    v = torch.sigmoid(2 * x[:, 0])  # the value lives on coordinate 0
    return x, v


def _req(h):
    return RouterRequest("p", (), "step", None, [float(t) for t in h])


def test_initial_router_is_one_minus_the_prm_value():
    x, v = _data()
    prm, _ = train_value_head(x, v, HeadTraining(epochs=100))
    router = HiddenRouter.initial(prm)
    with torch.no_grad():
        want = 1 - torch.sigmoid(prm(x[:5]))
    assert router.predict([_req(h) for h in x[:5]]) == pytest.approx(want.tolist(), abs=1e-6)


def test_fit_learns_labels_the_prm_does_not_know_and_round_trips(tmp_path):
    x, v = _data()
    prm, _ = train_value_head(x, v, HeadTraining(epochs=100))
    y = (x[:, 1] > 0).float()  # advantage lives on coordinate 1, which V ignores
    before = torch.tensor(HiddenRouter.initial(prm).predict([_req(h) for h in x]))
    router, losses = HiddenRouter.fit(x, y, init=prm, steps=300, prior=1e-3)
    assert losses[-1] < losses[0]
    p = torch.tensor(router.predict([_req(h) for h in x]))
    assert ((before > 0.5).float() == y).float().mean() < 0.65  # the PRM alone does not know y
    assert ((p > 0.5).float() == y).float().mean() > 0.8
    router.save_pretrained(tmp_path / "r", {"note": "test"})
    loaded = build_router(RouterConfig(kind="hidden", path=str(tmp_path / "r")))
    assert loaded.predict([_req(h) for h in x[:4]]) == pytest.approx(p[:4].tolist(), abs=1e-6)
    # model-free: served inside the coordinator, like the probe
    in_proc = InProcessRouter(RouterConfig(kind="hidden", path=str(tmp_path / "r")))
    assert asyncio.run(in_proc.predict(_req(x[0]))) == pytest.approx(float(p[0]), abs=1e-6)
    stats = check_service_stats(in_proc.stats())  # the one stats schema (arbitrage.service)
    assert stats["role"] == "router" and stats["methods"]["predict"]["batch_sizes"] == {1: 1}
    with pytest.raises(RuntimeError, match="router service does not serve 'generate_step'"):
        asyncio.run(in_proc.generate_step(None))


def test_missing_hidden_state_is_a_clear_error(tmp_path):
    router = HiddenRouter(ValueHead(DIM))
    with pytest.raises(ValueError, match="hidden_states: true"):
        router.predict([RouterRequest("p", (), "step")])
    with pytest.raises(ValueError, match="kind 'hidden' needs `path`"):
        build_router(RouterConfig(kind="hidden", source={"kind": "random", "name": "tiny"}))


def test_train_router_kind_hidden_from_scored_rows(tmp_path):
    x, v = _data(400)
    prm, _ = train_value_head(x, v, HeadTraining(epochs=50))
    prm.save(tmp_path / "prm", {"backbone": "draft"})
    rows = []
    for i, h in enumerate(x):
        d = float(torch.sigmoid(2 * h[0]))
        t = d + (0.2 if h[1] > 0 else -0.2)
        rows.append(
            {
                "problem_id": f"q{i // 4}",
                "step_index": i % 4,
                "problem": "p",
                "history": [],
                "draft": f"d{i}",
                "draft_score": d,
                "targets": [{"text": f"t{i}", "score": t}],
                "draft_features": None,
                "draft_hidden": h.tolist(),
            }
        )
    ds = build_dataset(rows, margin=0.0, val_fraction=0.25, seed=0)
    ts = TrainSettings(kind="hidden", init_prm=str(tmp_path / "prm"), probe_steps=300, prior=1e-3)
    router, info = train(ds, tmp_path / "router", ts)
    assert json.loads((tmp_path / "router" / "router.json").read_text())["kind"] == "hidden"
    assert info["validation"]["rankings"]["router"]["auc"] > 0.8
    rows[0] = {k: v for k, v in rows[0].items() if k != "draft_hidden"}
    with pytest.raises(ValueError, match="draft_hidden"):
        train(build_dataset(rows, val_fraction=0.25, seed=0), tmp_path / "r2", ts)
