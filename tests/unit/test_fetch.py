"""Tests for cnnkit.data.fetch against a real HTTP server on 127.0.0.1 that speaks Range."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cnnkit.cli import main as cli_main
from cnnkit.data.download import FetchError
from cnnkit.data.fetch import fetch_archive
from cnnkit.data.official_archives import ARCHIVES, ArchiveSpec, ChecksumError, get_archive_spec

ARCHIVE_NAME = "tiny"
FILENAME = "tiny.tar.gz"


def _make_archive() -> bytes:
    """A small real tar.gz, large enough to span several reads and to be cut midway."""
    buffer = io.BytesIO()
    payload = os.urandom(200_000)  # random bytes do not compress, so the archive stays large
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("tiny/data.bin")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


ARCHIVE_BYTES = _make_archive()
ARCHIVE_SHA256 = hashlib.sha256(ARCHIVE_BYTES).hexdigest()
ARCHIVE_MD5 = hashlib.md5(ARCHIVE_BYTES).hexdigest()


@dataclass
class ServerState:
    """What the test server serves and what it saw."""

    body: bytes = ARCHIVE_BYTES
    honour_range: bool = True
    drop_after: int | None = None  # cut the body after this many bytes ...
    drops_left: int = 0  # ... for this many requests
    status: int | None = None  # answer every request with this error status instead
    send_length: bool = True  # send a Content-Length header
    stall_after: int | None = None  # send this many bytes, then wait for `release` ...
    release: threading.Event = field(default_factory=threading.Event)  # ... to end the body
    range_headers: list[str | None] = field(default_factory=list)


class RangeHandler(BaseHTTPRequestHandler):
    """Serves ``state.body`` at any path, honouring ``Range: bytes=N-``."""

    server: ThreadingHTTPServer

    def log_message(self, message_format: str, *args: object) -> None:
        """Keep the test output quiet."""

    def do_GET(self) -> None:  # noqa: N802
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        range_header = self.headers.get("Range")
        state.range_headers.append(range_header)
        if state.status is not None:
            self.send_error(state.status)
            return
        body, total = state.body, len(state.body)
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and state.honour_range:
            start = int(match.group(1))
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if state.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.stall_after is not None:
            self.wfile.write(body[: state.stall_after])
            self.wfile.flush()
            state.release.wait(timeout=10)
            self.close_connection = True
            return
        if state.drops_left > 0 and state.drop_after is not None:
            state.drops_left -= 1
            self.wfile.write(body[: state.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    """A running server; yields its archive URL and its state."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield f"http://{host}:{port}/files/{FILENAME}?download=1", httpd.state  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _spec(
    sha256: str | None = ARCHIVE_SHA256,
    md5: str | None = None,
    url: str = "https://example.invalid/never-used",
    size_bytes: int = len(ARCHIVE_BYTES),
) -> ArchiveSpec:
    return ArchiveSpec(
        name=ARCHIVE_NAME,
        filename=FILENAME,
        url=url,
        sha256=sha256,
        size_bytes=size_bytes,
        description="test archive",
        md5=md5,
    )


@pytest.fixture
def tiny_spec(monkeypatch: pytest.MonkeyPatch) -> ArchiveSpec:
    spec = _spec()
    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, spec)
    return spec


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_download_writes_verified_file_and_no_part(tmp_path, server, tiny_spec, monkeypatch):
    url, state = server
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)  # Progress bars show on terminals only.
    path = fetch_archive(ARCHIVE_NAME, tmp_path / "new", url=url, progress=True)
    assert FILENAME in terminal.getvalue()  # the tqdm bar
    assert path == tmp_path / "new" / FILENAME
    assert _sha256(path) == ARCHIVE_SHA256
    assert sorted(os.listdir(path.parent)) == [FILENAME]
    assert state.range_headers == [None]


def test_dropped_connection_resumes_with_range(tmp_path, server, tiny_spec):
    url, state = server
    state.drop_after, state.drops_left = 70_000, 1
    path = fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert state.range_headers == [None, "bytes=70000-"]
    assert _sha256(path) == ARCHIVE_SHA256
    assert not (tmp_path / f"{FILENAME}.part").exists()


def test_existing_part_file_is_resumed(tmp_path, server, tiny_spec):
    url, state = server
    (tmp_path / f"{FILENAME}.part").write_bytes(ARCHIVE_BYTES[:12_345])
    path = fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert state.range_headers == ["bytes=12345-"]
    assert _sha256(path) == ARCHIVE_SHA256


