"""What every `arbitrage` command module shares: the user-error types, the one-line failure,
config loading with CLI overrides, the model check, and bringing up Ray or in-process models.

`cluster.cli` (the app) and the command modules (`serve_cli`, `router_cli`, `research_cli`,
`config_cli`) import from here, so none of them imports the app back.
"""

import time
from contextlib import contextmanager
from typing import Iterator

import typer

from cluster import console

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def fail(msg: str) -> None:
    """Print one line and exit with code 2."""
    console.error_line(console.specific_line(msg))
    raise typer.Exit(code=2)


def load_cli_config(config: str, **overrides):
    """Load a config with CLI overrides; None values are not overrides.

    A path that is a folder, cannot be read or is not UTF-8 text is a ConfigError naming it.
    """
    from configs import load_config
    from configs.schema import ConfigError, resolve_preset

    p = resolve_preset(config)
    if p.is_dir():
        raise ConfigError(f"config {config}: is a folder, not a YAML file")
    try:
        p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config {p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); a config is a YAML file"
        ) from None
    except OSError as e:
        raise ConfigError(f"config {p}: cannot read it: {e.strerror}") from None
    return load_config(config, **{k: v for k, v in overrides.items() if v is not None})


def check_models(cfg, roles: tuple[str, ...] | None) -> dict[str, str]:
    """`cluster.preflight.check_models`, with a phase line while packaged models are resolved."""
    from cluster.preflight import check_models as check

    console.phase("checking models")
    return check(cfg, roles, local=cfg.runtime.address is None)


@contextmanager
def runtime(cfg, models: dict[str, str]) -> Iterator:
    """Ray (quiet) and the config's actors, with a start-up phase per model."""
    from cluster.runtime import Runtime

    with console.ray_session(cfg):
        for role, what in models.items():
            console.phase(f"loading {role}: {what}")
        t0 = time.perf_counter()
        with Runtime(cfg) as rt:
            console.phase(f"models ready in {time.perf_counter() - t0:.0f}s")
            yield rt


def local_backend(cfg, roles: tuple[str, ...], models: dict[str, str]):
    """In-process models for `roles`, with a start-up phase per model."""
    from arbitrage.backend import LocalBackend

    for role in roles:
        if role in models:
            console.phase(f"loading {role}: {models[role]} (in this process)")
    t0 = time.perf_counter()
    backend = LocalBackend.from_config(cfg, roles=roles)
    console.phase(f"models ready in {time.perf_counter() - t0:.0f}s")
    return backend
