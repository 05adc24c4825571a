"""Safe archives: canonical reproducible writing, and refusal of every hostile archive with
nothing written outside staging and no staging directory left behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_bundle import archive
from edge_bundle.archive import (
    ArchiveLimits,
    extract_archive,
    inspect_archive,
    write_archive,
)
from edge_bundle.errors import ArchiveError, ArchiveLimitError, UnsafeMemberError

MEMBERS: dict[str, bytes] = {
    "model.onnx": b"\x08\x01" * 700,
    "golden/ok-1.jpg": b"\xff\xd8jpeg",
    "empty.txt": b"",
    "Porosität/note.txt": "ünïcode".encode(),
    "deep/" + "n" * 150 + ".bin": b"a name too long for a plain ustar header",
}


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A directory whose whole tree the tests compare before and after reading an archive."""
    root = tmp_path / "sandbox"
    (root / "staging").mkdir(parents=True)
    return root


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def sources(tmp_path: Path) -> dict[str, Path | bytes]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    result: dict[str, Path | bytes] = {}
    for index, (name, data) in enumerate(MEMBERS.items()):
        path = src / f"f{index}"
        path.write_bytes(data)
        os.utime(path, (1_000_000 + index, 1_000_000 + index))
        result[name] = path
    return result


@pytest.mark.parametrize("compress", [False, True])
def test_write_then_extract_round_trip(tmp_path: Path, sandbox: Path, compress: bool) -> None:
    out = sandbox / "a.tar"
    written = write_archive(out, sources(tmp_path), compress=compress)
    assert written.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert written.size == out.stat().st_size
    assert [m.name for m in written.members] == sorted(MEMBERS)
    extracted = extract_archive(out, sandbox / "staging")
    assert extracted.directory.parent == sandbox / "staging"
    assert extracted.sha256 == written.sha256
    for name, data in MEMBERS.items():
        assert extracted.directory.joinpath(*name.split("/")).read_bytes() == data
        entry = extracted.entry(name)
        assert entry is not None
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert [m.name for m in inspect_archive(out)] == sorted(MEMBERS)


@pytest.mark.parametrize("compress", [False, True])
def test_writing_is_reproducible_and_normalised(tmp_path: Path, compress: bool) -> None:
    first = write_archive(tmp_path / "1.tar", sources(tmp_path), compress=compress)
    for path in (tmp_path / "src").iterdir():
        os.utime(path, (2_000_000, 2_000_000))
        path.chmod(0o600)
    as_bytes: dict[str, Path | bytes] = dict(MEMBERS)
    second = write_archive(tmp_path / "2.tar", as_bytes, compress=compress)
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    assert first.sha256 == second.sha256
    with tarfile.open(tmp_path / "1.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == sorted(MEMBERS)
    for info in infos:
        assert info.isreg()
        assert (info.mtime, info.uid, info.gid, info.mode) == (0, 0, 0, 0o644)
        assert (info.uname, info.gname) == ("", "")
    if compress:
        header = (tmp_path / "1.tar").read_bytes()[:10]
        assert header[4:8] == bytes(4)  # gzip mtime 0


def test_writing_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "out" / "a.tar"
    write_archive(out, {"a": b"old"})
    bad: dict[str, Path | bytes] = {"a": b"new", "b": tmp_path / "missing"}
    with pytest.raises(UnsafeMemberError, match="not a regular file"):
        write_archive(out, bad)
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.tar"]
    assert extract_archive(out, tmp_path / "staging").entry("a") is not None


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("../x", "'..'"),
        ("/abs", "absolute"),
        ("a\\b", "backslash"),
        ("a//b", "empty"),
        ("./a", "'.'"),
        ("cafe\u0301", "NFC"),
        ("a\nb", "control"),
        ("", "empty"),
        ("x" * 256, "longer"),
    ],
)
def test_writer_refuses_unsafe_names(tmp_path: Path, name: str, rule: str) -> None:
    with pytest.raises(UnsafeMemberError, match=rule):
        write_archive(tmp_path / "a.tar", {name: b"x"})
    assert list(tmp_path.iterdir()) == []


def test_expected_digest_mismatch_leaves_nothing(tmp_path: Path) -> None:
    from edge_bundle.errors import IntegrityError

    with pytest.raises(IntegrityError, match="changed while"):
        write_archive(tmp_path / "a.tar", {"a": b"x"}, expected_sha256={"a": "0" * 64})
    assert list(tmp_path.iterdir()) == []


