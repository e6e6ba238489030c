"""Composing the training config outside ``@hydra.main``: to check it before any process starts (the CLI
before torchrun, the TorchX component before submitting), and to say what is wrong in a few lines.

Building the config runs every group's rules (each schema's ``__post_init__``); :func:`compose_config`
adds the rules that need the world size and device. Hydra's and OmegaConf's errors are turned into one
short message naming the key, with the closest key or option when the name is misspelled.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pipeline.config import GROUP_SCHEMAS, ConfigError, TrainConfig, register_configs, validate
from pipeline.resolvers import register_resolvers

# configs/ (the user's config folder, on the search path) is optional: no warning where it does not exist.
warnings.filterwarnings("ignore", message=r".*path=configs is not available.*", category=UserWarning)
CONFIG_MODULE = "pipeline.conf"
CONF_DIR = Path(__file__).resolve().parent / "conf"
_EXTRA_GROUPS = ("experiment", "tune", "tuned")  # groups without a schema of their own


def task_overrides(overrides: list[str]) -> list[str]:
    """The overrides of the config itself: Hydra's own (``hydra.*``, ``hydra/...``) are the launcher's."""
    return [o for o in overrides if not re.match(r"^[~+]*hydra[./]", o)]


def compose_config(overrides: list[str], world_size: int | None = None, device_type: str = "cpu") -> TrainConfig:
    """The typed config ``overrides`` give, with every rule checked (the world-size and device rules when
    ``world_size`` is given).

    Raises:
        ConfigError: in a few lines, naming the key (and the closest one when it is misspelled).
    """
    register_resolvers()
    register_configs()
    owned = not GlobalHydra.instance().is_initialized()
    try:
        if owned:
            with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
                dict_cfg = _compose(task_overrides(overrides))
        else:
            dict_cfg = _compose(task_overrides(overrides))
        cfg = OmegaConf.to_object(dict_cfg)
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as e:
        raise ConfigError(explain(e)) from None
    if world_size is not None:
        validate(cfg, world_size, device_type)
    return cfg


def _compose(overrides: list[str]):
    """``compose("train", overrides)``; setting a key below a node that is null in the config (``data.synthetic.seed=1``
    where ``data.synthetic`` is null) fails inside OmegaConf with an AssertionError: that becomes a ConfigError
    naming the override."""
    try:
        return compose("train", overrides=overrides)
    except (AssertionError, AttributeError) as e:
        for i, override in enumerate(overrides):
            try:
                compose("train", overrides=overrides[: i + 1])
            except (AssertionError, AttributeError):
                key, _, value = override.lstrip("+~").partition("=")
                if value.lstrip().startswith("{"):
                    node, how = key, " and cannot be given as a dict on the command line"
                else:
                    node, how = key.rsplit(".", 1)[0], ", so its keys cannot be set one by one from the command line"
                raise ConfigError(
                    f"{override}: {node} is null in this config{how}; set {node} in a config file (an "
                    "experiment, or configs/<group>/<name>.yaml) and override its keys after that"
                ) from None
            except Exception:  # noqa: BLE001, S112 - another problem with an earlier override: reported below
                break
        raise ConfigError(f"{type(e).__name__} while composing the config: {e}") from None


def _fields(schema: type, prefix: str) -> list[str]:
    out = []
    for f in dataclasses.fields(schema):
        out.append(f"{prefix}{f.name}")
    return out


def known_keys() -> list[str]:
    """Every config key (``group.field``) and group name."""
    keys = [*GROUP_SCHEMAS, *_EXTRA_GROUPS]
    for group, schema in GROUP_SCHEMAS.items():
        keys += _fields(schema, f"{group}.")
    return keys


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def explain(exc: BaseException) -> str:
    """A short message for a composition error: what is wrong with which key, and the closest correct name."""
    text = str(exc)
    cause = str(exc.__cause__) if exc.__cause__ is not None else ""
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        if "No match in the defaults list" in text or "." not in key:
            return f"unknown config group {key}{_suggest(key, [*GROUP_SCHEMAS, *_EXTRA_GROUPS])}"
        first = cause.splitlines()[0] if cause else text.splitlines()[-1]
        hint = _suggest(key, known_keys())
        return f"unknown key {key}{hint}: {first}; to add a new key write +{key}=..."
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []
        return f"{group}={option}: no such option{_suggest(option, options)}" + (
            f"; options: {', '.join(options)}" if options else ""
        )
    if isinstance(exc, MissingMandatoryValue) or "Missing mandatory value" in text:
        key = re.search(r"full_key: (\S+)", text)
        name = key.group(1) if key else "a key"
        return f"{name} has no value and needs one: set it, e.g. {name}=..."
    detail = cause or text
    key = re.search(r"full_key: (\S+)", detail)
    first = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
    m = re.search(r"Error merging override (\S+)", text)
    where = m.group(1) if m else (key.group(1) if key else "")
    return f"{where}: {first}" if where else first
