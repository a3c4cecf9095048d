"""Config files: whichever field is wrong, the one-line error names it -- every one of them.

Walks every leaf field of a full config (the tiny preset, every branch filled in), puts a
value of the wrong type there, and checks that the ConfigError names that field's dotted
path; and a file with several wrong fields names all of them on one line.
"""

from __future__ import annotations

import copy

import pytest

from configs import ConfigError, load_config
from configs.schema import _validate

MAPPING_FIELDS = ("resources", "label_selector")  # dict-valued leaves


def _leaves(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in MAPPING_FIELDS:
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,)


FULL = load_config("tiny").model_dump()
LEAVES = [".".join(p) for p in _leaves(FULL)]


def _with(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return data


def test_every_field_is_walked():
    assert len(LEAVES) > 100 and "runtime.retry.attempts" in LEAVES and "serve.api_key" in LEAVES


@pytest.mark.parametrize("field", LEAVES)
def test_a_wrong_value_names_its_field(field):
    with pytest.raises(ConfigError) as e:
        _validate(_with(FULL, field, [[1]]), source="c.yaml")  # a nested list is wrong for every field
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"c.yaml: {field}:"), msg


def test_several_wrong_fields_are_all_named_on_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "models:\n  draft: {source: {kind: random, name: tiny-llama}}\n"
        "  target: {source: {kind: random, name: tiny-llama}, max_context: -3}\n"
        "policy: {name: draft_only, threshold: 7}\n"
        "runtime: {retry: {attempts: 0}, draft: {max_restarts: -2}, bogus: 1}\n"
        "serve: {port: 0}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    for field in (
        "models.target.max_context",
        "policy.threshold",
        "runtime.retry.attempts",
        "runtime.draft.max_restarts",
        "runtime.bogus",
        "serve.port",
    ):
        assert field in msg, (field, msg)
