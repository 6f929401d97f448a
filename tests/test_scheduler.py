"""The nightly schedule: APScheduler with a controllable clock, restarts, and two workers."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import inspect, select, text

from stainbridge.daemon.config_values import schedule_trigger
from stainbridge.daemon.retraining import nightly as retraining
from stainbridge.daemon.retraining import scheduler
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import ModelKind, RunStatus, TrainingRun, make_engine, make_sessionmaker
from tests.daemon_helpers import wait_for
from tests.retraining_helpers import FakeClock, local


def _engine(settings_factory, url):
    settings = settings_factory(database_url=url, retraining_enabled=True, retraining_schedule="0 2 * * *")
    upgrade_database(settings.database_url)
    return settings, make_engine(settings.database_url)


@pytest.fixture
def engine(settings_factory, sqlite_url):
    settings, engine = _engine(settings_factory, sqlite_url)
    yield settings, engine
    engine.dispose()


@pytest.fixture
def any_engine(settings_factory, database_url):
    """Both backends: a SQLite file (file lock) and PostgreSQL (advisory lock)."""
    settings, engine = _engine(settings_factory, database_url)
    yield settings, engine
    engine.dispose()


def _scheduler(settings, engine, clock, calls):
    return scheduler.RetrainingScheduler(settings, engine, clock=clock, runner=lambda: calls.append(clock()))


def test_the_job_has_its_options_and_a_restart_schedules_it_again(engine, monkeypatch) -> None:
    """Fixed id, max_instances=1, coalesce, an hour's misfire grace; each start schedules the one job in memory."""
    settings, eng = engine
    clock = FakeClock(monkeypatch, local(2026, 12, 1, 1, 30))
    calls: list = []
    for _ in range(2):  # the service started, stopped and started again
        sched = _scheduler(settings, eng, clock, calls)
        sched.start()
        job = sched.scheduler.get_job(scheduler.JOB_ID)
        assert (job.max_instances, job.coalesce, job.misfire_grace_time) == (1, True, 3600)
        assert sched.next_run_time() == local(2026, 12, 1, 2)
        assert [j.id for j in sched.scheduler.get_jobs()] == [scheduler.JOB_ID]
        sched.shutdown()
    assert calls == []


PICKLE_RAN = "pickle-ran"


