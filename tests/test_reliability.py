"""Reliability: the real `stainbridge run`, a hostile corpus, kill -9 at random moments, outages, two workers.

Each scenario ends with an audit (tests/reliability_helpers.py): 0 lost, 0 duplicated, 0 stuck,
0 exits the test did not cause, files outside the drop folder untouched. Each prints one row of
the table in docs/reliability.md; with STAINBRIDGE_TEST_RELIABILITY_REPORT=FILE the rows are appended to
FILE as well:

    STAINBRIDGE_TEST_RELIABILITY_REPORT=reliability.md STAINBRIDGE_TEST_POSTGRES_URL=... \
        .venv/bin/python -m pytest -q -s tests/test_reliability.py

The kill moments come from a seeded random generator (seed printed in the row), so a failing
run can be repeated. Bounded: a few hundred files, tiny models on the CPU, polling with deadlines.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from stainbridge.daemon.folders import MARKER
from stainbridge.daemon.intake.claims import MAX_CRASHES
from stainbridge.daemon.schema import upgrade_database
from tests.crashing_service import killer_png
from tests.daemon_helpers import CRASHING_STAINBRIDGE, STAINBRIDGE, Daemon, cell_bytes, query, wait_for, write_config
from tests.reliability_helpers import (
    Audit,
    Corpus,
    TcpProxy,
    audit,
    good_cells,
    hostile_entries,
    in_mounts_of,
    own_mounts_available,
    report_row,
    with_own_mounts,
)

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("STAINBRIDGE_TEST_RELIABILITY_SEED", "20261201"))
WATCH = {"quiet_seconds": 0.4, "rescan_seconds": 1.0, "batch_wait_seconds": 0.1}


@pytest.fixture
def daemons():
    made: list[Daemon] = []
    yield made
    for daemon in made:
        daemon.close()


def new_daemon(made: list[Daemon], config: Path, workdir: Path) -> Daemon:
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(config, workdir)
    made.append(daemon)
    return daemon


def configure(tmp_path: Path, url: str, models, *, service_url: str | None = None) -> Path:
    (tmp_path / "state").mkdir(parents=True, exist_ok=True)
    upgrade_database(url)  # the operator's `stainbridge db upgrade` (or `init`)
    return write_config(tmp_path / "stainbridge.toml", tmp_path, service_url or url, models,
                        models={"batch_size": 8}, watch=WATCH)


def report(scenario: str, repetitions: str, result: Audit, seconds: float) -> None:
    report_row(scenario, repetitions, result.entries, len(result.lost), len(result.duplicated), result.stuck, seconds)


def wait_until_settled(url: str, corpus: Corpus, timeout: float, moved: dict[str, str] | None = None) -> Audit:
    def settled() -> Audit | None:
        result = audit(url, corpus, moved)
        return result if not result.lost and not result.stuck and not result.left_in_drop else None

    try:
        return wait_for(settled, timeout, "every entry recorded and filed", interval=1.0)
    except AssertionError:
        result = audit(url, corpus, moved)
        raise AssertionError(f"not settled: {result}") from None


@pytest.fixture
def own_mounts():
    """The service in a mount namespace of its own (a read-only drop folder, an archive share that goes away)."""
    why = own_mounts_available()
    if why is not None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true: {why}", pytrace=False)
        pytest.skip(why)


def assert_clean(result: Audit, unexpected_exits: int) -> None:
    assert unexpected_exits == 0
    assert result.lost == [] and result.duplicated == [] and result.stuck == 0
    assert result.wrong_outcome == [] and result.left_in_drop == [] and not result.outside_changed
    assert result.mislabelled == []


def claims_of(url: str, pid: int) -> int:
    """Rows a worker (by pid, on this host) holds as `processing`: after its death, what it had in flight."""
    return query(url, "SELECT count(*) FROM images WHERE status = 'processing' AND claimed_by LIKE :owner",
                 owner=f"%:{pid}")[0][0]


def kill_storm(daemon: Daemon, corpus: Corpus, scratch: Path, rng: random.Random, url: str, *, kills: int,
               late_files: int, seed0: int) -> tuple[int, int]:
    """kill -9 at random moments (one SIGTERM among them), more files dropped while down; returns the unexpected
    exits and how many kills hit a worker holding claims (mid-batch: what each kill really tested).

    Every other life is killed without waiting for READY=1: a random moment of start-up (migrations,
    claims released, the start-up scan) or of its first batches; the others a random moment after
    READY=1, in the middle of batches. This also keeps the storm's time bounded by half the starts.
    """
    unexpected = mid_batch = 0
    for k in range(kills + 1):
        if k % 2 == 1:
            daemon.wait_message("READY=1", 300)
            time.sleep(rng.uniform(0.2, 2.5))  # a random moment in the run, not a timed assertion
        else:
            time.sleep(rng.uniform(0.5, 6.0))  # a random moment of start-up or of the first batches
        if daemon.process.poll() is not None:
            unexpected += 1
        elif k == kills // 2 | 1:  # a life that reached READY=1 (before it, SIGTERM's default action applies)
            daemon.signal(signal.SIGTERM)  # graceful: finishes its batch, exits 0
            unexpected += daemon.wait_exit(60) != 0
        else:
            pid = daemon.process.pid
            daemon.signal(signal.SIGKILL)
            daemon.wait_exit(30)
            mid_batch += claims_of(url, pid) > 0
        if k == 0:
            corpus.finish_writes()
        if k == 1:
            good_cells(corpus, scratch, late_files, seed0=seed0, per_folder=40)  # dropped while down
        daemon.start(wait_ready=False)
    daemon.wait_message("READY=1", 300)
    return unexpected, mid_batch


STORMS = [  # backend, entries in the drop folder (hostile ones included), kill -9 count, seed
    pytest.param("sqlite", 300, 10, SEED, id="sqlite"),
    pytest.param("postgres", 144, 5, SEED + 1, marks=pytest.mark.postgres, id="postgres"),  # bounded suite
]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("backend,files,kills,seed", STORMS)
def test_kill9_storm_loses_and_duplicates_nothing(request, daemons, tiny_models, tmp_path, backend, files, kills, seed):
    """The hostile corpus, kill -9 at random moments and one SIGTERM, more files while down: 0 lost, duplicated, stuck."""
    started = time.monotonic()
    rng = random.Random(seed)
    if backend == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = configure(tmp_path, url, tiny_models)
    corpus = Corpus(tmp_path / "drop", tmp_path / "outside")
    scratch = tmp_path / "scratch"
    hostile_entries(corpus, scratch, rng)
    first = (files - len(corpus.entries)) // 2  # half the good cells before the first start, half while down
    good_cells(corpus, scratch, first)
    daemon = new_daemon(daemons, config, tmp_path / "w1").start(wait_ready=False)
    unexpected, mid_batch = kill_storm(daemon, corpus, scratch, rng, url, kills=kills,
                                       late_files=files - len(corpus.entries), seed0=5000)
    result = wait_until_settled(url, corpus, 300)
    unexpected += daemon.process.poll() is not None
    assert daemon.stop() == 0
    name = "SQLite" if backend == "sqlite" else "PostgreSQL"
    report(f"{name}, kill -9 storm + SIGTERM", f"{kills} kill -9 ({mid_batch} mid-batch) + 1 SIGTERM (seed {seed})",
           result, time.monotonic() - started)
    assert_clean(result, unexpected)


@pytest.mark.timeout(900)
@pytest.mark.postgres
def test_database_outage_at_start_and_mid_run_then_everything_finishes(daemons, tiny_models, tmp_path, postgres_url):
    """Server unreachable at start (waits, STATUS=) and cut mid-run (retries, no failed rows): all files finish."""
    started = time.monotonic()
    proxy = TcpProxy(make_url(postgres_url).port or 5432)
    service_url = make_url(postgres_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    config = configure(tmp_path, postgres_url, tiny_models, service_url=service_url)
    corpus = Corpus(tmp_path / "drop", tmp_path / "outside")
    corpus.outside.mkdir(parents=True)
    scratch = tmp_path / "scratch"
    good_cells(corpus, scratch, 40)
    daemon = new_daemon(daemons, config, tmp_path / "w1")
    daemon.start(wait_ready=False)  # the proxy is not listening yet: the server is "down"
    daemon.wait_message("STATUS=waiting for the database", 120)
    proxy.start()
    daemon.wait_message("READY=1", 120)
    wait_for(lambda: (query(postgres_url, "SELECT count(*) FROM images WHERE status = 'done'")[0][0] >= 8), 120,
             "some files done before the outage")
    daemon.receive()
    daemon.messages.clear()  # a retry before the cut must not count as noticing it
    proxy.cut()
    good_cells(corpus, scratch, 20, seed0=7000)  # files keep arriving during the outage
    daemon.wait_message("STATUS=retrying", 120)
    failed_during = query(postgres_url, "SELECT count(*) FROM images WHERE status = 'failed'")[0][0]
    proxy.start()
    result = wait_until_settled(postgres_url, corpus, 240)
    unexpected = int(daemon.process.poll() is not None)
    assert daemon.stop() == 0
    proxy.cut()
    report("PostgreSQL, server down at start and cut mid-run", "2 outages", result, time.monotonic() - started)
    assert failed_during == 0
    assert_clean(result, unexpected)


@pytest.mark.timeout(900)
@pytest.mark.postgres
def test_database_restarted_in_place_mid_batch_repeatedly(daemons, tiny_models, tmp_path, postgres_url):
    """The server restarted under a running service (sessions reset, back within 1.5 s), 5 times: every file finishes."""
    started = time.monotonic()
    rng = random.Random(SEED + 3)
    proxy = TcpProxy(make_url(postgres_url).port or 5432).start()
    service_url = make_url(postgres_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    config = configure(tmp_path, postgres_url, tiny_models, service_url=service_url)
    corpus = Corpus(tmp_path / "drop", tmp_path / "outside")
    corpus.outside.mkdir(parents=True)
    scratch = tmp_path / "scratch"
    daemon = new_daemon(daemons, config, tmp_path / "w1").start(wait_ready=False)
    daemon.wait_message("READY=1", 300)
    restarts, mid_batch = 5, 0
    for k in range(restarts):
        wave = [cell_bytes(scratch, seed=8000 + 100 * k + i) for i in range(40)]  # rendered first, dropped at once
        for i, data in enumerate(wave):
            corpus.add(f"restart{k}/cell-{i}.png", data, "done")
        busy = wait_for(lambda: query(postgres_url, "SELECT count(*) FROM images WHERE status = 'processing'")[0][0]
                        or not any(p.is_file() and p.name != MARKER for p in corpus.drop.rglob("*")), 120,
                        "a batch in progress",
                        interval=0.01)
        mid_batch += busy is not True
        proxy.cut()  # a restart: every session reset, new connections refused
        time.sleep(rng.uniform(0.2, 1.5))
        proxy.start()
        time.sleep(rng.uniform(0.0, 0.5))
    failed = query(postgres_url, "SELECT count(*) FROM images WHERE status = 'failed'")[0][0]
    result = wait_until_settled(postgres_url, corpus, 240)
    unexpected = int(daemon.process.poll() is not None)
    assert daemon.stop() == 0
    proxy.cut()
    report("PostgreSQL, server restarted in place under load", f"{restarts} restarts, {mid_batch} mid-batch "
           f"(seed {SEED + 3})", result, time.monotonic() - started)
    assert mid_batch >= 1 and any("STATUS=retrying" in m for m in daemon.receive())  # the restarts were noticed
    assert failed == 0  # an outage is transient: no file is failed for it
    assert_clean(result, unexpected)


@pytest.mark.timeout(900)
@pytest.mark.postgres
def test_two_workers_share_one_database_and_drop_folder(daemons, tiny_models, tmp_path, postgres_url):
    """Two `stainbridge run` on one database and folder: each entry exactly once; a worker killed mid-batch is taken over."""
    started = time.monotonic()
    rng = random.Random(SEED + 2)
    config = configure(tmp_path, postgres_url, tiny_models)
    corpus = Corpus(tmp_path / "drop", tmp_path / "outside")
    scratch = tmp_path / "scratch"
    one = new_daemon(daemons, config, tmp_path / "w1").start(wait_ready=False)
    two = new_daemon(daemons, config, tmp_path / "w2").start(wait_ready=False)
    one.wait_message("READY=1", 300)
    two.wait_message("READY=1", 300)
    hostile_entries(corpus, scratch, rng)  # dropped once both workers watch the folder
    good_cells(corpus, scratch, 80)
    corpus.finish_writes()
    victim = one.process.pid
    wait_for(lambda: claims_of(postgres_url, victim) > 0, 120, "the victim's batch in progress", interval=0.02)
    one.signal(signal.SIGKILL)  # mid-batch: its claims must be taken over by the other worker
    one.wait_exit(30)
    # What it held when it died (before: any `processing` row would do, maybe the other worker's), as the other
    # worker finds and releases it:
    in_flight = wait_for(lambda: sum(e.get("count", 0) for e in two.events() if e.get("event") == "claims_released"),
                         120, "the other worker to release the victim's claims")
    good_cells(corpus, scratch, 40, seed0=9000)
    result = wait_until_settled(postgres_url, corpus, 300)
    unexpected = int(two.process.poll() is not None)
    assert two.stop() == 0
    report("PostgreSQL, two workers, one killed mid-batch", f"1 kill -9 holding {in_flight} claims", result,
           time.monotonic() - started)
    assert in_flight > 0
    assert_clean(result, unexpected)


@pytest.mark.timeout(900)
def test_a_file_that_kills_the_process_is_quarantined_and_its_batch_goes_on(daemons, tiny_models, tmp_path):
    """A file that kills the service whenever it is decoded (SIGKILL, as the OOM killer or a decoder crash): restarted
    as systemd would, the service dies MAX_CRASHES times, then quarantines it unread with its reason; the files that
    shared its batch are classified."""
    started = time.monotonic()
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = configure(tmp_path, url, tiny_models)
    corpus = Corpus(tmp_path / "drop", tmp_path / "outside")
    corpus.outside.mkdir(parents=True)
    scratch = tmp_path / "scratch"
    good_cells(corpus, scratch, 7)  # one batch (batch_size 8) with the killer, all there at the start-up scan
    corpus.add("wave1000-0/cell-3b-kills.png", killer_png(cell_bytes(scratch, seed=99)), "failed")
    daemon = new_daemon(daemons, config, tmp_path / "w1")
    daemon.launcher = CRASHING_STAINBRIDGE
    daemon.start(wait_ready=False)
    killer = "wave1000-0/cell-3b-kills.png"
    deaths = 0

    def settled() -> bool:
        rows = query(url, "SELECT status FROM images WHERE source_name = :name", name=killer)
        return bool(rows) and rows[0][0] == "failed"

    while True:
        wait_for(lambda: daemon.process.poll() is not None or settled(), 300, "a death or the killer quarantined")
        if daemon.process.poll() is None:
            break
        assert daemon.process.returncode == -signal.SIGKILL, daemon.log_text()[-3000:]
        deaths += 1
        assert deaths <= MAX_CRASHES, "restarted more often than MAX_CRASHES deaths"
        if deaths == 1:  # the whole batch was in flight (each will count one crash and be taken in alone)
            assert query(url, "SELECT status, count(*) FROM images GROUP BY status") == [("processing", 8)]
        daemon.start(wait_ready=False)  # what Restart=on-failure does
    result = wait_until_settled(url, corpus, 120)
    _, error, crashes, filed = query(url, "SELECT status, error, crashes, archive_path FROM images "
                                          "WHERE source_name = :name", name=killer)[0]
    unexpected = int(daemon.process.poll() is not None)
    assert daemon.stop() == 0
    report("SQLite, a file that kills the service (SIGKILL while decoding)",
           f"{deaths} deaths, then quarantined", result, time.monotonic() - started)
    assert deaths == MAX_CRASHES and crashes == MAX_CRASHES
    assert error.startswith("crashed: the service died 3 times") and "quarantine" in filed
    assert "crashed" in Path(filed + ".error.txt").read_text()
    assert query(url, "SELECT count(*) FROM images WHERE status = 'done' AND crashes = 0")[0][0] == 7
    assert_clean(result, unexpected)


def _filing_failures(daemon: Daemon) -> int:
    return sum(1 for e in daemon.events() if e.get("event") == "filing_failed")


@pytest.mark.timeout(900)
def test_a_read_only_drop_folder_is_reported_and_backed_off_then_recovers(daemons, tiny_models, tmp_path, own_mounts):
    """A drop folder the service cannot write to: refused at start with the reason; turned read-only while the
    service runs, files are classified but cannot be moved, STATUS= says why and the retries back off (not a round
    every rescan), nothing is lost or duplicated; writable again, every file is filed (before: the same files
    claimed and failed to move every rescan, with the watchdog happy)."""
    started = time.monotonic()
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = configure(tmp_path, url, tiny_models)
    corpus = Corpus(tmp_path / "drop", tmp_path / "outside")
    corpus.outside.mkdir(parents=True)
    daemon = new_daemon(daemons, config, tmp_path / "w1")
    daemon.launcher = with_own_mounts('mount --bind "$DROP" "$DROP" && '
                                      '{ [ -z "$READ_ONLY" ] || mount -o remount,ro,bind "$DROP"; }', str(STAINBRIDGE))
    daemon.extra_env.update(DROP=str(corpus.drop), READ_ONLY="1")
    daemon.start(wait_ready=False)
    assert daemon.wait_exit(120) == 1
    assert "the drop folder" in daemon.log_text() and "cannot be written to (Read-only file system)" in daemon.log_text()
    daemon.extra_env["READ_ONLY"] = ""
    daemon.start()
    in_mounts_of(daemon.process.pid, "mount", "-o", "remount,ro,bind", str(corpus.drop))  # read-only under it
    good_cells(corpus, tmp_path / "scratch", 12)
    status = daemon.wait_message("STATUS=retrying", 120)
    assert "filing: " in status and "Read-only file system" in status
    time.sleep(12)  # a dozen rescans (rescan_seconds = 1)
    delays = [e["retry_in_s"] for e in daemon.events() if e.get("event") == "transient_failure"]
    rounds = len(delays)
    assert delays and max(delays) >= 4  # backed off (1, 2, 4... s), not a round at every rescan
    assert query(url, "SELECT count(*) FROM images WHERE status = 'done' AND archive_path IS NULL")[0][0] == 12
    in_mounts_of(daemon.process.pid, "mount", "-o", "remount,rw,bind", str(corpus.drop))  # the share fixed
    result = wait_until_settled(url, corpus, 180)
    unexpected = int(daemon.process.poll() is not None)
    assert daemon.stop() == 0
    report("SQLite, the drop folder read-only (at start, then while running), then writable again",
           f"refused at start; {_filing_failures(daemon)} failed moves in {rounds} backed-off rounds", result,
           time.monotonic() - started)
    assert_clean(result, unexpected)


@pytest.mark.timeout(900)
def test_an_archive_share_unmounted_mid_run_is_never_recreated_on_the_disk_below(daemons, tiny_models, tmp_path,
                                                                               own_mounts):
    """The archive is a share mounted on an empty folder; unmounted while the service runs: it files nothing onto
    the folder below (no marker there), says why, keeps the files in the drop folder; mounted again, it files them
    all into the share (before: re-created on the root disk and hidden once the share came back)."""
    started = time.monotonic()
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = configure(tmp_path, url, tiny_models)
    archive, share = tmp_path / "archive", tmp_path / "share"
    share.mkdir()
    (archive / MARKER).rename(share / MARKER)  # `stainbridge init` ran with the share mounted: its marker is there
    corpus = Corpus(tmp_path / "drop", tmp_path / "outside")
    corpus.outside.mkdir(parents=True)
    scratch = tmp_path / "scratch"
    daemon = new_daemon(daemons, config, tmp_path / "w1")
    daemon.launcher = with_own_mounts('mount --bind "$SHARE" "$ARCHIVE"', str(STAINBRIDGE))
    daemon.extra_env.update(SHARE=str(share), ARCHIVE=str(archive))
    daemon.start()
    good_cells(corpus, scratch, 10)
    moved = {str(archive): str(share)}
    wait_until_settled(url, corpus, 120, moved)
    in_mounts_of(daemon.process.pid, "umount", str(archive))  # the share goes away under the running service
    good_cells(corpus, scratch, 10, seed0=3000)
    status = daemon.wait_message("STATUS=retrying", 120)
    assert "filing: the archive folder" in status and "not the one `stainbridge init` prepared" in status
    wait_for(lambda: query(url, "SELECT count(*) FROM images WHERE status = 'done'")[0][0] == 20, 120,
             "the second wave classified")
    assert list(archive.iterdir()) == []  # nothing written below the mount point
    in_mounts_of(daemon.process.pid, "mount", "--bind", str(share), str(archive))  # mounted again
    result = wait_until_settled(url, corpus, 180, moved)
    unexpected = int(daemon.process.poll() is not None)
    assert daemon.stop() == 0
    report("SQLite, the archive share unmounted mid-run, then mounted again",
           f"1 unmount, {_filing_failures(daemon)} failed moves", result, time.monotonic() - started)
    assert list(archive.iterdir()) == [] and len(list(share.rglob("cell-*.png"))) == 20
    assert_clean(result, unexpected)


@pytest.mark.timeout(900)
def test_files_rewritten_in_place_while_processed_are_never_mislabelled(daemons, tiny_models, tmp_path):
    """`cp` over names the service is processing (same inode, new bytes), again and again: every filed file holds
    the bytes its row's sha256 names, the last version of every name is classified, nothing is stuck or left."""
    started = time.monotonic()
    rng = random.Random(SEED + 5)
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = configure(tmp_path, url, tiny_models)
    drop, scratch = tmp_path / "drop", tmp_path / "scratch"
    daemon = new_daemon(daemons, config, tmp_path / "w1").start()
    versions: dict[str, list[bytes]] = {}
    seeds = iter(range(20_000, 30_000))
    for i in range(40):
        data = cell_bytes(scratch, seed=next(seeds))
        (drop / f".cell-{i}.png.part").write_bytes(data)
        os.rename(drop / f".cell-{i}.png.part", drop / f"cell-{i}.png")
        versions[f"cell-{i}.png"] = [data]
    rewrites, mid_processing = 0, 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and rewrites < 60:
        busy = [r[0] for r in query(url, "SELECT source_name FROM images WHERE status = 'processing'")]
        name = rng.choice(busy) if busy else rng.choice(sorted(versions))
        data = cell_bytes(scratch, seed=next(seeds))
        with open(drop / name, "wb") as handle:  # what cp does to an existing name: truncate, write, same inode
            handle.write(data)
        versions[name].append(data)
        rewrites += 1
        mid_processing += bool(busy)
        time.sleep(rng.uniform(0.0, 0.15))
    wait_for(lambda: not [p for p in drop.iterdir() if not p.name.startswith(".")] and not query(
        url, "SELECT id FROM images WHERE status IN ('pending', 'processing') OR archive_path IS NULL"), 180,
        "every version filed")
    rows = query(url, "SELECT source_name, status, archive_path, sha256 FROM images")
    unexpected = int(daemon.process.poll() is not None)
    assert daemon.stop() == 0
    mislabelled = [r for r in rows if hashlib.sha256(Path(r[2]).read_bytes()).hexdigest() != r[3]]
    finals = {name: hashlib.sha256(v[-1]).hexdigest() for name, v in versions.items()}
    lost = [name for name, sha in finals.items() if not any(r[0] == name and r[3] == sha for r in rows)]
    known = {hashlib.sha256(d).hexdigest() for v in versions.values() for d in v}
    strays = [r for r in rows if r[3] not in known]  # a row for bytes that were never a whole version
    duplicated = len(rows) - len({(r[0], r[3]) for r in rows})
    report_row("SQLite, files rewritten in place while processed", f"{rewrites} rewrites, {mid_processing} of a "
               f"file in flight (seed {SEED + 5})", len(rows), len(lost), duplicated, 0, time.monotonic() - started)
    assert mid_processing >= 1 and unexpected == 0
    assert mislabelled == [] and lost == [] and strays == [] and duplicated == 0
