"""The errors a user can fix, printed as one line by the entry points (no traceback)."""

from __future__ import annotations

from dblocks.config import ConfigError
from worker.shards import ShardError
from worker.state import StateError
from worker.storage import StorageError

from .launch import LaunchError
from .run import RunFailed
from .sampler import BlockSetError
from .tracking import TrackingError

USER_ERRORS = (ConfigError, StateError, StorageError, ShardError, LaunchError, TrackingError, BlockSetError, RunFailed)
