"""Bounded service memory (``MEMORY_LIMIT_MB``): settings, the trim policy, where it runs, what
/metrics and /info report, and the glibc mechanisms it relies on (in subprocesses, so this test
process's allocator is left as it is). No timing is asserted."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
import threading

import pytest

from esci_reranker.serve import load_settings
from esci_reranker.serve import memory as memory_module
from esci_reranker.serve import state as state_module
from esci_reranker.serve.batching import DynamicBatcher
from esci_reranker.serve.memory import (
    MIB,
    MemoryGuard,
    apply_startup_policy,
    container_memory_limit,
    process_rss,
)
from esci_reranker.serve.scoring import Scorer
from esci_reranker.serve.settings import CONTAINER_LIMIT_SHARE, DEFAULT_MEMORY_LIMIT_MB
from tests.serve.helpers import body

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc malloc only")


class FakeRss:
    """An RSS reading a test sets, and a trim that lowers it to ``after_trim`` (the OS's part)."""

    def __init__(self, value: int, after_trim: int | None = None) -> None:
        self.value = value
        self.after_trim = after_trim
        self.trims = 0
        self.threads: list[str] = []

    def __call__(self) -> int:
        return self.value

    def trim(self) -> bool:
        self.trims += 1
        self.threads.append(threading.current_thread().name)
        if self.after_trim is not None:
            self.value = self.after_trim
        return True


def _samples(text: str) -> dict[str, float]:
    """Unlabelled samples of a /metrics page, by name."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


# --- settings ---------------------------------------------------------------------------------


def test_memory_settings_parse_and_name_the_variable(monkeypatch):
    monkeypatch.setenv("MEMORY_LIMIT_MB", "1024")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    settings = load_settings()
    assert settings.memory_limit_mb == 1024
    assert settings.malloc_arena_max == 2
    assert load_settings(memory_limit_mb=None).memory_limit_mb is None
    # Empty = unset, as docker compose passes ${MEMORY_LIMIT_MB:-} when the shell has none.
    monkeypatch.setenv("MEMORY_LIMIT_MB", "")
    monkeypatch.setenv("MALLOC_ARENA_MAX", " ")
    assert load_settings().memory_limit_mb is None
    assert load_settings().malloc_arena_max is None


def test_the_policy_halves_the_cpu_token_budget_unless_it_is_set_or_off():
    import torch

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert load_settings().batch_token_budget(cpu) == 2048  # the policy is on by default
    assert load_settings(memory_limit_mb=1024).batch_token_budget(cpu) == 2048
    assert load_settings(memory_limit_mb=1024).batch_token_budget(gpu) == 16384  # RSS is host memory
    assert load_settings(memory_limit_mb=1024, max_batch_tokens=4096).batch_token_budget(cpu) == 4096
    assert load_settings(memory_limit_mb=0).batch_token_budget(cpu) == 4096


def test_memory_limit_comes_from_the_setting_the_container_or_the_default():
    gib = 1024 * MIB
    assert load_settings().memory_limit(None) == (DEFAULT_MEMORY_LIMIT_MB, "default")
    # 90 % of the container's limit: room for the page cache and the overshoot between checks.
    assert load_settings().memory_limit(2 * gib) == (int(2048 * CONTAINER_LIMIT_SHARE), "container")
    assert load_settings().memory_limit(100 * MIB) == (256, "container")  # never below the model's need
    assert load_settings(memory_limit_mb=768).memory_limit(2 * gib) == (768, "MEMORY_LIMIT_MB")
    assert load_settings(memory_limit_mb=0).memory_limit(2 * gib) == (None, "off")


@pytest.mark.parametrize(
    ("contents", "expected"),
    [("1073741824\n", 1024 * MIB), ("max\n", None), ("9223372036854771712\n", None)],
    ids=["limit", "v2-none", "v1-none"],
)
def test_container_memory_limit_reads_the_cgroup(tmp_path, contents, expected):
    limit = tmp_path / "memory.max"
    limit.write_text(contents)
    assert container_memory_limit((str(tmp_path / "missing"), str(limit))) == expected
    assert container_memory_limit((str(tmp_path / "missing"),)) is None


# --- the policy ---------------------------------------------------------------------------------


def test_guard_trims_only_over_the_limit():
    rss = FakeRss(900 * MIB, after_trim=600 * MIB)
    guard = MemoryGuard(1024 * MIB, rss=rss, trim=rss.trim)
    assert guard.check() is False
    assert rss.trims == 0
    rss.value = 1100 * MIB
    assert guard.check() is True
    assert rss.trims == 1
    assert guard.stats() == {"limit_mb": 1024, "checks": 2, "trims": 1, "trimmed_mb": 500.0}
    assert guard.last_rss == 600 * MIB
    assert guard.check() is False  # back under the limit


def _drive(guard: MemoryGuard, rss: FakeRss, steps: list[tuple[int, bool]]) -> None:
    """Set the RSS to each step's MiB in turn and check whether the guard trims there."""
    for mib, trims in steps:
        rss.value = mib * MIB
        assert guard.check() is trims, f"RSS {mib} MiB: expected trim={trims}"


def test_guard_does_not_retrim_until_memory_grew_past_a_failed_trim():
    # The working set itself is over the limit: a trim frees little; trimming on every forward
    # would only cost time. The next trim waits until the RSS grew by the step.
    rss = FakeRss(1300 * MIB, after_trim=1200 * MIB)
    guard = MemoryGuard(1024 * MIB, rss=rss, trim=rss.trim, retrim_step_bytes=64 * MIB)
    assert guard.check() is True
    rss.after_trim = None
    _drive(guard, rss, [(1200, False), (1250, False), (1263, False), (1264, True)])
    assert rss.trims == 2
    # Once under the limit, the next time over trims at once again.
    _drive(guard, rss, [(1000, False), (1030, True)])
    assert rss.trims == 3


def test_guard_keeps_at_most_the_policy_step_over_a_limit_the_working_set_exceeds():
    # The default step bounds the free memory kept over the limit to about one forward's
    # activations: with the old 64 MiB the RSS sat up to 64 MiB above what was in use.
    assert memory_module.RETRIM_STEP_BYTES == 32 * MIB
    rss = FakeRss(1100 * MIB, after_trim=1000 * MIB)
    guard = MemoryGuard(960 * MIB, rss=rss, trim=rss.trim)
    assert guard.check() is True
    rss.after_trim = None
    _drive(guard, rss, [(1031, False), (1032, True)])
    assert rss.trims == 2


def test_guard_rejects_a_non_positive_limit():
    with pytest.raises(ValueError, match="limit_bytes=0"):
        MemoryGuard(0)


def test_batcher_checks_memory_after_each_forward_once_its_requests_are_answered(tiny_reranker):
    rss = FakeRss(2048 * MIB)
    seen: list[bool] = []
    futures = []

    def check() -> None:
        seen.append(all(f.done() for f in futures))
        guard.check()

    guard = MemoryGuard(1024 * MIB, rss=rss, trim=rss.trim)
    batcher = DynamicBatcher(tiny_reranker, 1.0, 64, after_batch=check)
    try:
        scorer = Scorer(tiny_reranker, batcher=batcher)
        encoded = scorer._encode(["red shoes"] * 12, [f"red running shoe model {i}" for i in range(12)])
        futures.append(batcher.submit(encoded))
        futures[0].result(timeout=120)
    finally:
        batcher.close()
    assert len(seen) >= 2  # a 64-token budget splits the 12 pairs over several forwards
    assert seen[-1] is True  # the last forward's hook ran after the request had its answer
    assert rss.trims >= 1
    assert set(rss.threads) == {"esci-batcher"}  # on the batcher's thread: never beside a forward


def test_direct_path_checks_memory_on_the_model_thread(tiny_reranker):
    rss = FakeRss(2048 * MIB, after_trim=512 * MIB)
    guard = MemoryGuard(1024 * MIB, rss=rss, trim=rss.trim)
    scorer = Scorer(tiny_reranker, memory=guard)
    try:
        result = scorer.score("red shoes", ["red running shoes", "blue hat"])
        assert len(result.predictions) == 2
        scorer._direct_thread().submit(lambda: None).result()  # the check queued behind the forward
    finally:
        scorer.close()
    assert rss.trims == 1
    assert rss.threads == ["esci-model_0"]  # the one thread that runs direct-path forwards
    assert guard.checks == 1


LIMIT_MB = 1024 * 1024  # 1 TiB


def test_service_reports_rss_limit_and_trims(make_client, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(memory_module, "set_arena_max", lambda n: calls.append(n) or True)
    monkeypatch.setattr(memory_module, "cap_freed_memory", lambda n: True)  # this process's malloc stays
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)  # restored after the test
    # A limit no real process reaches: a check that runs before the fake RSS is in place (the
    # start-up warm-up; a whole test run's RSS is over 1 GB) must not trim and count real memory.
    client = make_client(memory_limit_mb=LIMIT_MB, batch_wait_ms=1)
    state = client.app.state.service
    assert calls == [memory_module.POLICY_ARENAS]  # capped at app creation
    rss = FakeRss((LIMIT_MB + 2000) * MIB, after_trim=900 * MIB)
    state.memory.rss, state.memory.trim = rss, rss.trim

    assert client.post("/rerank", json=body(4)).status_code == 200
    service = client.get("/info").json()["service"]
    assert service["max_batch_tokens"] == 2048
    assert state.scorer.batcher.max_batch_tokens == 2048
    info = service["memory"]
    assert info["limit_mb"] == LIMIT_MB
    assert info["malloc_arena_max"] == 2
    assert info["malloc_arena_source"] == "policy"
    assert info["onednn_cache_capacity"] == memory_module.POLICY_ONEDNN_CACHE
    assert info["malloc_trim_threshold_mb"] == memory_module.POLICY_TRIM_THRESHOLD // MIB
    assert info["trims"] >= 1
    assert info["trimmed_mb"] >= LIMIT_MB + 1100.0
    assert info["peak_rss_mb"] > 0
    if GLIBC:
        assert info["rss_mb"] > 0
        assert info["malloc_arenas"] >= 1
        assert info["malloc_heap_mb"] >= info["malloc_free_mb"] >= 0
    samples = _samples(client.get("/metrics").text)
    assert samples["esci_memory_limit_bytes"] == LIMIT_MB * MIB
    assert samples["esci_memory_trims_total"] == info["trims"]
    assert samples["esci_memory_trimmed_bytes_total"] >= (LIMIT_MB + 1100) * MIB
    if GLIBC:
        assert samples["process_resident_memory_bytes"] > 0


def test_the_policy_is_on_by_default(make_client, monkeypatch):
    calls: list[int] = []
    caps: list[int] = []
    monkeypatch.setattr(memory_module, "set_arena_max", lambda n: calls.append(n) or True)
    monkeypatch.setattr(memory_module, "cap_freed_memory", lambda n: caps.append(n) or True)
    monkeypatch.setattr(state_module, "container_memory_limit", lambda: None)  # as on a bare host
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    client = make_client()
    state = client.app.state.service
    assert state.memory is not None
    assert state.memory.limit_bytes == DEFAULT_MEMORY_LIMIT_MB * MIB
    assert calls == [memory_module.POLICY_ARENAS]
    assert caps == [memory_module.POLICY_TRIM_THRESHOLD] == [64 * MIB]  # not keep_freed_memory's 1 GB
    info = client.get("/info").json()["service"]
    assert info["max_batch_tokens"] == 2048
    assert info["memory"]["malloc_trim_threshold_mb"] == 64
    assert (info["memory"]["limit_mb"], info["memory"]["limit_source"]) == (
        DEFAULT_MEMORY_LIMIT_MB,
        "default",
    )
    assert info["memory"]["malloc_arena_source"] == "policy"
    assert info["memory"]["onednn_cache_capacity"] == memory_module.POLICY_ONEDNN_CACHE
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(memory_module.POLICY_ONEDNN_CACHE)


def test_the_default_follows_the_container_limit(make_client, monkeypatch):
    monkeypatch.setattr(state_module, "container_memory_limit", lambda: 2048 * MIB)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    info = make_client().get("/info").json()["service"]["memory"]
    assert (info["limit_mb"], info["limit_source"]) == (int(2048 * CONTAINER_LIMIT_SHARE), "container")


def test_no_policy_with_zero(make_client, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(memory_module, "set_arena_max", lambda n: calls.append(n) or True)
    monkeypatch.setattr(memory_module, "cap_freed_memory", lambda n: calls.append(n) or True)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    client = make_client(memory_limit_mb=0)
    assert client.app.state.service.memory is None
    assert calls == []
    info = client.get("/info").json()["service"]["memory"]
    assert info["limit_mb"] is None
    assert info["limit_source"] == "off"
    assert info["malloc_arena_source"] == "glibc default"
    assert info["onednn_cache_source"] == "oneDNN default"
    assert info["malloc_trim_threshold_mb"] is None
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    assert info["trims"] == 0
    assert _samples(client.get("/metrics").text)["esci_memory_limit_bytes"] == 0


def test_startup_policy_prefers_the_users_settings(monkeypatch):
    calls: list[int] = []
    caps: list[int] = []
    monkeypatch.setattr(memory_module, "set_arena_max", lambda n: calls.append(n) or True)
    monkeypatch.setattr(memory_module, "cap_freed_memory", lambda n: caps.append(n) or True)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    none = apply_startup_policy(None, None)
    assert (none.malloc_arena_source, none.onednn_cache_source) == ("glibc default", "oneDNN default")
    assert none.malloc_trim_threshold is None
    assert caps == []
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    assert apply_startup_policy(1024, 4).malloc_arena_max == 4
    policy = apply_startup_policy(1024, None)
    assert policy.malloc_trim_threshold == memory_module.POLICY_TRIM_THRESHOLD
    assert caps == [memory_module.POLICY_TRIM_THRESHOLD] * 2
    assert policy.malloc_arena_max == memory_module.POLICY_ARENAS
    assert policy.onednn_cache_capacity == memory_module.POLICY_ONEDNN_CACHE
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(memory_module.POLICY_ONEDNN_CACHE)
    assert calls == [4, memory_module.POLICY_ARENAS]
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "300")
    users = apply_startup_policy(1024, None)
    assert (users.onednn_cache_capacity, users.onednn_cache_source) == (
        300,
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
    )
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "300"


# --- the glibc mechanisms, for real (in a fresh interpreter) ------------------------------------


def _run(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter (``sys.argv[1:]`` = ``args``); its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _run_malloc(code: str) -> str:
    """``_run`` with malloc configured as the service does it (``hardware.keep_freed_memory``) and
    ``libc`` loaded, its ``malloc`` and ``free`` typed for pointers."""
    prelude = """
        import ctypes
        from esci_reranker.hardware import keep_freed_memory
        assert keep_freed_memory()
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
    """
    return _run(textwrap.dedent(prelude) + textwrap.dedent(code))


@needs_glibc
def test_process_rss_matches_proc_status():
    with open("/proc/self/status") as file:
        vm_rss = next(int(line.split()[1]) * 1024 for line in file if line.startswith("VmRSS"))
    rss = process_rss()
    assert rss is not None
    assert abs(rss - vm_rss) < 64 * MIB


@needs_glibc
def test_malloc_stats_count_free_memory_and_arenas():
    out = _run_malloc(
        """
        from esci_reranker.serve.memory import malloc_stats
        before = malloc_stats()
        blocks = [libc.malloc(1 << 20) for _ in range(100)]
        held = malloc_stats()
        for b in blocks[:-1]:  # the last one keeps the others from merging into the top and being trimmed
            libc.free(b)
        freed = malloc_stats()
        print(before.arenas, held.heap_bytes - before.heap_bytes, freed.free_bytes - held.free_bytes)
        """
    )
    arenas, grown, free = (int(x) for x in out.split())
    mib = 1024 * 1024
    assert arenas >= 1
    assert grown >= 99 * mib  # 1 MB blocks come from the heap (keep_freed_memory's mmap threshold)
    assert free >= 98 * mib


@needs_glibc
def test_malloc_trim_gives_kept_free_memory_back():
    # As the service's malloc is configured (hardware.keep_freed_memory: no trimming below 1 GB,
    # blocks up to 32 MB from the heap), freed memory stays resident until malloc_trim.
    out = _run_malloc(
        """
        from esci_reranker.serve.memory import malloc_trim, process_rss
        blocks = [libc.malloc(1 << 20) for _ in range(300)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        touched = process_rss()
        for b in blocks:
            libc.free(b)
        kept = process_rss()
        released = malloc_trim()
        print(touched, kept, process_rss(), released)
        """
    )
    touched, kept, trimmed, released = out.split()
    mib = 1024 * 1024
    assert int(kept) > int(touched) - 32 * mib  # freed, but still resident
    assert int(kept) - int(trimmed) > 200 * mib  # handed back by the trim
    assert released == "True"


@needs_glibc
@pytest.mark.parametrize("order", ["policy first", "model first"])
def test_the_policy_gives_freed_memory_at_the_top_of_the_heap_back_at_free(order):
    # keep_freed_memory alone keeps 300 MB freed at the top of the heap (the test above); under the
    # start-up policy its trim threshold is bounded, so free() itself gives it back, whichever of
    # the policy (app creation) and the model load (keep_freed_memory) runs first.
    out = _run(
        """
        import ctypes, sys
        from esci_reranker.hardware import keep_freed_memory
        from esci_reranker.serve.memory import apply_startup_policy, process_rss
        if sys.argv[-1] == "policy first":
            policy = apply_startup_policy(960, None)
            assert keep_freed_memory()
        else:
            assert keep_freed_memory()
            policy = apply_startup_policy(960, None)
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        blocks = [libc.malloc(1 << 20) for _ in range(300)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        touched = process_rss()
        for b in reversed(blocks):  # the last block is at the top: each free grows the top chunk
            libc.free(b)
        print(touched, process_rss(), policy.malloc_trim_threshold)
        """,
        order,
    )
    touched, after_free, threshold = (int(x) for x in out.split())
    assert threshold == memory_module.POLICY_TRIM_THRESHOLD
    assert touched - after_free > 200 * MIB  # given back without a malloc_trim


@needs_glibc
def test_arena_cap_limits_the_arenas_threads_create():
    code = """
        import ctypes, re, sys, tempfile, threading
        from esci_reranker.serve.memory import set_arena_max
        if sys.argv[-1] != "none":
            assert set_arena_max(int(sys.argv[-1]))
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.fopen.restype = ctypes.c_void_p
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        barrier = threading.Barrier(12)
        def work():
            barrier.wait()  # all at once, so they contend and glibc wants more arenas
            for _ in range(200):
                libc.malloc(4096)
        threads = [threading.Thread(target=work) for _ in range(12)]
        for t in threads: t.start()
        for t in threads: t.join()
        path = tempfile.mktemp()
        f = libc.fopen(path.encode(), b"w"); libc.malloc_info(0, f); libc.fclose(f)
        print(len(re.findall(r"<heap nr=", open(path).read())))
    """
    capped, free = int(_run(code, "2")), int(_run(code, "none"))
    assert capped <= 2
    assert free > capped
