"""Load a config: packaged preset or YAML path, then `key=value` overrides, then validation."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from online_stablerep import atomic
from online_stablerep.config.recipes import recipe_levers
from online_stablerep.config.schema import Config
from online_stablerep.config.validate import ConfigError, validate

PRESETS_PACKAGE = "online_stablerep.config.presets"
# Keys that were renamed: the old name fails, naming the new one (no silent alias). "export"
# means only `online-stablerep export` (the encoder for timm); writing shards is shards.*.
RENAMED = {
    "export.shards_dir": "shards.write_dir",
    "export.image_format": "shards.image_format",
    "export.quality": "shards.quality",
    "export.groups_per_shard": "shards.groups_per_shard",
    "export.queue_groups": "shards.queue_groups",
}


def preset_names() -> list[str]:
    """Names of the presets shipped inside the package."""
    files = resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def _preset_text(name_or_path: str) -> tuple[str, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        return path.read_text(), str(path)
    resource = resources.files(PRESETS_PACKAGE) / f"{name_or_path}.yaml"
    if not resource.is_file():
        raise ConfigError(
            f"unknown config {name_or_path!r}: not a file and not a preset "
            f"(presets: {', '.join(preset_names())})"
        )
    return resource.read_text(), f"preset {name_or_path}"


def _refuse_renamed(tree: DictConfig, where: str) -> None:
    """Raise ConfigError for a key of RENAMED that `tree` (a preset or the overrides) sets."""
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(tree.get(section), DictConfig) and key in tree[section]:
            raise ConfigError(f"{old} ({where}) was renamed {new}: write {new}")


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build the validated config.

    Args:
        name_or_path: A preset name (see `preset_names()`), a YAML path, or None for defaults.
        overrides: `key=value` strings with dotted keys, e.g. `train.steps=100`.

    Raises:
        ConfigError: naming the key or file that is wrong, before anything is built.
    """
    base = OmegaConf.structured(Config)
    try:
        text, where = _preset_text(name_or_path) if name_or_path else ("{}", "")
        preset = OmegaConf.create(text)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        command_line = OmegaConf.from_dotlist(list(overrides or []))
        _refuse_renamed(preset, where)
        _refuse_renamed(command_line, "command line")
        merged = OmegaConf.merge(base, preset, command_line)
        # A recipe's levers sit between the preset and the command line: they replace the
        # preset's generator keys, and explicit overrides replace them.
        try:
            levers = recipe_levers(merged.generator.recipe, merged.generator.model)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if levers:
            merged = OmegaConf.merge(base, preset, OmegaConf.create({"generator": levers}),
                                     command_line)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, as written into the run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, to_yaml(cfg))