def test_server_ignoring_range_restarts_from_zero_and_says_so(tmp_path, server, tiny_spec, caplog):
    url, state = server
    state.honour_range = False
    (tmp_path / f"{FILENAME}.part").write_bytes(b"stale bytes from another file")
    with caplog.at_level("WARNING", logger="cnnkit.data.fetch"):
        path = fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert state.range_headers == ["bytes=29-"]
    assert _sha256(path) == ARCHIVE_SHA256
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"the server does not resume downloads: starting {FILENAME} again from the beginning"
    ]


def test_complete_part_file_is_finalised_on_416(tmp_path, server, tiny_spec):
    url, state = server
    (tmp_path / f"{FILENAME}.part").write_bytes(ARCHIVE_BYTES)
    path = fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert state.range_headers == [f"bytes={len(ARCHIVE_BYTES)}-"]
    assert _sha256(path) == ARCHIVE_SHA256


def test_repeated_drops_keep_part_for_a_later_run(tmp_path, server, tiny_spec):
    url, state = server
    state.drop_after, state.drops_left = 10_000, 99
    with pytest.raises(FetchError, match="interrupted") as caught:
        fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert url in str(caught.value) and "--from FILE" in str(caught.value)
    part_path = tmp_path / f"{FILENAME}.part"
    assert part_path.stat().st_size == 30_000
    assert not (tmp_path / FILENAME).exists()

    state.drops_left = 0
    path = fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert state.range_headers[-1] == "bytes=30000-"
    assert _sha256(path) == ARCHIVE_SHA256


def test_download_checksum_mismatch_keeps_the_bytes_for_a_new_sha256(
    tmp_path, server, monkeypatch, caplog
):
    url, state = server
    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, _spec(sha256=None, md5=ARCHIVE_MD5))
    unverified = tmp_path / "data" / f"{FILENAME}.unverified"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as caught:
        fetch_archive(ARCHIVE_NAME, tmp_path / "data", url=url, progress=False, sha256=wrong)
    message = str(caught.value)
    assert FILENAME in message and wrong in message and ARCHIVE_SHA256 in message
    assert f"kept as {unverified}: run again with the right --sha256" in message
    assert "--no-verify" in message
    assert os.listdir(tmp_path / "data") == [unverified.name]  # The folder stays to hold it.
    assert unverified.read_bytes() == ARCHIVE_BYTES

    # Still the wrong SHA-256: the kept file fails again, so it is downloaded again (and kept).
    with caplog.at_level("WARNING"), pytest.raises(ChecksumError):
        fetch_archive(ARCHIVE_NAME, tmp_path / "data", url=url, progress=False, sha256=wrong)
    assert "does not match the checksum either" in caplog.text
    assert state.range_headers == [None, None]
    # The right SHA-256: the kept file is checked and used, with no new request.
    path = fetch_archive(
        ARCHIVE_NAME, tmp_path / "data", url=url, progress=False, sha256=ARCHIVE_SHA256
    )
    assert state.range_headers == [None, None]
    assert _sha256(path) == ARCHIVE_SHA256
    assert os.listdir(tmp_path / "data") == [FILENAME]


def test_a_resumed_download_that_fails_its_checksum_is_deleted(tmp_path, server, monkeypatch):
    url, state = server
    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, _spec(sha256="0" * 64))
    state.drop_after, state.drops_left = 70_000, 1
    with pytest.raises(ChecksumError, match="resumed from an earlier partial download"):
        fetch_archive(ARCHIVE_NAME, tmp_path / "data", url=url, progress=False)
    assert state.range_headers == [None, "bytes=70000-"]
    assert not (tmp_path / "data").exists()


def test_a_resumed_download_failing_a_given_sha256_is_kept(tmp_path, server, monkeypatch):
    url, state = server
    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, _spec(sha256=None, md5=ARCHIVE_MD5))
    state.drop_after, state.drops_left = 70_000, 1
    unverified = tmp_path / "data" / f"{FILENAME}.unverified"
    with pytest.raises(ChecksumError, match="kept as"):
        fetch_archive(ARCHIVE_NAME, tmp_path / "data", url=url, progress=False, sha256="0" * 64)
    assert state.range_headers == [None, "bytes=70000-"]
    assert unverified.read_bytes() == ARCHIVE_BYTES  # The mistyped value costs no download.
    path = fetch_archive(
        ARCHIVE_NAME, tmp_path / "data", url=url, progress=False, sha256=ARCHIVE_SHA256
    )
    assert path.read_bytes() == ARCHIVE_BYTES
    assert state.range_headers == [None, "bytes=70000-"]  # Checked, not downloaded again.
    assert not unverified.exists()


