"""The errors a user can fix, printed as one line by the entry points (no traceback)."""

from __future__ import annotations

from dblocks.config import ConfigError
from dblocks.datacard import DataError
from worker.storage import StorageError
from worker.store import StoreError

from .policy import RunFailed
from .sampler import BlockSetError
from .tracking import TrackingError
from .workers import LaunchError

USER_ERRORS = (ConfigError, StoreError, StorageError, DataError, LaunchError, TrackingError, BlockSetError, RunFailed)
