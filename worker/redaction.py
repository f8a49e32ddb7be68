"""Secrets out of everything a run writes: the password of a URL (``redis://:pw@host``) becomes ``***``.

Every place that writes a URL or a config where a person or a file can read it (console and log
lines, ``last_run``, ``metrics.json``, MLflow params, tags and artifacts, Hydra's saved configs)
passes it through :func:`redact` / :func:`redact_config`; :class:`RedactingFilter` on the log
handlers catches what slips through a message.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

MASK = "***"

# scheme://[user]:password@ -> the password is everything between the first ':' after the scheme's
# '//' and the last '@' before the host (a password may itself hold '@' or ':')
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*:)(?P<secret>[^\s/'\"]*)@")


def redact(text: str) -> str:
    """``text`` (a URL, a message, a file's content) with the password of every URL in it masked:
    ``redis://:pw@host:6379/0`` -> ``redis://:***@host:6379/0``, ``http://user:pw@h`` -> ``http://user:***@h``."""
    return _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)


def redact_config(obj):
    """A config or record (nested dicts, lists, strings) with every URL's password masked; a new object."""
    if isinstance(obj, dict):
        return {k: redact_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_config(v) for v in obj)
    if isinstance(obj, str):
        return redact(obj)
    return obj


def has_secret(text: str) -> bool:
    """Whether ``text`` holds a URL with a password that :func:`redact` would mask."""
    return redact(text) != text


class RedactingFilter(logging.Filter):
    """Masks URL passwords in every record a handler emits (message and arguments, once formatted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_logging() -> None:
    """Put a :class:`RedactingFilter` on every handler of the root logger (after ``basicConfig``)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def redact_files(directory: str | Path, pattern: str = "*.yaml") -> None:
    """Rewrite the files ``pattern`` under ``directory`` with their URL passwords masked (Hydra's
    saved ``config.yaml``, ``overrides.yaml``, ``hydra.yaml``), owner-only (0600)."""
    for path in Path(directory).glob(pattern):
        text = path.read_text()
        if has_secret(text):
            path.write_text(redact(text))
        path.chmod(0o600)
