"""`arbitrage config ...`: look at configs without running anything.

    arbitrage config show --config local                 # the effective config as YAML
    arbitrage config show -c local --set policy.threshold=0.3 --set data.limit=10
    arbitrage config schema                              # JSON schema of every field

`config_app` is a Typer sub-app mounted by `cluster.cli`; a new subcommand is one more
`@config_app.command()` function here (use `config_option()` for the `--config` option and
`load_with_sets()` for `--set` overrides, so every subcommand reads configs the same way).
"""

from __future__ import annotations

import json
from typing import Optional

import typer

config_app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Inspect configs: the effective settings of a preset, and the schema.",
)

SET_HELP = (
    "Override one field, dotted key=YAML value (repeatable), e.g. --set policy.threshold=0.3 --set runtime.num_cpus=4."
)


def config_option():
    return typer.Option(
        "configs/local.yaml",
        "--config",
        "-c",
        help="YAML config file, or a shipped preset name (local, tiny, llama-1b-8b, ...).",
    )


def parse_sets(sets: list[str] | None) -> dict[str, object]:
    """`key=value` strings to dotted overrides; values are parsed as YAML (0.3, true, [a, b], text)."""
    import yaml

    from cluster.console import UserError

    out: dict[str, object] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {key.strip()}: value {value!r} is not valid YAML") from None
    return out


def load_with_sets(config: str, sets: list[str] | None = None):
    """The config a command would run with: the file (or preset) and its `--set` overrides, validated."""
    from cluster.cli_common import load_cli_config

    overrides = parse_sets(sets)
    try:
        return load_cli_config(config, **overrides)
    except KeyError as e:  # a dotted key whose parent does not exist
        from cluster.console import UserError

        raise UserError(f"--set: the config has no section {e.args[0]!r}") from None


@config_app.command("show")
def show(config: str = config_option(), set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Print the effective config (the preset with its defaults filled in and --set applied) as YAML."""
    import yaml

    cfg = load_with_sets(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), nl=False)
    if cfg.runtime.layout == "auto":  # a comment: the output stays YAML a config can load
        typer.echo(f"# runtime.layout auto runs as: {cfg.runtime.placement()}")


@config_app.command("schema")
def schema() -> None:
    """Print the JSON schema of a config (every field, its type, default and description)."""
    from configs.schema import ArbitrageConfig

    typer.echo(json.dumps(ArbitrageConfig.model_json_schema(), indent=2))


from cluster import plan_cli  # noqa: E402,F401  (registers `arbitrage config plan`)
