"""Configuration: the pydantic schema (`configs.schema`) and the shipped YAML presets."""

from configs.schema import (
    POLICY_NAMES,
    ArbitrageConfig,
    ConfigError,
    load_config,
    resolve_preset,
)

__all__ = ["ArbitrageConfig", "ConfigError", "POLICY_NAMES", "load_config", "resolve_preset"]
