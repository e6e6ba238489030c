"""Credentials out of what a run writes and logs: config.yaml, ``.hydra/``, checkpoints' configs, rank logs,
sweep logs and the tracking server's params.

Three rules, applied to every string:

- a URL's user information (``http://user:password@host``, ``https://token@host``) becomes ``***@``;
- a URL query parameter or ``key=value`` / ``key: value`` pair whose key names a secret (``password``,
  ``token``, ``secret``, ``api_key``, ``access_key``, ``credential``, ``private_key``, ``auth``) gets ``***``
  for its value;
- the value of any environment variable whose name names a secret (``MLFLOW_TRACKING_PASSWORD``,
  ``AWS_SECRET_ACCESS_KEY``, ``WANDB_API_KEY``, ...) becomes ``***`` wherever it appears, so a config value
  taken from the environment (``${oc.env:MLFLOW_TRACKING_TOKEN}``) under any key is hidden too.

In a config (a dict), a key that names a secret has its whole value replaced.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MASK = "***"

_SECRET_WORDS = r"pass(?:word|wd)?|token|secret|api[_-]?key|apikey|access[_-]?key|credentials?|private[_-]?key|auth"
_SECRET_NAME = re.compile(rf"(?:^|[_.\-])(?:{_SECRET_WORDS})(?:$|[_.\-])", re.IGNORECASE)
# scheme://userinfo@ : everything between :// and the @ before the host. Hydra escapes a sweep override's
# colons (http\://user\:pw@host), and JSON doubles those backslashes: escaped forms too.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*\\*://)(?P<userinfo>[^/\s@'\"]+)@")
# key=value (query strings, overrides, command lines) and key: value (YAML, logs); masked when the key names a
# secret (one of its _ . - separated parts is a secret word: num_passes is not, db_password is).
_KEY_VALUE = re.compile(r"(?P<key>[A-Za-z][A-Za-z0-9_.\-]*)(?P<sep>=|:[ \t]+)(?P<value>[^\s?&'\",;}\]]+)")
_NOT_SECRET_VALUES = {MASK, "null", "None", "none", "~"}
_MIN_ENV_SECRET = 4  # shorter environment values are left alone: they would mask ordinary words and numbers


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable name names a credential (``mlflow_tracking_token``)."""
    return bool(_SECRET_NAME.search(str(name)))


def _env_secrets() -> list[str]:
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)  # longest first: one secret inside another is masked whole


def redact_text(text: str) -> str:
    """``text`` with credentials masked (see the module docstring)."""
    if not text:
        return text
    for secret in _env_secrets():
        text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _KEY_VALUE.sub(_mask_value, text)


def _mask_value(m: re.Match) -> str:
    if not is_secret_name(m["key"]) or m["value"] in _NOT_SECRET_VALUES or m["value"].startswith("$"):
        return m[0]
    return f"{m['key']}{m['sep']}{MASK}"


def redact_config(value: Any, key: str = "") -> Any:
    """A copy of a config container (dicts, lists, scalars) with credentials masked; keys naming a secret lose
    their value (``None`` stays ``None``: nothing to hide)."""
    if isinstance(value, dict):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_config(v, key) for v in value]
    if key and is_secret_name(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_files(paths: Iterable[Path]) -> None:
    """Mask credentials in text files in place (Hydra's ``.hydra/*.yaml``, written before the job starts)."""
    for path in paths:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        clean = redact_text(text)
        if clean != text:
            path.write_text(clean)


class RedactingFilter(logging.Filter):
    """A handler filter that masks credentials in every record it passes (pipeline/conf/hydra/job_logging)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