# --- hostile archives, built with tarfile directly ------------------------------------------


def _reg(name: str, data: bytes = b"data") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, None


def _build(
    path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w"
) -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


HOSTILE: list[tuple[str, list[tuple[tarfile.TarInfo, bytes | None]], type[Exception], str]] = [
    (
        "symlink",
        [_reg("ok"), _special("link", tarfile.SYMTYPE, linkname="../../evil")],
        UnsafeMemberError,
        "symbolic link",
    ),
    (
        "hardlink",
        [_reg("ok"), _special("hard", tarfile.LNKTYPE, linkname="/etc/passwd")],
        UnsafeMemberError,
        "hard link",
    ),
    ("chardev", [_special("tty", tarfile.CHRTYPE, devmajor=4)], UnsafeMemberError, "character"),
    ("blockdev", [_special("sda", tarfile.BLKTYPE, devmajor=8)], UnsafeMemberError, "block"),
    ("fifo", [_special("pipe", tarfile.FIFOTYPE)], UnsafeMemberError, "FIFO"),
    ("directory", [_special("dir", tarfile.DIRTYPE)], UnsafeMemberError, "directory"),
    ("absolute", [_reg("/tmp/evil")], UnsafeMemberError, "absolute"),
    ("dotdot", [_reg("ok"), _reg("../evil")], UnsafeMemberError, "'..'"),
    ("nested-dotdot", [_reg("a/../../evil")], UnsafeMemberError, "'..'"),
    ("backslash", [_reg("..\\evil")], UnsafeMemberError, "backslash"),
    ("duplicate", [_reg("a", b"1"), _reg("a", b"2")], UnsafeMemberError, "twice"),
    ("not-nfc", [_reg("cafe\u0301.txt")], UnsafeMemberError, "NFC"),
    ("control-char", [_reg("a\x1bb")], UnsafeMemberError, "control"),
    ("file-dir-clash", [_reg("a"), _reg("a/b")], UnsafeMemberError, "directory"),
]


