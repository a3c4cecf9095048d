"""Model-role deployments autoscale from `serve.autoscaling.<role>`: load adds a replica, idle
removes it, and no request is lost (or changed) during either.

A live tiny-model app on the session Ray, with the draft deployment -- or a tensor-parallel
target (TP=2 over gloo, so one replica is one whole group of two ranks) -- allowed 1..2
replicas, a target of 1 request in flight per replica and short delays. 8 client threads
send greedy requests until Serve runs a second replica and a few more after it; then one
client keeps sending while the app idles back to one replica. Every answer must be 200 and
equal to the undisturbed answer to its problem.

Opt-in (`slow`, 3-5 minutes each here: the app's start alone takes 1-2 minutes on a loaded
2-core machine): `python -m pytest -s -m slow tests/cluster/test_serve_autoscale.py`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from ports import free_port

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
APP = "arbitrage-scale"
PROBLEMS = [f"A box holds {i + 3} eggs. How many eggs are in {i + 2} boxes?" for i in range(4)]
# Short delays for a test. The idle delay must outlast the noise of the load: Serve stops a replica
# it is still starting (75 s for a tiny draft on this loaded machine) whenever the load dips below
# the target for downscale_delay_s.
SCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 20,
    "look_back_period_s": 10,
}


def _replicas(deployment: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[APP].deployments[deployment].replica_states)


def _running(deployment: str) -> int:
    return _replicas(deployment).get("RUNNING", 0)


CASES = {  # role -> (config overrides, request policy): what puts the load on that role
    "draft": ({}, {"policy": "draft_only"}),
    "target-tp2": ({"runtime.target.tensor_parallel": 2}, {"policy": "router", "threshold": 0.0}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_load_adds_a_replica_idle_removes_it_no_request_lost(ray_local, case):
    from ray import serve

    from cluster.serve_app import run_openai_app
    from configs.schema import load_config

    overrides, policy = CASES[case]
    role = case.split("-")[0]
    port = free_port()
    cfg = load_config(
        TINY,
        **{
            "serve.port": port,
            "serve.max_queued_requests": 64,
            "serve.max_replicas": 1,
            f"serve.autoscaling.{role}": SCALING,
            **overrides,
        },
    )
    serve.shutdown()
    run_openai_app(cfg, name=APP)
    base = f"http://127.0.0.1:{port}"

    def body(i: int) -> dict:
        return {
            "model": "arbitrage",
            "messages": [{"role": "user", "content": PROBLEMS[i % 4]}],
            "max_tokens": 48,
            "arbitrage": {"max_steps": 4, **policy},
        }

    try:
        with httpx.Client(base_url=base, timeout=120) as http:
            reference = [
                http.post("/v1/chat/completions", json=body(i)).json()["choices"][0]["message"]["content"]
                for i in range(4)
            ]
        assert _running(role) == 1
        answers: list[tuple[str, int, int, str]] = []  # (phase, problem, status, content)
        phase = ["up"]
        stop_all, stop_extra = threading.Event(), threading.Event()

        def client(k: int, stop: threading.Event) -> None:
            with httpx.Client(base_url=base, timeout=120) as http:
                n = k
                while not stop.is_set() and n < k + 400:
                    r = http.post("/v1/chat/completions", json=body(n))
                    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
                    answers.append((phase[0], n % 4, r.status_code, text))
                    n += 1

        steady = threading.Thread(target=client, args=(0, stop_all), daemon=True)
        extra = [threading.Thread(target=client, args=(k, stop_extra), daemon=True) for k in range(1, 8)]
        t0 = time.monotonic()
        for t in [steady] + extra:
            t.start()
        decided_s = None
        while _running(role) < 2 and time.monotonic() - t0 < 300:
            if decided_s is None and sum(_replicas(role).values()) >= 2:
                decided_s = time.monotonic() - t0  # Serve decided to add one; it is starting
            time.sleep(0.5)
        up_s = time.monotonic() - t0
        assert _running(role) == 2, f"no second {role} replica after {up_s:.0f} s"
        served_before = len(answers)
        time.sleep(8)  # requests on two replicas
        phase[0] = "down"
        stop_extra.set()
        for t in extra:
            t.join(150)
        t1 = time.monotonic()
        while _running(role) > 1 and time.monotonic() - t1 < 240:
            time.sleep(0.5)
        down_s = time.monotonic() - t1
        time.sleep(3)  # the last client keeps going on one replica
        stop_all.set()
        steady.join(150)
        assert _running(role) == 1, f"still {_running(role)} {role} replicas after {down_s:.0f} s idle"
        print(
            f"autoscale {case}: 2nd replica started after {decided_s or up_s:.1f} s of load, running "
            f"after {up_s:.1f} s ({served_before} answers), "
            f"back to 1 after {down_s:.1f} s idle; answers {len(answers)}: "
            f"{sum(p == 'up' for p, *_ in answers)} while scaling up / on 2, "
            f"{sum(p == 'down' for p, *_ in answers)} while scaling down"
        )
        assert not any(t.is_alive() for t in [steady] + extra)
        assert [a for a in answers if a[2] != 200] == []  # nothing lost: every request answered 200
        assert all(text == reference[i] for _, i, _, text in answers)  # and unchanged
        assert any(p == "down" for p, *_ in answers)
    finally:
        serve.shutdown()