def _booby_trapped_job(marker) -> bytes:
    """A pickle that, once loaded, writes `marker`: what a crafted `apscheduler_jobs` row ran at start-up."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write({PICKLE_RAN!r})",))

    return pickle.dumps({"version": 1, "id": scheduler.JOB_ID, "func": Payload()})


def test_a_crafted_job_row_in_the_database_is_never_unpickled(database_url, settings_factory, tmp_path,
                                                              monkeypatch) -> None:
    """A pickled row in `apscheduler_jobs` (the table APScheduler's job store unpickled at every start) runs
    nothing: migration 0007 drops the table, and a scheduler started over a re-created one never reads it."""
    from stainbridge.daemon.schema import downgrade_database

    settings, eng = _engine(settings_factory, database_url)
    marker = tmp_path / "pwned"
    create = ("CREATE TABLE apscheduler_jobs (id VARCHAR(191) PRIMARY KEY, next_run_time FLOAT, "
              f"job_state {'BYTEA' if database_url.startswith('postgresql') else 'BLOB'} NOT NULL)")
    insert = text("INSERT INTO apscheduler_jobs (id, next_run_time, job_state) VALUES (:id, 0, :state)")
    downgrade_database(database_url, "0006")
    with eng.begin() as connection:  # a database written by an older version, then tampered with
        connection.execute(text(create))
        connection.execute(insert, {"id": scheduler.JOB_ID, "state": _booby_trapped_job(marker)})
    upgrade_database(database_url)
    with eng.connect() as connection:
        assert "apscheduler_jobs" not in inspect(connection).get_table_names()
    with eng.begin() as connection:  # written again after the upgrade, as an attacker with write access could
        connection.execute(text(create))
        connection.execute(insert, {"id": scheduler.JOB_ID, "state": _booby_trapped_job(marker)})
    clock = FakeClock(monkeypatch, local(2026, 12, 1, 1, 30))
    sched = _scheduler(settings, eng, clock, [])
    sched.start()
    try:
        assert sched.next_run_time() == local(2026, 12, 1, 2)
    finally:
        sched.shutdown()
    assert not marker.exists()
    with eng.connect() as connection:  # nothing read it, nothing wrote it
        assert connection.execute(text("SELECT count(*) FROM apscheduler_jobs")).scalar() == 1


def test_the_clock_reaching_the_schedule_runs_the_job_once(engine, monkeypatch) -> None:
    """At 02:00 the job runs once and the next run moves to the following night."""
    settings, eng = engine
    clock = FakeClock(monkeypatch, local(2026, 12, 1, 1, 59, ))
    calls: list = []
    sched = _scheduler(settings, eng, clock, calls)
    sched.start()
    try:
        clock.advance(minutes=1, seconds=5)
        sched.scheduler.wakeup()
        wait_for(lambda: calls, 30, "the job to run at 02:00")
        wait_for(lambda: sched.next_run_time() == local(2026, 12, 2, 2), 30, "the next run to be tomorrow")
        sched.scheduler.wakeup()
        assert len(calls) == 1
    finally:
        sched.shutdown()


@pytest.mark.parametrize("schedule,now,slot", [
    ("0 2 * * *", local(2026, 12, 1, 1, 30), local(2026, 11, 30, 2)),
    ("* * * * *", local(2026, 12, 1, 1, 30), local(2026, 12, 1, 1, 30)),
    ("*/20 * * * * *", local(2026, 12, 1, 1, 30) + timedelta(seconds=59), local(2026, 12, 1, 1, 30) + timedelta(seconds=40)),
    ("0 2 1 1 *", local(2026, 12, 1, 1, 30), local(2026, 1, 1, 2)),
])
def test_the_latest_slot_is_found_at_once_however_often_the_schedule_fires(schedule, now, slot) -> None:
    """The latest slot at or before now, for a yearly, a nightly, a per-minute and a six-field (seconds) schedule;
    a frequent schedule costs milliseconds (walking every minute of 400 days took 14 s at each start and run)."""
    trigger = schedule_trigger(schedule)
    started = time.perf_counter()
    assert scheduler.latest_slot(trigger, now.astimezone(trigger.timezone)) == slot
    assert time.perf_counter() - started < 1.0


def test_a_service_down_at_two_still_runs_that_nights_job(engine, monkeypatch) -> None:
    """Stopped before 02:00 and started again at 02:30: the missed run is kept and runs (within the hour's grace)."""
    settings, eng = engine
    clock = FakeClock(monkeypatch, local(2026, 12, 1, 1, 50))
    calls: list = []
    first = _scheduler(settings, eng, clock, calls)
    first.start()
    first.shutdown()
    clock.advance(minutes=40)
    second = _scheduler(settings, eng, clock, calls)
    second.start()
    try:
        wait_for(lambda: calls, 30, "the missed 02:00 run after the restart")
        wait_for(lambda: second.next_run_time() == local(2026, 12, 2, 2), 30, "the next run to be tomorrow")
        assert len(calls) == 1
    finally:
        second.shutdown()


def test_two_workers_run_the_job_once(any_engine, monkeypatch) -> None:
    """Two workers firing at the same 02:00 (and one firing late) start one run between them."""
    settings, eng = any_engine
    sessions = make_sessionmaker(eng)
    started = threading.Barrier(2)

    def fake_run(settings, sessions, *, trigger, now, stop):
        with sessions.begin() as session:
            session.add(TrainingRun(kind=ModelKind.standardizer, status=RunStatus.skipped, trigger=trigger,
                                    started_at=now))
        time.sleep(0.5)  # hold the lock while the other worker tries
        return "ran"

    monkeypatch.setattr(retraining, "run_retraining", fake_run)
    at_two = local(2026, 12, 1, 2, 0)
    results: list = []

    def worker() -> None:
        started.wait(10)
        results.append(scheduler.run_scheduled(settings, eng, now=at_two))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    results.append(scheduler.run_scheduled(settings, eng, now=local(2026, 12, 1, 2, 20)))  # a late third wake-up
    assert sorted(map(str, results)) == ["None", "None", "ran"]
    with sessions() as session:
        assert len(session.scalars(select(TrainingRun.id)).all()) == 1
