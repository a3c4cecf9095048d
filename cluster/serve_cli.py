"""`arbitrage serve`: start the OpenAI-compatible Serve application from a config.

The command only parses arguments, checks the models (`cluster.preflight`: a missing model
file or a wrong device is one line and exit code 2 before Ray starts) and calls
`cluster.serve_app.run_openai_app` on a quiet Ray (`cluster.console.ray_session`: Serve's
per-request log lines stay in Ray's log folder). Bad input (a malformed config, a port out
of range) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import time
from typing import Optional

import typer


def serve(
    config: str = typer.Option("configs/local.yaml", "--config", "-c", help="YAML config or preset name."),
    host: Optional[str] = typer.Option(None, help="Bind address (default: serve.host, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="HTTP port (default: serve.port)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="ARBITRAGE_API_KEY", help="Bearer key required on /v1/* (default: serve.api_key)."
    ),
    address: Optional[str] = typer.Option(None, help="Ray address to join (default: start a local Ray)."),
    blocking: bool = typer.Option(
        True,
        "--blocking/--no-blocking",
        help="Keep serving until Ctrl-C. --no-blocking deploys and returns: use it "
        "with --address, since a local Ray ends with this process.",
    ),
) -> None:
    """Serve the OpenAI-compatible API (POST /v1/chat/completions, /v1/completions) on Ray Serve."""
    from cluster import console
    from cluster.cli_common import USER_ERRORS, check_models, fail, load_cli_config

    try:
        cfg = load_cli_config(
            config, **{"serve.host": host, "serve.port": port, "serve.api_key": api_key, "runtime.address": address}
        )
        from cluster.serve_app import as_serve_config

        cfg = as_serve_config(cfg)
        models = check_models(cfg, None)  # before Ray and Serve: a missing model is one line, not retries
    except USER_ERRORS as e:
        fail(str(e))
    from cluster.serve_app import run_openai_app

    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    with console.ray_session(cfg):
        for role, what in models.items():
            console.phase(f"loading {role}: {what}")
        console.phase(
            f"starting Serve: {cfg.serve.model_id!r} (config={cfg.name}, policy={cfg.policy.name}, "
            f"tau={cfg.policy.threshold:g})"
        )
        run_openai_app(cfg, blocking=False)
        typer.echo(
            f"serving {cfg.serve.model_id!r} at {url} (POST /v1/chat/completions)"
            + ("; Ctrl-C stops it" if blocking else ""),
            err=True,
        )
        if not blocking:
            return
        try:  # Ctrl-C or `kill` (SystemExit, see cluster.cli) ends it; Ray shuts down on the way out
            while True:
                time.sleep(3600)
        except (KeyboardInterrupt, SystemExit):
            typer.echo("stopped", err=True)
