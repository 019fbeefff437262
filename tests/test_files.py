"""Atomic files and folders: whole or untouched, the umask's mode, fsync of the data and the folder."""

import os
import stat

import pytest

from annify._files import (
    atomic_file,
    atomic_folder,
    atomic_write,
    move_into,
    previous_folder,
    remove_leftovers,
    staging,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def fsynced(monkeypatch):
    """The (inode, is a folder) of everything os.fsync is called on, in order."""
    calls = []
    real = os.fsync

    def record(fd):
        st = os.fstat(fd)
        calls.append((st.st_ino, stat.S_ISDIR(st.st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def synced(calls, path) -> bool:
    st = os.stat(path)
    return (st.st_ino, stat.S_ISDIR(st.st_mode)) in calls


# --- atomic_write ---------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "spec.yaml"
    atomic_write(path, "first\n")
    atomic_write(path, b"second\n")
    assert path.read_text() == "second\n"
    assert os.listdir(tmp_path) == ["spec.yaml"]


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "spec.yaml"
    atomic_write(path, "x\n")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_mode_follows_the_umask(tmp_path, umask_022):
    path = tmp_path / "out.json"
    atomic_write(path, "{}\n")
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_rename_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "spec.yaml"
    path.write_text("old\n")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["spec.yaml"]


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "spec.yaml", 123)  # neither text nor bytes
    assert os.listdir(tmp_path) == []


def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, fsynced):
    path = tmp_path / "a.txt"
    atomic_write(path, "data\n")
    assert synced(fsynced, path) and synced(fsynced, tmp_path)
    assert fsynced.index((os.stat(path).st_ino, False)) < fsynced.index((os.stat(tmp_path).st_ino, True))


# --- atomic_file ----------------------------------------------------------------------------------


def test_atomic_file_writes_through_a_path(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_bytes(b"new content")
        assert path.read_bytes() == b"old"  # nothing in place before the block ends
    assert path.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_atomic_file_keeps_the_old_file_when_the_writer_raises_midway(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer died"), atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half of it")
        raise RuntimeError("writer died")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.bin"]  # no temporary file left


def test_atomic_file_names_the_target_of_a_failed_write(tmp_path):
    path = tmp_path / "state.bin"
    with pytest.raises(OSError) as caught, atomic_file(path):
        raise OSError(28, "No space left on device")
    assert caught.value.filename == str(path)
    assert os.listdir(tmp_path) == []


def test_atomic_file_mode_follows_the_umask(tmp_path, umask_022):
    path = tmp_path / "model.safetensors"
    with atomic_file(path) as tmp:  # mkstemp made it 0600
        tmp.write_bytes(b"x")
    assert path.stat().st_mode & 0o777 == 0o644


def test_atomic_file_fsyncs_the_file_and_its_folder(tmp_path, fsynced):
    path = tmp_path / "w.pt"
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"weights")
    assert synced(fsynced, path) and synced(fsynced, tmp_path)


# --- atomic_folder --------------------------------------------------------------------------------


def test_atomic_folder_replaces_the_old_folder_whole(tmp_path):
    dest = tmp_path / "last"
    dest.mkdir()
    (dest / "old.txt").write_text("old\n")
    with atomic_folder(dest) as stage:
        assert stage.parent == tmp_path and not (stage / "old.txt").exists()
        (stage / "model.bin").write_bytes(b"new")
        assert (dest / "old.txt").exists()  # untouched while staging
    assert sorted(p.name for p in dest.iterdir()) == ["model.bin"]
    assert os.listdir(tmp_path) == ["last"]  # no staging folder, no previous one


def test_atomic_folder_keeps_the_old_folder_when_staging_fails(tmp_path):
    dest = tmp_path / "last"
    dest.mkdir()
    (dest / "model.bin").write_bytes(b"old")
    with pytest.raises(OSError, match="No space"), atomic_folder(dest) as stage:
        (stage / "model.bin").write_bytes(b"ne")
        raise OSError(28, "No space left on device")
    assert (dest / "model.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["last"]


def test_atomic_folder_after_a_kill_between_the_renames(tmp_path):
    dest = tmp_path / "last"
    old = previous_folder(dest)
    old.mkdir()  # a kill left the previous folder here and none at dest
    (old / "model.bin").write_bytes(b"previous")
    with pytest.raises(RuntimeError), atomic_folder(dest):
        raise RuntimeError("killed again")
    assert (old / "model.bin").read_bytes() == b"previous"  # kept until a swap succeeds
    with atomic_folder(dest) as stage:
        (stage / "model.bin").write_bytes(b"new")
    assert (dest / "model.bin").read_bytes() == b"new" and not old.exists()


def test_atomic_folder_mode_follows_the_umask(tmp_path, umask_022):
    dest = tmp_path / "best"
    with atomic_folder(dest) as stage:  # mkdtemp made it 0700
        (stage / "best.json").write_text("{}\n")
    assert dest.stat().st_mode & 0o777 == 0o755
    assert (dest / "best.json").stat().st_mode & 0o777 == 0o644


def test_atomic_folder_fsyncs_its_files_itself_and_the_parent(tmp_path, fsynced):
    dest = tmp_path / "last"
    with atomic_folder(dest) as stage:
        (stage / "a.bin").write_bytes(b"a")
        (stage / "b.bin").write_bytes(b"b")
    for path in (dest / "a.bin", dest / "b.bin", dest, tmp_path):
        assert synced(fsynced, path), path


# --- staging, move_into, remove_leftovers ---------------------------------------------------------


def test_staging_moves_only_the_files_named_and_leaves_no_folder(tmp_path, fsynced):
    (tmp_path / "keep.txt").write_text("other file\n")
    (tmp_path / "net.onnx").write_bytes(b"old")
    with staging(tmp_path) as stage:
        assert stage.parent == tmp_path
        (stage / "net.onnx").write_bytes(b"new")
        (stage / "scratch").write_bytes(b"not moved")
        move_into(stage, tmp_path, ["net.onnx"])
    assert (tmp_path / "net.onnx").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["keep.txt", "net.onnx"]
    assert synced(fsynced, tmp_path / "net.onnx") and synced(fsynced, tmp_path)


def test_staging_is_removed_when_a_check_fails(tmp_path):
    with pytest.raises(ValueError), staging(tmp_path) as stage:
        (stage / "net.onnx").write_bytes(b"unchecked")
        raise ValueError("check failed")
    assert os.listdir(tmp_path) == []


def test_remove_leftovers_removes_interrupted_writes_only(tmp_path):
    (tmp_path / "last").mkdir()
    (tmp_path / "config.yaml").write_text("kept\n")
    (tmp_path / ".tmp-last-x1y2").mkdir()  # what a kill leaves of atomic_folder
    (tmp_path / ".tmp-last-x1y2" / "state.pt").write_bytes(b"half")
    (tmp_path / ".tmp-config.yaml-abc").write_text("half")  # and of atomic_write
    remove_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "last"]
