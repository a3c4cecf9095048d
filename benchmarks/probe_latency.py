"""Cost of one probe-router decision as the coordinator pays it (`InProcessRouter.predict`).

python benchmarks/probe_latency.py --router routers/local-probe
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from arbitrage.router import RouterRequest  # noqa: E402
from arbitrage.router_factory import InProcessRouter  # noqa: E402
from configs.schema import RouterConfig  # noqa: E402


async def per_call_us(router: InProcessRouter, req: RouterRequest, n: int) -> float:
    await router.predict(req)  # first call builds the router
    t0 = time.perf_counter()
    for _ in range(n):
        await router.predict(req)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", default="routers/local-probe")
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()
    router = InProcessRouter(RouterConfig(kind="probe", path=a.router))
    features = {"lp_mean": -0.5, "lp_min": -3.0, "lp_last": -0.1, "ent_mean": 1.2, "ent_max": 3.0, "num_tokens": 64}
    req = RouterRequest("What is 2+2?", (("draft", "First."), ("target", "Second.")), "Then 4.", features)
    print(f"probe router: {asyncio.run(per_call_us(router, req, a.calls)):.1f} us per decision")


if __name__ == "__main__":
    main()
