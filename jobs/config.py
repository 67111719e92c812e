"""Pipeline configuration: conf/default.yaml, then an optional REASEQ_CONFIG file, then environment.

Environment overrides use REASEQ__<SECTION>__<KEY> (double underscores), so a scheduler or a
spark-submit can change any setting without editing files. Values are parsed as YAML scalars.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = PROJECT_ROOT / "conf" / "default.yaml"
ENV_PREFIX = "REASEQ__"


def _deep_update(base: dict, other: dict) -> dict:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def load_config(overrides: dict | None = None, env: dict | None = None) -> dict[str, Any]:
    env = os.environ if env is None else env
    cfg = yaml.safe_load(DEFAULT_FILE.read_text())
    extra = env.get("REASEQ_CONFIG")
    if extra:
        path = Path(extra)
        if not path.exists():
            raise FileNotFoundError(f"REASEQ_CONFIG={extra}: no such file")
        _deep_update(cfg, yaml.safe_load(path.read_text()) or {})
    old_scheme = sorted(k for k in env if k.startswith("REASEQ_LLM_"))
    if old_scheme:  # the retired single-underscore scheme: say so rather than ignore it silently
        import logging

        logging.getLogger("reaseq").warning(
            "ignoring %s: LLM settings are REASEQ__LLM__<KEY> (double underscores), e.g. REASEQ__LLM__BACKEND",
            ", ".join(old_scheme))
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        node = cfg
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    if overrides:
        _deep_update(cfg, copy.deepcopy(overrides))
    return cfg


def resolve_path(value: str) -> str:
    """Relative paths are under the project root; URIs (s3a://, file://) pass through."""
    if "://" in value:
        return value
    p = Path(value)
    return str(p if p.is_absolute() else PROJECT_ROOT / p)
