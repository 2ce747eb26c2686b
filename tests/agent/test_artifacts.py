"""The agent's artifact store: a size cap and a free-space floor, least recently used first, never what jobs need."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from edgeq.agent import protocol as P
from edgeq.agent.artifacts import RECENT_S, ArtifactStore


def _put(store: ArtifactStore, name: str, size: int, age_s: float = 0.0) -> None:
    with store.reserve(size):
        store.path(name).write_bytes(os.urandom(size))
    then = time.time() - age_s
    os.utime(store.path(name), (then, then))


def test_evicts_least_recently_used_files_no_job_needs(tmp_path):
    needed: set[str] = set()
    store = ArtifactStore(tmp_path / "a", max_bytes=1000, min_free_bytes=0, in_use=lambda: needed)
    _put(store, "old", 400, age_s=3 * RECENT_S)
    _put(store, "older-but-queued", 400, age_s=4 * RECENT_S)
    needed.add("older-but-queued")
    _put(store, "new", 400)  # 1200 > 1000: the oldest file no job names goes
    assert sorted(p.name for p in store.root.iterdir()) == ["new", "older-but-queued"]
    store.touch("older-but-queued")  # a host checked for it: recent now
    needed.clear()
    with pytest.raises(P.ProtocolError, match="artifact store is full: .* held by queued, running or recent jobs") as exc:
        _put(store, "more", 400)  # what is there is all recent: refused, nothing evicted, nothing written
    assert exc.value.status == 507
    assert sorted(p.name for p in store.root.iterdir()) == ["new", "older-but-queued"]


def test_refuses_an_upload_that_would_fill_the_disk(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    store = ArtifactStore(tmp_path / "a", max_bytes=1 << 62, min_free_bytes=free + (1 << 30), in_use=set)
    with pytest.raises(P.ProtocolError, match=r"the board's disk has [\d.]+ MB free: a 0.0 MB upload would leave less") as exc:
        _put(store, "x", 10)
    assert exc.value.status == 507 and list(store.root.iterdir()) == []


def test_uploads_in_flight_count_against_the_cap(tmp_path):
    store = ArtifactStore(tmp_path / "a", max_bytes=1000, min_free_bytes=0, in_use=set)
    with store.reserve(700):
        with pytest.raises(P.ProtocolError, match="artifact store is full"):
            with store.reserve(400):
                pass
    with store.reserve(400):  # the first upload is over: room again
        pass


def test_journal_names_the_files_of_unfinished_jobs(tmp_path):
    from edgeq.agent.journal import Journal

    journal = Journal(tmp_path / "j.sqlite")
    for job, art, extra in (("j1", "a" * 64, "d" * 64), ("j2", "b" * 64, None), ("j3", "c" * 64, None)):
        request = {"artifact": {"name": "m.onnx", "sha256": art},
                   "files": [{"name": "m.onnx.data", "sha256": extra}] if extra else []}
        assert journal.insert(job, "0" * 64, art, request)
    assert journal.start("j2") and journal.start("j3")
    journal.finish("j3", "done", {}, None)
    assert journal.active_artifacts() == {"a" * 64, "d" * 64, "b" * 64}  # queued j1 with its data, running j2
    journal.close()


def test_a_real_agent_refuses_an_upload_past_its_store_cap(agent_factory, tmp_path):
    from edgeq.agent.client import AgentError

    agent = agent_factory(["--max-store-gb", str(300_000 / (1 << 30)), "--min-free-mb", "0"])
    client = agent.client()
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}.bin")
        files[-1].write_bytes(os.urandom(120_000))
    client.upload(files[0])
    client.upload(files[1])
    with pytest.raises(AgentError, match="507: the agent's artifact store is full") as exc:
        client.upload(files[2])  # the first two are recent (a host may be about to submit them)
    assert exc.value.status == 507
    stored = sorted(p.name for p in (agent.data_dir / "artifacts").iterdir())
    assert len(stored) == 2 and not any(name.startswith(".upload") for name in stored)
    assert client.info()["max_store_bytes"] == int(300_000 / (1 << 30) * (1 << 30))
