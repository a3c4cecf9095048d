"""`arbitrage serve`: start the OpenAI-compatible Serve application from a config.

The command only parses arguments and calls `cluster.serve_app.run_openai_app`; bad input
(a malformed config, a port out of range) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

from typing import Optional

import typer


def serve(
    config: str = typer.Option("configs/local.yaml", "--config", "-c", help="YAML config or preset name."),
    host: Optional[str] = typer.Option(None, help="Bind address (default: serve.host, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="HTTP port (default: serve.port)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="ARBITRAGE_API_KEY",
                                          help="Bearer key required on /v1/* (default: serve.api_key)."),
    address: Optional[str] = typer.Option(None, help="Ray address to join (default: start a local Ray)."),
    blocking: bool = typer.Option(True, "--blocking/--no-blocking",
                                  help="Keep serving until Ctrl-C. --no-blocking deploys and returns: use it "
                                       "with --address, since a local Ray ends with this process."),
) -> None:
    """Serve the OpenAI-compatible API (POST /v1/chat/completions, /v1/completions) on Ray Serve."""
    from cluster.cli import USER_ERRORS, fail, load_cli_config

    try:
        cfg = load_cli_config(config, **{"serve.host": host, "serve.port": port, "serve.api_key": api_key,
                                         "runtime.address": address})
        from cluster.serve_app import as_serve_config

        cfg = as_serve_config(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    typer.echo(f"serving {cfg.serve.model_id!r} (config={cfg.name}, policy={cfg.policy.name}, "
               f"tau={cfg.policy.threshold}) at http://{cfg.serve.host}:{cfg.serve.port}/v1", err=True)
    from cluster.serve_app import run_openai_app

    run_openai_app(cfg, blocking=blocking)
