"""Typed configuration: schema, presets, loading and validation."""

from online_stablerep.config.load import load_config, preset_names, save_config, to_yaml
from online_stablerep.config.schema import Config
from online_stablerep.config.validate import ConfigError, parse_guidance, validate

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "parse_guidance",
    "preset_names",
    "save_config",
    "to_yaml",
    "validate",
]