@pytest.mark.parametrize(
    ("label", "members", "error", "rule"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_members_are_refused(
    sandbox: Path,
    label: str,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    error: type[Exception],
    rule: str,
) -> None:
    bad = _build(sandbox / f"{label}.tar", members)
    _assert_refused(sandbox, bad, error, rule)


def _assert_refused(
    sandbox: Path,
    path: Path,
    error: type[Exception],
    rule: str,
    limits: ArchiveLimits | None = None,
) -> None:
    before = tree(sandbox)
    with pytest.raises(error, match=rule) as info:
        extract_archive(path, sandbox / "staging", limits)
    assert "\n" not in str(info.value)
    with pytest.raises(error, match=rule):
        inspect_archive(path, limits)
    assert tree(sandbox) == before  # nothing written anywhere, staging left empty
    assert list((sandbox / "staging").iterdir()) == []
    assert not (sandbox.parent / "evil").exists()


def test_member_count_cap(sandbox: Path) -> None:
    bad = _build(sandbox / "many.tar", [_reg(f"f{i}") for i in range(4)])
    _assert_refused(sandbox, bad, ArchiveLimitError, "'f3'.*max_members", ArchiveLimits(3))
    default_cap = _build(sandbox / "many2.tar", [_reg(f"f{i}", b"") for i in range(257)])
    _assert_refused(sandbox, default_cap, ArchiveLimitError, "256 members")


def test_member_size_cap(sandbox: Path) -> None:
    bad = _build(sandbox / "big.tar", [_reg("ok"), _reg("big", bytes(200))])
    limits = ArchiveLimits(max_member_bytes=100)
    _assert_refused(sandbox, bad, ArchiveLimitError, "'big' declares 200 bytes", limits)


def test_total_size_cap(sandbox: Path) -> None:
    bad = _build(sandbox / "total.tar", [_reg("a", bytes(200)), _reg("b", bytes(200))])
    limits = ArchiveLimits(max_total_bytes=300)
    _assert_refused(sandbox, bad, ArchiveLimitError, "'b'.*max_total_bytes", limits)


def test_gzip_bomb_is_refused_by_ratio(sandbox: Path) -> None:
    bomb = _build(sandbox / "bomb.tar.gz", [_reg("zeros", bytes(20 * 1024 * 1024))], "w:gz")
    assert bomb.stat().st_size < 100_000
    _assert_refused(sandbox, bomb, ArchiveLimitError, "'zeros'.*decompression bomb")


def test_ratio_is_not_judged_on_tiny_or_plain_archives(tmp_path: Path) -> None:
    small = write_archive(tmp_path / "s.tar.gz", {"z": bytes(100_000)}, compress=True)
    assert extract_archive(small.path, tmp_path / "st").entry("z") is not None
    plain = write_archive(tmp_path / "p.tar", {"z": bytes(2 * 1024 * 1024)})
    assert extract_archive(plain.path, tmp_path / "st").entry("z") is not None


def test_truncated_archive_is_refused(sandbox: Path) -> None:
    good = write_archive(sandbox / "t.tar", {"big": bytes(5000)})
    data = good.path.read_bytes()
    good.path.write_bytes(data[: 512 + 100])  # header says 5000 bytes, only 100 follow
    _assert_refused(sandbox, good.path, ArchiveError, "truncated")


def test_data_beyond_the_declared_size_is_refused(sandbox: Path) -> None:
    good = write_archive(sandbox / "l.tar", {"small": b"x" * 100})
    data = bytearray(good.path.read_bytes())
    data[512 + 100 : 512 + 5000] = b"y" * 4900  # payload longer than the header admits
    good.path.write_bytes(bytes(data))
    _assert_refused(sandbox, good.path, ArchiveError, "not in canonical form")


def test_trailing_data_is_refused(sandbox: Path) -> None:
    good = write_archive(sandbox / "t.tar", {"a": b"x"})
    good.path.write_bytes(good.path.read_bytes() + b"hidden")
    _assert_refused(sandbox, good.path, ArchiveError, "follows the end")


def test_non_canonical_metadata_is_refused(sandbox: Path) -> None:
    info, data = _reg("a", b"x")
    info.mtime = 1_700_000_000
    bad = _build(sandbox / "mtime.tar", [(info, data)])
    _assert_refused(sandbox, bad, ArchiveError, "canonical form")


@pytest.mark.parametrize(
    "content", [b"", b"plain text, not a tar", bytes(10240), b"\x1f\x8b\x08broken gzip"]
)
def test_unreadable_archives_are_refused(sandbox: Path, content: bytes) -> None:
    path = sandbox / "x.tar"
    path.write_bytes(content)
    _assert_refused(sandbox, path, ArchiveError, "not a readable tar|holds no files")


def test_gzip_with_bad_crc_is_refused(sandbox: Path) -> None:
    good = write_archive(sandbox / "c.tar.gz", {"a": os.urandom(3000)}, compress=True)
    data = bytearray(good.path.read_bytes())
    data[-8] ^= 0xFF  # the gzip CRC32 in the trailer
    good.path.write_bytes(bytes(data))
    _assert_refused(sandbox, good.path, ArchiveError, "CRC")


def test_missing_or_special_paths_are_archive_errors(sandbox: Path) -> None:
    with pytest.raises(ArchiveError, match="cannot read"):
        extract_archive(sandbox / "missing.tar", sandbox / "staging")
    with pytest.raises(ArchiveError, match="not a regular file"):
        extract_archive(sandbox / "staging", sandbox / "staging")
    fifo = sandbox / "fifo.tar"
    os.mkfifo(fifo)
    with pytest.raises(ArchiveError, match="not a regular file"):
        extract_archive(fifo, sandbox / "staging")


def test_failure_while_extracting_removes_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write_archive(tmp_path / "g.tar", {"a": b"1", "b": b"2"})
    real: Callable[..., object] = archive._extract_member
    calls: list[str] = []

    def failing(stream: object, member: archive.MemberInfo, staging: Path) -> object:
        calls.append(member.name)
        if member.name == "b":
            raise OSError("disk full")
        return real(stream, member, staging)

    monkeypatch.setattr(archive, "_extract_member", failing)
    with pytest.raises(OSError, match="disk full"):
        extract_archive(good.path, tmp_path / "staging")
    assert calls == ["a", "b"]  # "a" was written before the failure...
    assert list((tmp_path / "staging").iterdir()) == []  # ...and removed with staging


def test_writer_output_is_plain_gzip(tmp_path: Path) -> None:
    written = write_archive(tmp_path / "a.tar.gz", {"a": b"hello"}, compress=True)
    with gzip.open(written.path) as gz, tarfile.open(fileobj=gz) as tar:
        member = tar.extractfile("a")
        assert member is not None
        assert member.read() == b"hello"
