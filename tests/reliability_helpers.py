"""The reliability suite's tools: a hostile drop-folder corpus, an audit of the outcome, a TCP proxy.

The corpus mixes good cells with every kind of entry a lab share produces: broken and empty files,
text and random bytes under image names, names that are not UTF-8 or hold a newline, a leading dash
or Unicode, names near NAME_MAX and paths longer than the database column, symlinks and hard links
to files outside the drop folder, a link-then-unlink publisher, unusual pixel formats, bombs, a
DICOM with a NUL byte, a duplicate, an input named like a quarantine note, a file still being
written and a file deleted at once.

`audit` reads the database and the folders after a run and counts what the Reliability table reports:
lost (an entry with no filed row, or a filed path that does not exist), duplicated (more than one
row for one entry, or more than one prediction for one image), stuck (rows left pending/processing);
and it checks that every filed file holds the bytes its row's sha256 names (nothing mislabelled).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from stainbridge.daemon.folders import MARKER
from stainbridge.daemon.intake.failures import storable_source_name
from tests import dicom_factory
from tests.daemon_helpers import bomb_png, cell_bytes, query


@dataclass
class Corpus:
    drop: Path
    outside: Path
    entries: dict[str, str] = field(default_factory=dict)  # source name -> expected: done|failed|duplicate|final
    vanished: set[str] = field(default_factory=set)  # deleted before they could be read: no row required
    outside_digests: dict[str, str] = field(default_factory=dict)
    still_writing: list[SlowWriter] = field(default_factory=list)

    def add(self, relative: bytes | str, data: bytes, expected: str) -> Path:
        raw = relative if isinstance(relative, bytes) else os.fsencode(relative)
        path = Path(os.fsdecode(os.fsencode(self.drop) + b"/" + raw))
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name("." + path.name[:200] + ".part")
        temp.write_bytes(data)
        os.rename(temp, path)  # as a careful publisher does: complete files only
        self.entries[storable_source_name(os.fsdecode(raw))] = expected
        return path

    def finish_writes(self) -> None:
        """Complete the files that were still being written."""
        for writer in self.still_writing:
            writer.finish()
        self.still_writing.clear()


class SlowWriter:
    """A publisher writing one file slowly: a byte every ``interval`` seconds (shorter than the quiet
    time, so the file is never quiet while incomplete) until :meth:`finish` writes the rest."""

    def __init__(self, path: Path, data: bytes, *, head: int = 100, interval: float = 0.1) -> None:
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by finish
        self._handle.write(data[:head])
        self._handle.flush()
        self._rest, self._interval = bytearray(data[head:]), interval
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        while not self._done.wait(self._interval):
            with self._lock:
                if not self._rest:
                    return
                self._handle.write(self._rest[:1])
                self._handle.flush()
                del self._rest[:1]

    def finish(self) -> None:
        self._done.set()
        self._thread.join()
        with self._lock:
            self._handle.write(self._rest)
            self._handle.close()


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _image_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def good_cells(corpus: Corpus, scratch: Path, count: int, *, seed0: int = 1000, per_folder: int = 50) -> None:
    """`count` distinct cells in folders of `per_folder`; the seed range names them (no clash between waves)."""
    for i in range(count):
        corpus.add(f"wave{seed0}-{i // per_folder}/cell-{i}.png", cell_bytes(scratch, seed=seed0 + i), "done")


def hostile_entries(corpus: Corpus, scratch: Path, rng: random.Random) -> None:
    """Every hostile kind the issue lists, each with the outcome it must end in."""
    good = cell_bytes(scratch, seed=1)
    arr = np.random.default_rng(7).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    rgb = Image.fromarray(arr, "RGB")
    corpus.add("hostile/truncated.png", good[: len(good) // 2], "failed")
    corpus.add("hostile/zero.png", b"", "failed")
    corpus.add("hostile/text.png", b"this is not an image\n" * 20, "failed")
    corpus.add("hostile/random.dcm", rng.randbytes(3000), "failed")
    corpus.add(b"hostile/\xc9chantillon.png", cell_bytes(scratch, seed=2), "done")
    corpus.add("hostile/new\nline.png", cell_bytes(scratch, seed=3), "done")
    corpus.add("hostile/-leading-dash.png", cell_bytes(scratch, seed=4), "done")
    corpus.add("hostile/célula-细胞-🩸.png", cell_bytes(scratch, seed=5), "done")
    corpus.add("hostile/" + "n" * 240 + ".png", cell_bytes(scratch, seed=6), "done")
    corpus.add("/".join(["d" * 200, "e" * 200, "f" * 150, "deep.png"]), cell_bytes(scratch, seed=8), "done")
    corpus.add("hostile/cmyk.jpg", _image_bytes(rgb.convert("CMYK"), "JPEG"), "done")
    corpus.add("hostile/gray16.png", _image_bytes(Image.fromarray(arr[..., 0].astype(np.uint16) * 257), "PNG"),
               "done")
    corpus.add("hostile/palette.png", _image_bytes(rgb.convert("P"), "PNG"), "done")
    frames = [rgb, rgb.rotate(90)]
    corpus.add("hostile/multi.tif", _image_bytes(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "failed")
    corpus.add("hostile/bomb.png", bomb_png(), "failed")
    corpus.add("hostile/duplicate-of-cell.png", good, "final")  # first of two copies: one done, one duplicate
    corpus.add("hostile/cell-copy.png", good, "final")
    corpus.add("hostile/note.png.error.txt", b"reason: not a real note\n", "failed")
    # DICOM: a deflate bomb and a NUL byte in InstitutionName
    bomb = scratch / "deflate.dcm"
    dicom_factory.write_rgb(bomb, np.zeros((8, 8, 3), dtype=np.uint8))
    ds = dcmread(bomb)
    ds.Rows = ds.Columns = 4000
    ds.PixelData = bytes(4000 * 4000 * 3)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(bomb, enforce_file_format=True)
    corpus.add("hostile/deflate-bomb.dcm", bomb.read_bytes(), "failed")
    nul = scratch / "nul.dcm"
    dicom_factory.write_rgb(nul)
    ds = dcmread(nul)
    ds.InstitutionName = "Lab\x00Two"
    ds.save_as(nul, enforce_file_format=True)
    corpus.add("hostile/nul-institution.dcm", nul.read_bytes(), "done")
    # links to files outside the drop folder: refused, and the targets are never touched
    corpus.outside.mkdir(parents=True, exist_ok=True)
    secret = corpus.outside / "stainbridge.db.stand-in"
    secret.write_bytes(b"outside: must never be moved or read\n" * 10)
    linked = corpus.outside / "linked.png"
    linked.write_bytes(cell_bytes(scratch, seed=9))
    (corpus.drop / "hostile").mkdir(parents=True, exist_ok=True)
    os.symlink(secret, corpus.drop / "hostile" / "symlink-out.png")
    corpus.entries["hostile/symlink-out.png"] = "failed"
    os.link(linked, corpus.drop / "hostile" / "hardlink-out.png")
    corpus.entries["hostile/hardlink-out.png"] = "failed"
    corpus.outside_digests = digest_tree(corpus.outside)
    # a publisher that hard-links the file in, then unlinks its own name: a plain file by the time it is quiet
    published = scratch / "publish" / "relinked.png"
    published.parent.mkdir(parents=True, exist_ok=True)
    published.write_bytes(cell_bytes(scratch, seed=12))
    os.link(published, corpus.drop / "hostile" / "relinked.png")
    time.sleep(0.1)  # shorter than the quiet time: a watcher that judged the link count at once refused it
    published.unlink()
    corpus.entries["hostile/relinked.png"] = "done"
    # a file still being written (completed later) and a file deleted right after it appeared
    corpus.still_writing.append(SlowWriter(corpus.drop / "hostile" / "slow-writer.png", cell_bytes(scratch, seed=10)))
    corpus.entries["hostile/slow-writer.png"] = "done"
    gone = corpus.drop / "hostile" / "deleted.png"
    gone.write_bytes(cell_bytes(scratch, seed=11))
    gone.unlink()
    corpus.vanished.add("hostile/deleted.png")


@dataclass
class Audit:
    entries: int
    lost: list[str]
    duplicated: list[str]
    stuck: int
    wrong_outcome: list[str]
    left_in_drop: list[str]
    outside_changed: bool
    mislabelled: list[str] = field(default_factory=list)  # a filed file whose bytes are not its row's sha256

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck or self.wrong_outcome or self.left_in_drop
                    or self.outside_changed or self.mislabelled)


def _mislabelled(rows: list[tuple], moved: dict[str, str]) -> list[str]:
    """Filed rows with a sha256 whose file does not hold those bytes."""
    out = []
    for _id, name, status, archive_path, sha256 in rows:
        if sha256 is None or not archive_path or status not in ("done", "failed", "duplicate"):
            continue
        path = Path(_seen_from_here(archive_path, moved))
        if path.is_symlink() or not path.is_file():
            continue  # counted as lost
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            out.append(f"{name}: {archive_path} does not hold {sha256[:12]}")
    return out


def _seen_from_here(path: str, moved: dict[str, str]) -> str:
    """`path` as this process sees it: a service with its own mounts (`moved`: its folder -> ours)."""
    for theirs, ours in moved.items():
        if path.startswith(theirs + "/"):
            return ours + path[len(theirs):]
    return path


def audit(url: str, corpus: Corpus, moved: dict[str, str] | None = None) -> Audit:
    """The outcome of a run (see the module's doc); `moved` maps a folder as the service saw it to ours."""
    moved = moved or {}
    rows = query(url, "SELECT id, source_name, status, archive_path, sha256 FROM images ORDER BY id")
    by_source: dict[str, list[tuple]] = {}
    for row in rows:
        by_source.setdefault(row[1], []).append(row)
    per_image = dict(query(url, "SELECT image_id, count(*) FROM predictions GROUP BY image_id"))
    lost, duplicated, wrong = [], [], []
    for name, expected in corpus.entries.items():
        found = by_source.get(name, [])
        if len(found) > 1:
            duplicated.append(name)
        filed = [r for r in found if r[2] in ("done", "failed", "duplicate") and r[3]
                 and os.path.lexists(_seen_from_here(r[3], moved))]
        if not filed:
            lost.append(name)
            continue
        status = filed[-1][2]
        if expected != "final" and status != expected:
            wrong.append(f"{name}: {status}, expected {expected}")
    for image_id, n in per_image.items():
        if n > 1:
            duplicated.append(f"image {image_id}: {n} predictions")
    done_without = [r for r in rows if r[2] == "done" and per_image.get(r[0], 0) != 1]
    wrong += [f"{r[1]}: done without exactly one prediction" for r in done_without]
    strays = set(by_source) - set(corpus.entries) - corpus.vanished
    duplicated += [f"unexpected row: {name}" for name in sorted(strays)]
    stuck = sum(1 for r in rows if r[2] in ("pending", "processing"))
    left = sorted(str(p.relative_to(corpus.drop)) for p in corpus.drop.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MARKER)
    return Audit(len(corpus.entries), lost, duplicated, stuck, wrong, left,
                 digest_tree(corpus.outside) != corpus.outside_digests, _mislabelled(rows, moved))


class TcpProxy:
    """A loopback TCP proxy to a database server that a test can cut (outage) and restore."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        """The server is gone: refuse new connections and reset the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread, frees the port
            except OSError:
                pass
            listener.close()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


TABLE_BEGIN = "<!-- reliability-table: rows written by tests/test_reliability.py and tests/test_burst.py -->"
TABLE_END = "<!-- reliability-table end -->"


def report_row(scenario: str, repetitions: str, files: int, lost: int, duplicated: int, stuck: int,
               seconds: float) -> str:
    """Print one row of the Reliability table; with $STAINBRIDGE_TEST_RELIABILITY_REPORT=FILE, write it there too.

    A FILE holding the table between TABLE_BEGIN and TABLE_END (docs/reliability.md) gets the row of the same
    scenario replaced (or the row added): the suite regenerates the table it is documented by. Any other FILE
    gets the row appended."""
    row = f"| {scenario} | {repetitions} | {files} | {lost} | {duplicated} | {stuck} | {seconds:.0f} s |"
    print(f"\nreliability: {row}", flush=True)
    target = os.environ.get("STAINBRIDGE_TEST_RELIABILITY_REPORT")
    if target:
        update_table(Path(target), scenario, row)
    return row


def update_table(path: Path, scenario: str, row: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        with path.open("a", encoding="utf-8") as out:
            out.write(row + "\n")
        return
    head, rest = text.split(TABLE_BEGIN, 1)
    table, tail = rest.split(TABLE_END, 1)
    lines = [line for line in table.strip().splitlines() if line.strip()]
    key = f"| {scenario.split(' (')[0]}"  # a scenario's measured details (memory) may differ between runs
    at = next((i for i, line in enumerate(lines) if line.startswith((key + " |", key + " ("))), None)
    if at is None:
        lines.append(row)
    else:
        lines[at] = row
    path.write_text(f"{head}{TABLE_BEGIN}\n" + "\n".join(lines) + f"\n{TABLE_END}{tail}", encoding="utf-8")


def own_mounts_available() -> str | None:
    """Why a service cannot get a mount namespace of its own here (None: it can)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare/nsenter (util-linux) are not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        return f"no mount namespace for the service ({probe.stderr.strip()}): run as root (CI does)"
    return None


def with_own_mounts(script: str, exe: str) -> tuple[str, ...]:
    """A launcher that runs `exe` in a mount namespace of its own after `script` (sh; the paths come in the
    environment): what the service sees can be changed (nsenter) while the test's view stays as it was."""
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", f'{script} && exec "$@"', "sh", exe)


def in_mounts_of(pid: int, *command: str) -> None:
    """Run `command` (mount, umount) in the mount namespace of process `pid`."""
    import subprocess

    subprocess.run(["nsenter", "-t", str(pid), "-m", *command], check=True, capture_output=True, text=True)