def test_download_without_verify_accepts_any_content(tmp_path, server, monkeypatch):
    url, _ = server
    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, _spec(sha256="0" * 64))
    path = fetch_archive(ARCHIVE_NAME, tmp_path, url=url, verify=False, progress=False)
    assert _sha256(path) == ARCHIVE_SHA256


def test_md5_only_spec_is_verified_with_md5(tmp_path, server, monkeypatch):
    url, _ = server
    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, _spec(sha256=None, md5=ARCHIVE_MD5))
    path = fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert _sha256(path) == ARCHIVE_SHA256

    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, _spec(sha256=None, md5="f" * 32))
    with pytest.raises(ChecksumError, match="expected md5 f{32}, got " + ARCHIVE_MD5):
        fetch_archive(ARCHIVE_NAME, tmp_path / "other", url=url, progress=False)


def test_a_given_sha256_is_checked_instead_of_the_md5(tmp_path, server, monkeypatch, capsys):
    url, _ = server
    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, _spec(sha256=None, md5=ARCHIVE_MD5))
    wrong = (
        f"its sha256 is {ARCHIVE_SHA256}, not the {'0' * 64} given with --sha256; "
        "the file is corrupt, or it is not the one that SHA-256 belongs to"
    )
    with pytest.raises(ChecksumError, match=wrong):
        fetch_archive(ARCHIVE_NAME, tmp_path / "a", url=url, progress=False, sha256="0" * 64)
    assert not (tmp_path / "a" / FILENAME).exists()
    path = fetch_archive(
        ARCHIVE_NAME, tmp_path / "b", url=url, progress=False, sha256=ARCHIVE_SHA256.upper()
    )
    assert _sha256(path) == ARCHIVE_SHA256
    with pytest.raises(ValueError, match="--sha256 'abc': a SHA-256 is 64 hex digits"):
        fetch_archive(ARCHIVE_NAME, tmp_path / "c", url=url, progress=False, sha256="abc")
    with pytest.raises(ValueError, match="contradict"):
        fetch_archive(ARCHIVE_NAME, tmp_path / "c", verify=False, sha256=ARCHIVE_SHA256)
    # The CLI prints the SHA-256 of the archive it made ready, for the next --sha256.
    monkeypatch.setitem(ARCHIVES, "hasy", _spec(sha256=None, md5=ARCHIVE_MD5))
    source = tmp_path / "copy.tar.bz2"
    source.write_bytes(ARCHIVE_BYTES)
    command = ["fetch", "hasy", "--to", str(tmp_path / "d"), "--from", str(source)]
    assert cli_main([*command, "--sha256", ARCHIVE_SHA256]) == 0
    assert f"SHA-256: {ARCHIVE_SHA256}" in capsys.readouterr().out


def test_existing_verified_file_is_a_no_op(tmp_path, server, tiny_spec):
    url, state = server
    final_path = tmp_path / FILENAME
    final_path.write_bytes(ARCHIVE_BYTES)
    modified = final_path.stat().st_mtime_ns
    assert fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False) == final_path
    assert state.range_headers == []
    assert final_path.stat().st_mtime_ns == modified


def test_existing_wrong_file_raises_and_is_kept(tmp_path, server, tiny_spec):
    url, state = server
    final_path = tmp_path / FILENAME
    final_path.write_bytes(b"not the archive")
    with pytest.raises(ChecksumError, match=re.escape(str(final_path))) as caught:
        fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert "delete it to download again" in str(caught.value)
    assert final_path.read_bytes() == b"not the archive"
    assert state.range_headers == []


def test_import_from_file(tmp_path, tiny_spec):
    source = tmp_path / "downloads" / "copy.tar.gz"
    source.parent.mkdir()
    source.write_bytes(ARCHIVE_BYTES)
    path = fetch_archive(ARCHIVE_NAME, tmp_path / "data", from_file=source, progress=False)
    assert path == tmp_path / "data" / FILENAME
    assert _sha256(path) == ARCHIVE_SHA256
    assert os.listdir(tmp_path / "data") == [FILENAME]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # Not the temporary file's 0600.


