"""One engine factory for every path: the same config sizes the KV cache identically on one
process (`load_engine`) and on a tensor-parallel rank (`load_tp_causal_lm` + `wrap_engine`, as
`actors.target_group.TPRankActor.load_model` builds it), and a capped cache warns naming the field."""

import warnings

import pytest

from arbitrage.fast_engine import FastStepEngine
from arbitrage.memory_plan import plan
from arbitrage.models import load_engine, wrap_engine
from arbitrage.sharding import load_tp_causal_lm
from configs.schema import ModelConfig, load_config

CONTEXT = 256


def _cfg(**sizing) -> ModelConfig:
    return ModelConfig(
        source={"kind": "random", "name": "tiny-llama"},
        engine="fast",
        device="cpu",
        dtype="float32",
        max_context=CONTEXT,
        **sizing,
    )


def _both_paths(cfg: ModelConfig) -> tuple[FastStepEngine, FastStepEngine]:
    model, tokenizer = load_tp_causal_lm(cfg, tp_size=1)
    return load_engine(cfg), wrap_engine(cfg, model, tokenizer, tp_size=1)


@pytest.mark.parametrize(
    "sizing,slots",
    [
        ({"max_slots": 4}, 4),  # max_slots alone: the pool is max_slots (no default cut)
        ({"max_slots": 4, "kv_cache_tokens": 0}, 4),  # no reuse: still max_slots
        ({}, 65536 // CONTEXT),  # neither: as many as the default token budget holds
        ({"max_slots": 4, "kv_cache_tokens": 8 * CONTEXT}, 4),  # a bound above the pool cuts nothing
    ],
)
def test_both_engine_paths_size_the_kv_cache_identically(sizing, slots):
    cfg = _cfg(**sizing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cut, no warning
        single, rank = _both_paths(cfg)
    try:
        assert single.lm.n_slots == rank.lm.n_slots == cfg.kv_slots == slots
        assert single.kv_cache_bytes == rank.kv_cache_bytes
        assert single.reuse == rank.reuse == (cfg.kv_cache_tokens != 0)
    finally:
        single.close()
        rank.close()


def test_a_capped_kv_cache_warns_naming_the_field_on_both_paths():
    cfg = _cfg(max_slots=8, kv_cache_tokens=2 * CONTEXT)
    with pytest.warns(UserWarning, match=r"kv_cache_tokens=512 .* max_slots=8 is cut to 2") as seen:
        single, rank = _both_paths(cfg)
    try:
        assert single.lm.n_slots == rank.lm.n_slots == 2
        assert sum("kv_cache_tokens" in str(w.message) for w in seen) >= 2  # each path said so
    finally:
        single.close()
        rank.close()


def test_memory_plan_counts_the_slots_the_engine_allocates():
    """The plan sizes the fast engine's KV by the same rule (a cut included)."""
    cfg = load_config(
        "tiny",
        **{
            "models.draft.device": "cuda",
            "models.draft.engine": "fast",
            "models.draft.max_slots": 8,
            "models.draft.kv_cache_tokens": 2 * CONTEXT,
            "models.draft.max_context": CONTEXT,
            "models.draft.gpu_memory_gib": 2.0,
            "runtime.draft.num_gpus": 1,
        },
    )
    with pytest.warns(UserWarning, match="kv_cache_tokens"):
        rp = plan(cfg, node_types={}).roles[0]
    assert rp.note.startswith("2 slots")
