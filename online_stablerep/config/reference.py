"""The config reference, docs/config.md, rendered from the schema: every key with its type,
default and meaning (the comment above the field in schema.py), and the packaged presets side by
side. Regenerate it after changing a field or a preset:

    python -m online_stablerep.config.reference > docs/config.md
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from importlib import resources

from online_stablerep.config import schema
from online_stablerep.config.load import PRESETS_PACKAGE, load_config, preset_names

COMMAND = "python -m online_stablerep.config.reference > docs/config.md"

INTRO = """\
# Config reference

Generated from `online_stablerep/config/schema.py` (the comment above each field is its
meaning) and the presets in `online_stablerep/config/presets/`; a test fails when this page is
stale. Regenerate it with `{command}`.

One typed config tree. A run takes a preset (`--config NAME`) or a YAML file (`--config PATH`)
holding any subset of the keys below, then dotted `key=value` overrides on the command line, e.g.
`train.steps=100 generator.recipe=fast`. Keys left out keep their default. Unknown keys, wrong
types and bad values fail before anything is built, naming the key, with exit code 2.
`online-stablerep config show [--config P] [key=value ...]` prints the resolved config as YAML;
every run writes it into `output_dir/config.yaml`.

A generator recipe (`generator.recipe`, see [recipes.md](recipes.md)) sets several `generator.*`
keys at once; keys given explicitly in a preset or an override win over the recipe's.

## Presets

{presets}

The preset columns of the tables below show the value a preset resolves to where it differs from
the default (recipe levers included); an empty cell is the default.

**The paper's hyper-parameters.** `sd15_vitb16` follows the official StableRep command
(google-research/syn-rep-learn, `StableRep/`): ViT-B/16, 43 captions × 6 images per GPU,
`optim.base_lr` 2e-4, weight decay 0.1 on weights (not on biases and norm parameters), warm-up of
0.5 of 15 epochs in steps, drop path 0, downsample p 0.05 to 64 or 128 px before the crop.
`optim.base_lr` is the official `--blr`: the peak learning rate is base_lr × images per step (all
trainer ranks) / 256 / 2, the official rule with its `num_crop / 2` at one crop per image, so
3.225e-3 for 43 × 6 images on 32 ranks; `optim.lr` sets an absolute value instead. With
`model.text_tower` (StableRep++) the image–text term uses its own linear projection of the
backbone features and the logit scale is clamped after each optimizer step, as officially.
Departures are listed in [design-notes.md](design-notes.md).
"""


@dataclass(frozen=True)
class Key:
    """One leaf of the config tree."""

    name: str  # dotted, e.g. "train.steps"
    type: str
    default: object
    doc: str


def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment block (the lines starting with `#` right above it), as one line."""
    lines, _ = inspect.getsourcelines(cls)
    docs, comment = {}, []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
        elif ":" in text and text.split(":")[0].isidentifier() and line.startswith("    "):
            docs[text.split(":")[0]] = " ".join(comment)
            comment = []
        else:
            comment = []
    return docs


def keys(cls: type = schema.Config, prefix: str = "") -> list[Key]:
    """Every leaf key of the tree rooted at `cls`, in schema order, sections after top keys."""
    docs = field_docs(cls)
    leaves, sections = [], []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            sections.extend(keys(type(default), f"{prefix}{f.name}."))
        else:
            leaves.append(Key(f"{prefix}{f.name}", str(f.type), default, docs.get(f.name, "")))
    return leaves + sections


def value_text(value: object) -> str:
    """A value as it is written in YAML and on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return str(value)


def lookup(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def preset_summary(name: str) -> str:
    """A preset's leading comment block (what it is for), as one line."""
    text = (resources.files(PRESETS_PACKAGE) / f"{name}.yaml").read_text()
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    return " ".join(comment)


def render() -> str:
    """The whole of docs/config.md."""
    presets = {name: load_config(name) for name in preset_names()}
    summaries = "\n".join(f"- `{name}`: {preset_summary(name)}" for name in presets)
    out = [INTRO.format(command=COMMAND, presets=summaries)]
    sections: dict[str, list[Key]] = {}
    for key in keys():
        section = key.name.rsplit(".", 1)[0] if "." in key.name else "top level"
        sections.setdefault(section, []).append(key)
    header = ["key", "type", "default", "meaning", *(f"`{name}`" for name in presets)]
    for section, members in sections.items():
        out += [f"## {section}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for key in members:
            cells = [f"`{key.name}`", f"`{_cell(key.type)}`",
                     f"`{_cell(value_text(key.default))}`", _cell(key.doc)]
            for cfg in presets.values():
                value = lookup(cfg, key.name)
                cells.append("" if value == key.default else f"`{_cell(value_text(value))}`")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
