"""The one exception tree of modelbuild.

::

    ModelbuildError                      exit 1   anything that stops a command
    ├── InputError                       exit 2   the user's input is wrong; fix it and rerun
    │   ├── RecipeError                           recipe file: YAML, schema, cross-field checks
    │   ├── SourceError                           model source: missing, no weights, corrupt, pickle
    │   ├── DataError                             calibration / eval corpora
    │   ├── StorageError                          storage root or reference unusable (scheme, bucket, credentials, names)
    │   └── ClusterError                          the Ray cluster: unreachable, or its nodes differ from the driver
    ├── ToolError                        exit 2   a backend's library is missing or too old
    ├── StageError                       exit 4   a stage failed while running
    ├── GateFailed                       exit 3   a variant missed its quality gate
    ├── IntegrityError                   exit 5   published files or manifests differ from their records
    ├── NeedsHardware                    exit 6   stages need a machine this is not (e.g. a GPU builder)
    └── Interrupted                      exit 130 Ctrl-C; nothing half-written was kept

Every error renders as one line: what went wrong, where, and how to fix it. The CLI maps each
family to its exit code (``exit_code``) and prints a traceback only when MODELBUILD_DEBUG=1.
"""

from __future__ import annotations

import os
import re
from typing import Any

# user:password@ in any URL, and the values of secret-looking environment variables.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@:]*(?::[^/\s@]*)?@")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|(^|_)KEY($|_)|AUTH", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with credentials removed: ``scheme://user:pw@host`` becomes ``scheme://***@host``
    and the value of every environment variable named like a secret (``HF_TOKEN``,
    ``AWS_SECRET_ACCESS_KEY``, ...; values of 8 characters or more) becomes ``***``. Applied to
    every message modelbuild prints and every report it writes."""
    text = _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", text)
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text


class ModelbuildError(Exception):
    """Root of every error modelbuild raises on purpose.

    Args:
        message: what went wrong.
        where: the file, field or stage it concerns (optional).
        fix: what the user can do about it (optional).
    """

    exit_code = 1
    # The run's outcomes up to the failure (an ``executors.scheduler.Report``), attached by the
    # executor that raised it so the run's reports stay truthful; None when no run was under way.
    report: Any = None

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text = f"{text} ({self.fix})"
        # One line, always: multi-line library messages are folded; never a credential.
        return redact(" ".join(text.split()))


class InputError(ModelbuildError):
    exit_code = 2


class RecipeError(InputError):
    """A recipe that cannot be read or does not satisfy the schema."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        line: int | None = None,
        fix: str | None = None,
    ):
        self.file, self.field, self.line = file, field, line
        where = file or "recipe"
        if line is not None:
            where = f"{where}:{line}"
        if field:
            where = f"{where}: {field}"
        super().__init__(message, where=where, fix=fix)


class SourceError(InputError):
    """The model source is missing, empty, corrupt or not allowed."""


class ClusterError(InputError):
    """The Ray cluster cannot take the run: unreachable, a node that cannot see the shared cache,
    or nodes whose installed packages differ from the driver's."""


class DataError(InputError):
    """A calibration or evaluation corpus is missing, too short or misused."""


class StorageError(InputError):
    """The storage root or a reference into it is unusable: unknown scheme, missing bucket,
    refused credentials, unwritable folder, unknown or unsafe model/variant/version names."""


class ToolError(ModelbuildError):
    """A backend's library is not installed or cannot run here."""

    exit_code = 2


class StageError(ModelbuildError):
    """A stage raised while running; its partial output was discarded."""

    exit_code = 4


class GateFailed(ModelbuildError):
    """One or more variants missed their quality gate and were not published.

    Args:
        failures: one ``GateCheck``-like line per failed (variant, metric).
    """

    exit_code = 3

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__("; ".join(failures), fix="not published; loosen the gate or change the variant")


class IntegrityError(ModelbuildError):
    """Files on disk do not match the manifest that describes them."""

    exit_code = 5


class NeedsHardware(ModelbuildError):
    """Everything this machine can build is done, but some stages need other hardware (e.g. a
    TensorRT-LLM engine needs a GPU of its architecture); they were not built.

    Args:
        pending: one line per stage: what it needs and how to build it there.
    """

    exit_code = 6

    def __init__(self, pending: list[str]):
        self.pending = pending
        super().__init__("not built here: " + "; ".join(pending))


class Interrupted(ModelbuildError):
    """The user pressed Ctrl-C; the stage's partial output was discarded."""

    exit_code = 130


class StageSkipped(Exception):
    """A stage has nothing to do (e.g. an engine for a variant that failed its gate).

    Internal: the executor records the stage as skipped with this reason; nothing is cached.
    """


class CacheEntryCorrupt(Exception):
    """A cache entry failed its check; the store deletes it and the stage reruns.

    Internal: never reaches the user as an error, only as a warning.
    """
