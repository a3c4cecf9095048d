"""Build the router a `RouterConfig` names (a classifier or a probe), and the in-process probe service.

The factory sits apart from `arbitrage.router` (the router input format, the `Router` ABC and
the classifier) and `arbitrage.probe` (the probe router) so that each of those imports only
what it builds on, and neither imports the other back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from arbitrage.prm import resolve_device_dtype
from arbitrage.router import MODEL_FREE_ROUTERS, ClassifierRouter, Router, RouterRequest
from arbitrage.service import PartialService, method_stats, service_stats


def build_router(cfg) -> Router:
    """Build the router a `RouterConfig` describes.

    Args:
        cfg: `configs.schema.RouterConfig`. classifier: `path` (a trained router folder) or
            `source` (random: a tiny random classifier at a shape of `arbitrage.tiny.SHAPES`
            with the byte tokenizer; local / hub: a checkpoint loaded as a 2-label classifier).
            probe: `path` (a folder written by `arbitrage train-router --kind probe`).
    Returns:
        A `ClassifierRouter`, or an `arbitrage.probe.ProbeRouter` (no model; CPU).
    """
    if cfg.path is not None and not Path(cfg.path).is_dir():
        from arbitrage.offline import ModelNotFoundError

        raise ModelNotFoundError(missing_router_message(cfg.path, cfg.backbone))
    saved = _saved_kind(cfg.path) if cfg.path is not None else None
    if saved is not None and saved != cfg.kind:
        raise ValueError(
            f"router folder {cfg.path} holds a {saved} router but models.router.kind is {cfg.kind!r}; set kind: {saved}"
        )
    if cfg.kind in MODEL_FREE_ROUTERS:
        if cfg.path is None:
            raise ValueError(
                f"router kind {cfg.kind!r} needs `path` (a folder written by "
                f"`arbitrage train-router --kind {cfg.kind}`), not `source`"
            )
        if cfg.kind == "hidden":
            from arbitrage.hidden_router import HiddenRouter

            return HiddenRouter.from_pretrained(cfg.path)
        from arbitrage.probe import ProbeRouter

        return ProbeRouter.from_pretrained(cfg.path)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    if cfg.path is not None:
        return ClassifierRouter.from_pretrained(cfg.path, device=device, max_length=cfg.max_length, dtype=dtype)
    if cfg.source.kind == "random":
        from transformers import AutoModelForSequenceClassification

        from arbitrage.tiny import byte_tokenizer, shape_config

        config = shape_config(cfg.source.name, num_labels=2)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
        return ClassifierRouter(model.to(device), byte_tokenizer(config.vocab_size), cfg.max_length)
    from arbitrage.models import model_location

    return ClassifierRouter.from_pretrained(
        model_location(cfg.source),
        device=device,
        dtype=dtype,
        max_length=cfg.max_length,
        tokenizer=cfg.source.tokenizer,
    )


def missing_router_message(path: str | Path, backbone: str | None = None, config: str | None = None) -> str:
    """One line saying that a router folder is missing and which commands make it."""
    cfg = config or "<config>"
    data = f"data/{Path(path).name}.jsonl"
    bb = f" --backbone {backbone}" if backbone else ""
    return (
        f"router {path} not found: this preset's router is trained, not shipped; make it with "
        f"`arbitrage collect --config {cfg} --split train --out {data}` then "
        f"`arbitrage train-router --data {data} --out {path}{bb}`"
    )


def _saved_kind(path: str | Path) -> str | None:
    """The router kind recorded in a folder's router.json / probe.json, if any."""
    for name in ("router.json", "probe.json"):
        f = Path(path) / name
        if f.exists():
            return json.loads(f.read_text()).get("kind")
    return None


class InProcessRouter(PartialService):
    """A model-free router (kind `probe` or `hidden`) served inside the caller's process: no actor, no RPC.

    It has a router actor's interface (async `predict`, `health`, `stats`), so the runtime
    hands it to each coordinator as the router "handle" and `RayBackend` awaits it like an
    actor. The probe reads only features the draft step already carries, so asking it costs
    microseconds, where a router actor costs a round trip per step. It pickles as its config
    and builds the router on first use, in the process that uses it.
    """

    role = "router"

    def __init__(self, cfg):
        if cfg.kind not in MODEL_FREE_ROUTERS:
            raise ValueError(
                f"only model-free routers ({', '.join(MODEL_FREE_ROUTERS)}) run in-process, not kind {cfg.kind!r}"
            )
        self.cfg = cfg
        self._router: Router | None = None
        self.calls = 0
        self.busy_s = 0.0

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.cfg, self._router, self.calls, self.busy_s = state["cfg"], None, 0, 0.0

    async def predict(self, req: RouterRequest) -> float:
        t0 = time.perf_counter()
        if self._router is None:
            self._router = build_router(self.cfg)
        out = self._router.predict([req])[0]
        self.calls += 1
        self.busy_s += time.perf_counter() - t0
        return out

    def health(self) -> dict:
        return {"role": "router", "ready": True, "in_process": True, "methods": ["predict"]}

    def stats(self) -> dict:
        """This copy's calls (each coordinator holds its own copy)."""
        predict = method_stats({1: self.calls} if self.calls else {}, self.busy_s)
        return service_stats("router", {"predict": predict}, in_process=True)
