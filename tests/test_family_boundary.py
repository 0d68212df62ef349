"""A model family is one registered class: what is specific to one variant stays in the family layer.

Wan2.2 (the A14B's two experts switched at `boundary_ratio`, the TI2V-5B's per-token timesteps) lives in the Wan
family's files; export, sample, eval, the samplers, the methods, config, preflight and dispatch reach it only
through the family's hooks. This test keeps it so: no file outside the family layer names those specifics.
"""
from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ds_distill"

FAMILY_LAYER = (
    "models/",  # the families, their shared leaf module (wan_common) and the tiny builders
    "adapters/wan.py",
    "validators/wan.py",
)

WAN22_NAMES = {
    "transformer_2": re.compile(r"transformer_2"),
    "boundary_ratio": re.compile(r"boundary_ratio"),
    "expand_timesteps": re.compile(r"expands?_timesteps"),
    "WanExperts": re.compile(r"WanExperts"),
    "A14B": re.compile(r"a14b", re.IGNORECASE),
    "TI2V": re.compile(r"ti2v", re.IGNORECASE),
    "the expert names high/low": re.compile(
        r"""["'](high|low)\.?["']|\[(high|low)(, (high|low))?\]|`(high|low)\.\*`"""),
}


def outside_family_layer() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    return [f for f in files if not any(f.relative_to(PACKAGE).as_posix().startswith(p) for p in FAMILY_LAYER)]


def test_generic_layers_name_no_wan22_specifics():
    """Every .py of the package outside the family layer: none of WAN22_NAMES (code, comments or docs)."""
    files = outside_family_layer()
    assert len(files) > 30 and PACKAGE / "export.py" in files and PACKAGE / "sample.py" in files
    found = []
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            for what, pattern in WAN22_NAMES.items():
                if pattern.search(line):
                    found.append(f"{f.relative_to(PACKAGE)}:{i}: {what}: {line.strip()}")
    assert not found, "Wan2.2 specifics outside the family layer (move them behind a family hook):\n" + \
        "\n".join(found)


def test_the_patterns_catch_what_they_name():
    """The check can fail: each pattern matches the text it is there for, and not the word in plain prose."""
    samples = {
        "transformer_2": 'EXPERT_FOLDERS = {"low": "transformer_2"}',
        "boundary_ratio": "model_index['boundary_ratio']",
        "expand_timesteps": "expand_timesteps=expands_timesteps(index)",
        "WanExperts": "isinstance(m, WanExperts)",
        "A14B": "a Wan2.2 A14B role",
        "TI2V": "Wan2.2 TI2V-5B",
        "the expert names high/low": "if e not in ('high', 'low')",
    }
    for what, text in samples.items():
        assert WAN22_NAMES[what].search(text), what
    for text in ("experts: [high] or [low]", "named `high.*`", 'name.startswith("low.")'):
        assert WAN22_NAMES["the expert names high/low"].search(text), text
    assert not any(p.search("high noise and low memory") for p in WAN22_NAMES.values())