def test_import_mismatch_names_file_and_hashes_and_leaves_nothing(tmp_path, tiny_spec):
    source = tmp_path / "dev-copy.tar.gz"
    source.write_bytes(b"a development copy that differs")
    source_sha256 = _sha256(source)
    with pytest.raises(ChecksumError) as caught:
        fetch_archive(ARCHIVE_NAME, tmp_path / "data", from_file=source, progress=False)
    message = str(caught.value)
    assert str(source) in message and ARCHIVE_SHA256 in message and source_sha256 in message
    assert not (tmp_path / "data").exists()  # Not even the folder it would have gone into.


def test_import_without_verify_copies_dev_copy(tmp_path, tiny_spec):
    source = tmp_path / "dev-copy.tar.gz"
    source.write_bytes(b"a development copy that differs")
    path = fetch_archive(ARCHIVE_NAME, tmp_path / "data", from_file=source, verify=False)
    assert path.read_bytes() == b"a development copy that differs"
    assert os.listdir(tmp_path / "data") == [FILENAME]


def test_import_missing_file_raises(tmp_path, tiny_spec):
    with pytest.raises(FileNotFoundError, match="absent.tar.gz"):
        fetch_archive(ARCHIVE_NAME, tmp_path, from_file=tmp_path / "absent.tar.gz")


def test_unknown_name_lists_choices(tmp_path):
    with pytest.raises(ValueError, match="choose one of: cub, hasy"):
        fetch_archive("mnist", tmp_path)
    with pytest.raises(ValueError, match="mnist"):
        get_archive_spec("mnist")


def test_unreachable_url_raises_fetch_error(tmp_path, tiny_spec):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{FILENAME}"
    with pytest.raises(FetchError) as caught:
        fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False, timeout=5.0)
    message = str(caught.value)
    assert url in message and "--from FILE" in message and "\n" not in message
    assert os.listdir(tmp_path) == []


def test_http_error_raises_fetch_error(tmp_path, server, tiny_spec):
    url, state = server
    state.status = 404
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)


def test_arguments_are_validated(tmp_path, tiny_spec):
    with pytest.raises(ValueError, match="not both"):
        fetch_archive(ARCHIVE_NAME, tmp_path, from_file=tmp_path / "a", url="http://127.0.0.1/")
    with pytest.raises(ValueError, match="http or https"):
        fetch_archive(ARCHIVE_NAME, tmp_path, url="ftp://127.0.0.1/tiny.tar.gz")


def test_archive_spec_validation():
    with pytest.raises(ValueError, match="sha256 or an md5"):
        _spec(sha256=None, md5=None)
    with pytest.raises(ValueError, match="sha256"):
        _spec(sha256="XYZ")
    with pytest.raises(ValueError, match="md5"):
        _spec(sha256=None, md5="0" * 31)
    assert _spec(sha256=None, md5=ARCHIVE_MD5).checksum == ("md5", ARCHIVE_MD5)
    assert _spec(md5=ARCHIVE_MD5).checksum == ("sha256", ARCHIVE_SHA256)


@pytest.mark.parametrize("name", ["hasy", "cub"])
def test_official_archives_are_described(name):
    spec = ARCHIVES[name]
    assert spec.name == name
    assert spec.url.startswith("https://")
    assert spec.filename in spec.url
    algorithm, digest = spec.checksum
    assert len(digest) == {"sha256": 64, "md5": 32}[algorithm]


def test_import_from_a_folder_says_so(tmp_path, tiny_spec):
    with pytest.raises(FileNotFoundError, match="is a folder, not an archive file"):
        fetch_archive(ARCHIVE_NAME, tmp_path / "data", from_file=tmp_path, progress=False)


