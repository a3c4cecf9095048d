"""Core fixtures: tiny random-weight engines, PRM and router built from real configs."""

from __future__ import annotations

import pytest
import torch

from arbitrage.backend import LocalBackend
from arbitrage.engine import HFStepEngine
from arbitrage.loop import ChainInput, LoopSettings
from arbitrage.tiny import byte_tokenizer, random_causal_lm


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def draft_engine(tokenizer):
    return HFStepEngine(random_causal_lm("tiny-llama", seed=1), tokenizer)


@pytest.fixture(scope="session")
def target_engine(tokenizer):
    return HFStepEngine(random_causal_lm("tiny-llama-wide", seed=2), tokenizer)


@pytest.fixture(scope="session")
def judge_prm(target_engine):
    from arbitrage.prm import JudgePRM

    return JudgePRM(target_engine.model, target_engine.tokenizer)


@pytest.fixture(scope="session")
def tiny_router():
    from configs.schema import RouterConfig
    from arbitrage.router_factory import build_router

    torch.manual_seed(0)
    return build_router(
        RouterConfig(kind="classifier", source={"kind": "random", "name": "tiny-llama"}, device="cpu", max_length=256)
    )


@pytest.fixture
def make_backend(draft_engine, target_engine, judge_prm, tiny_router):
    def make(**kw):
        parts = dict(draft=draft_engine, target=target_engine, prm=judge_prm, router=tiny_router)
        parts.update(kw)
        return LocalBackend(**parts, max_batch_size=16, max_wait_ms=5)

    return make


@pytest.fixture
def settings():
    return LoopSettings(
        max_step_tokens=8, max_steps=3, max_total_tokens=64, has_prm=True, system_prompt="Reason step by step."
    )


@pytest.fixture
def problems():
    return [ChainInput(id=f"p{i}", problem=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(4)]
