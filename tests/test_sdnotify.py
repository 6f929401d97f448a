"""The sd_notify protocol against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from stainbridge.daemon.service import sdnotify


@pytest.fixture
def listener(tmp_path):
    """A datagram socket bound in tmp_path, like the one systemd passes as $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def test_notify_sends_datagram_to_socket_path(listener):
    """READY=1 arrives as one datagram on the socket named by NOTIFY_SOCKET."""
    path, sock = listener
    assert sdnotify.notify("READY=1\nSTATUS=scanning", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=scanning"


def test_notify_uses_abstract_namespace_for_at_prefix():
    """A NOTIFY_SOCKET starting with '@' names an abstract-namespace socket."""
    name = f"stainbridge-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert sdnotify.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_notify_is_noop_without_socket():
    """Outside systemd (no NOTIFY_SOCKET) notify does nothing and says so."""
    assert sdnotify.notify("READY=1", {}) is False


def test_notify_to_a_vanished_socket_returns_false(tmp_path):
    """A NOTIFY_SOCKET that no longer exists is reported, not raised."""
    assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_watchdog_interval_reads_usec_and_checks_pid():
    """WATCHDOG_USEC gives the interval; a WATCHDOG_PID of another process disables it."""
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}) == 5.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