def test_a_failed_fetch_leaves_no_empty_folder(tmp_path, server, monkeypatch, capsys):
    url, state = server
    monkeypatch.setitem(ARCHIVES, "hasy", _spec())
    to = tmp_path / "new" / "data"
    missing = ["fetch", "hasy", "--to", str(to), "--from", str(tmp_path / "absent.tar.bz2")]
    assert cli_main(missing) == 2
    assert "absent.tar.bz2" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    # A whole download that fails its checksum is kept, and so is its folder ...
    monkeypatch.setitem(ARCHIVES, "hasy", _spec(sha256="0" * 64))
    assert cli_main(["fetch", "hasy", "--to", str(to), "--url", url]) == 2
    error = capsys.readouterr().err
    assert "checksum mismatch" in error and "run again with --no-verify to accept it" in error
    assert os.listdir(to) == [f"{FILENAME}.unverified"]
    # ... and --no-verify accepts it without downloading it again.
    assert cli_main(["fetch", "hasy", "--to", str(to), "--url", url, "--no-verify"]) == 0
    assert f"Archive ready: {to / FILENAME}" in capsys.readouterr().out
    assert os.listdir(to) == [FILENAME] and state.range_headers == [None]
    # A download cut short keeps its .part file, and so its folder, to resume.
    state.drop_after, state.drops_left = 10_000, 99
    with pytest.raises(FetchError, match="interrupted"):
        fetch_archive("hasy", tmp_path / "cut", url=url, progress=False)
    assert os.listdir(tmp_path / "cut") == [f"{FILENAME}.part"]


def test_a_body_cut_short_without_content_length_is_resumed(tmp_path, server, monkeypatch):
    url, state = server
    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, _spec(url=url))  # The official URL: size known.
    state.send_length = False
    state.drop_after, state.drops_left = 70_000, 1
    path = fetch_archive(ARCHIVE_NAME, tmp_path, verify=False, progress=False)
    assert state.range_headers == [None, "bytes=70000-"]
    assert _sha256(path) == ARCHIVE_SHA256


def test_a_mirror_without_length_or_range_may_serve_another_size(tmp_path, server, monkeypatch):
    url, state = server
    # The mirror's copy is smaller than the publisher's: its clean end is the end of the file.
    monkeypatch.setitem(ARCHIVES, ARCHIVE_NAME, _spec(size_bytes=len(ARCHIVE_BYTES) + 1000))
    state.send_length, state.honour_range = False, False
    path = fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert state.range_headers == [None]
    assert _sha256(path) == ARCHIVE_SHA256


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_an_interrupt_keeps_the_bytes_received_for_the_next_run(tmp_path, server, tiny_spec):
    url, state = server
    state.stall_after = 70_000
    part_path = tmp_path / f"{FILENAME}.part"
    main_thread = threading.get_ident()

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if part_path.exists() and part_path.stat().st_size >= state.stall_after:
                break
            time.sleep(0.01)
        signal.pthread_kill(main_thread, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    presser = threading.Thread(target=press_ctrl_c)
    try:
        presser.start()
        with pytest.raises(KeyboardInterrupt):
            fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False, timeout=10)
    finally:
        presser.join()
        signal.signal(signal.SIGINT, previous)
        state.release.set()
    assert part_path.stat().st_size == 70_000  # Each piece was written as it arrived.

    state.stall_after = None
    path = fetch_archive(ARCHIVE_NAME, tmp_path, url=url, progress=False)
    assert state.range_headers == [None, "bytes=70000-"]
    assert _sha256(path) == ARCHIVE_SHA256


def test_cli_fetch_downloads_from_a_mirror_and_names_its_flags(
    tmp_path, server, monkeypatch, capsys
):
    url, _ = server
    monkeypatch.setitem(ARCHIVES, "hasy", _spec(sha256=None, md5=ARCHIVE_MD5))
    assert cli_main(["fetch", "hasy", "--to", str(tmp_path / "a"), "--url", url]) == 0
    printed = capsys.readouterr().out
    assert f"Archive ready: {tmp_path / 'a' / FILENAME}" in printed
    # The next command trains as the README does: on fold 1, the paper's protocol.
    assert f"Next: cnnkit train --dataset hasy --data {tmp_path / 'a' / FILENAME} --fold 1" in (
        printed
    )
    assert _sha256(tmp_path / "a" / FILENAME) == ARCHIVE_SHA256
    both = ["fetch", "hasy", "--to", str(tmp_path / "b"), "--url", url, "--from", "x.tar.bz2"]
    assert cli_main(both) == 2
    assert "--from imports a local copy and --url downloads one" in capsys.readouterr().err
    assert cli_main(["fetch", "hasy", "--to", str(tmp_path / "c"), "--sha256", "abc"]) == 2
    assert "error: --sha256 'abc': a SHA-256 is 64 hex digits" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a"]
