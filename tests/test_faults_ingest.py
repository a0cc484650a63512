"""medcl ingest under faults: DICOM patient identity, file names that are not UTF-8, sources replaced
under the same name, a killed parent with worker processes, a full disk, one-line user errors."""

from __future__ import annotations

import builtins
import csv
import errno
import hashlib
import hmac
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medcl.cli import main as medcl_main
from medcl.data.manifest import read_manifest
from medcl.ingest import ingest_videos
from medcl.ingest import store
from test_ingest import make_dicom, ultrasound_clip, write_video


def records_by_source(out: Path) -> dict:
    return {r.source: r for r in read_manifest(out)}


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = medcl_main(["ingest", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- 1. DICOM patient and study


STUDY = "1.2.826.0.1.3680043.8.498.1"


def dicom_folder(root: Path) -> Path:
    """Two cine loops of patient PAT-7 (one study) under unrelated names, one DICOM without a
    PatientID, one DICOM of another patient, and a video."""
    root.mkdir(parents=True)
    make_dicom(root / "loop_0001.dcm", ultrasound_clip(6, seed=1), FrameTime="250", PatientID="PAT-7",
               StudyInstanceUID=STUDY)
    make_dicom(root / "IM_48213", ultrasound_clip(6, seed=2), FrameTime="250", PatientID="PAT-7",
               StudyInstanceUID=STUDY)
    make_dicom(root / "anon.dcm", ultrasound_clip(6, seed=3), FrameTime="250")
    make_dicom(root / "other.dcm", ultrasound_clip(6, seed=4), FrameTime="250", PatientID="PAT-9",
               StudyInstanceUID="1.2.3.4")
    write_video(root / "clip.mp4", ultrasound_clip(10, seed=5), 10)
    return root


def test_dicom_patient_and_study_come_from_the_tags(tmp_path):
    src = dicom_folder(tmp_path / "src")
    summary = ingest_videos(src, tmp_path / "out", size=16, progress=False)
    assert summary.failed == [] and summary.n_ingested == 5
    records = records_by_source(tmp_path / "out")
    assert records["loop_0001.dcm"].patient_id == records["IM_48213"].patient_id == "PAT-7"
    assert records["loop_0001.dcm"].study_id == records["IM_48213"].study_id == STUDY
    assert records["other.dcm"].patient_id == "PAT-9"
    # no PatientID: each file its own patient, and the summary says so with the file named
    assert records["anon.dcm"].patient_id == records["anon.dcm"].video_id
    assert records["clip.mp4"].patient_id == records["clip.mp4"].video_id and records["clip.mp4"].study_id == ""
    assert summary.dicom_without_patient == ["anon.dcm"]
    assert "1 DICOM file(s) have no PatientID" in summary.describe() and "anon.dcm" in summary.describe()
    # a rerun (everything skipped) keeps the identities
    again = ingest_videos(src, tmp_path / "out", size=16, progress=False)
    assert again.n_skipped == 5
    assert {s: (r.patient_id, r.study_id) for s, r in records_by_source(tmp_path / "out").items()} == {
        s: (r.patient_id, r.study_id) for s, r in records.items()
    }


def test_explicit_patient_sources_win_over_the_dicom_tag(tmp_path):
    src = dicom_folder(tmp_path / "src")
    (tmp_path / "meta.csv").write_text("file,patient_id\nloop_0001.dcm,from-table\n")
    (tmp_path / "patients.csv").write_text("patient_id,diagnosis\nPAT-9,covid\nfrom-table,regular\n")
    summary = ingest_videos(
        src, tmp_path / "out", size=16, progress=False, metadata=tmp_path / "meta.csv",
        patient_pattern=r"^(?P<patient>IM)_", patient_metadata=tmp_path / "patients.csv",
        patient_label_column="diagnosis",
    )
    records = records_by_source(tmp_path / "out")
    assert records["loop_0001.dcm"].patient_id == "from-table"  # --metadata beats the tag
    assert records["IM_48213"].patient_id == "IM"  # --patient-pattern beats the tag
    assert records["other.dcm"].patient_id == "PAT-9"  # the tag beats the per-file id
    # the per-patient table is looked up with the patient found, the DICOM one included
    assert records["other.dcm"].label == "covid" and records["loop_0001.dcm"].label == "regular"
    assert summary.dicom_without_patient == ["anon.dcm"]


def test_hashed_patient_ids(tmp_path):
    src = dicom_folder(tmp_path / "src")
    out = tmp_path / "out"
    ingest_videos(src, out, size=16, progress=False, hash_patient_ids="s3cret")
    records = records_by_source(out)

    def reference(value: str, salt: str) -> str:  # HMAC-SHA256 keyed with the salt, 16 hex digits
        return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:16]

    assert records["loop_0001.dcm"].patient_id == records["IM_48213"].patient_id == reference("PAT-7", "s3cret")
    assert records["loop_0001.dcm"].study_id == reference(STUDY, "s3cret")
    assert records["other.dcm"].patient_id == reference("PAT-9", "s3cret")
    assert records["anon.dcm"].patient_id == records["anon.dcm"].video_id  # the fallback names the file anyway
    text = (out / "manifest.csv").read_text()
    assert "PAT-7" not in text and "PAT-9" not in text and STUDY not in text
    # another salt, another id; a rerun refreshes the ids from the current options
    ingest_videos(src, out, size=16, progress=False, hash_patient_ids="other")
    assert records_by_source(out)["loop_0001.dcm"].patient_id == reference("PAT-7", "other")
    ingest_videos(src, out, size=16, progress=False)
    assert records_by_source(out)["loop_0001.dcm"].patient_id == "PAT-7"
    with pytest.raises(ValueError, match="salt"):
        ingest_videos(src, out, size=16, progress=False, hash_patient_ids="")


def test_cli_help_documents_patient_precedence(capsys):
    with pytest.raises(SystemExit):
        medcl_main(["ingest", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--hash-patient-ids SALT" in text
    assert "the --metadata row's patient column, --patient-pattern, the DICOM PatientID" in text


def test_manifest_without_the_new_columns_reads_and_resumes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        write_video(src / f"v{i}.mp4", ultrasound_clip(10, seed=i), 10)
    out = tmp_path / "out"
    ingest_videos(src, out, size=16, progress=False)
    # the manifest as an older medcl wrote it
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    old_columns = [c for c in rows[0] if c not in ("study_id", "source_bytes", "source_mtime_ns")]
    with (out / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert [r.study_id for r in read_manifest(out)] == ["", ""]
    # frames newer than their sources are trusted; a source modified after its frames is redone
    future = time.time() + 60
    os.utime(src / "v1.mp4", (future, future))
    again = ingest_videos(src, out, size=16, progress=False)
    assert again.n_skipped == 1 and again.n_ingested == 1 and again.n_changed == 1
    assert all(r.source_mtime_ns > 0 for r in read_manifest(out))


# ---------------------------------------------------------------- 2. file names that are not UTF-8


def bytes_name(folder: Path, name: bytes) -> Path:
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))
    try:
        path.touch()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    path.unlink()
    return path


def test_file_names_that_are_not_utf8_are_ingested_or_reported(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "good.mp4", ultrasound_clip(10, seed=1), 10)
    write_video(bytes_name(src, b"bad\xff\xfe.mp4"), ultrasound_clip(10, seed=2), 10)
    bytes_name(src, b"broken\xe9.avi").write_bytes(b"not a video")
    out = tmp_path / "out"
    summary = ingest_videos(src, out, size=16, progress=False, patient_pattern=r"^(?P<patient>[a-z]+..)\.")
    records = records_by_source(out)
    assert set(records) == {"good.mp4", "bad\\xff\\xfe.mp4"}  # escaped, never fatal
    bad = records["bad\\xff\\xfe.mp4"]
    assert bad.video_id.isascii() and bad.n_frames == 3 and bad.patient_id == "bad\\xff\\xfe"
    assert np.load(out / bad.frames_file).shape == (3, 16, 16)
    assert [name for name, _ in summary.failed] == ["broken\\xe9.avi"]
    assert list(csv.DictReader((out / "errors.csv").open()))[0]["file"] == "broken\\xe9.avi"
    assert temporaries(out) == []
    assert "broken\\xe9.avi" in summary.describe()
    # every rerun resumes, the command line too
    again = ingest_videos(src, out, size=16, progress=False)
    assert again.n_skipped == 2 and len(again.failed) == 1
    code, stdout, stderr = run_cli(capsys, str(src), str(out), "--size", "16")
    assert code == 2 and "2 already done" in stdout and "broken\\xe9.avi" in stdout and stderr == ""


# ---------------------------------------------------------------- 3. a source replaced under the same name


def test_replaced_source_is_reingested(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "v.mp4", ultrasound_clip(10, seed=1), 10)  # 1 s -> 3 frames
    write_video(src / "keep.mp4", ultrasound_clip(10, seed=2), 10)
    out = tmp_path / "out"
    ingest_videos(src, out, size=16, progress=False)
    before = records_by_source(out)
    old_frames = np.load(out / before["v.mp4"].frames_file)
    keep_mtime = (out / before["keep.mp4"].frames_file).stat().st_mtime_ns

    write_video(src / "v.mp4", ultrasound_clip(20, seed=7), 10)  # another video, same name: 2 s -> 6 frames
    again = ingest_videos(src, out, size=16, progress=False)
    after = records_by_source(out)
    assert after["v.mp4"].video_id == before["v.mp4"].video_id and after["v.mp4"].n_frames == 6
    new_frames = np.load(out / after["v.mp4"].frames_file)
    assert new_frames.shape == (6, 16, 16) and not np.array_equal(new_frames[:3], old_frames)
    assert again.n_changed == 1 and again.n_ingested == 1 and again.n_skipped == 1
    assert after["v.mp4"].source_bytes == (src / "v.mp4").stat().st_size
    assert (out / after["keep.mp4"].frames_file).stat().st_mtime_ns == keep_mtime  # unchanged: not redone
    assert temporaries(out) == []

    # replaced by a damaged file: reported, and neither its row nor its stale frames remain
    (src / "v.mp4").write_bytes(b"garbage")
    broken = ingest_videos(src, out, size=16, progress=False)
    assert [name for name, _ in broken.failed] == ["v.mp4"]
    assert set(records_by_source(out)) == {"keep.mp4"}
    assert not (out / after["v.mp4"].frames_file).exists()


# ---------------------------------------------------------------- 4. kill -9 of the parent


def processes_in_group(pgid: int) -> list[tuple[int, str]]:
    """(pid, command) of the live processes whose process group is ``pgid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append((int(entry.name), cmdline))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    clip = write_video(src / "v00.mp4", ultrasound_clip(150, size=128), 30)
    for i in range(1, 16):
        (src / f"v{i:02d}.mp4").write_bytes(clip.read_bytes())
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcl", "ingest", str(src), str(out), "--workers", "2", "--size", "64", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # its own process group
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # mid-run: the manifest is started and both workers exist
            workers = [c for pid, c in processes_in_group(proc.pid) if "spawn_main" in c]
            if (out / "manifest.csv").exists() and len(workers) >= 2:
                break
            assert proc.poll() is None, "ingest finished before it could be killed: give it more work"
            time.sleep(0.02)
        else:
            pytest.fail("the workers did not start within 120 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while processes_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_in_group(proc.pid) == [], "processes outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only that test's own process group
        except ProcessLookupError:
            pass
    # and the rerun after the kill completes, with no temporaries left
    summary = ingest_videos(src, out, size=64, progress=False)
    assert summary.exit_code == 0 and len(read_manifest(out)) == 16 and temporaries(out) == []


# ---------------------------------------------------------------- 5. a full disk


class FullDisk:
    """Files opened for writing under ``root`` take ``budget`` bytes in all, then every write raises
    ENOSPC, as a file system that has filled up does (the open itself succeeds)."""

    def __init__(self, root: Path, budget: int):
        self.root, self.budget = str(root), budget
        self.real_open = builtins.open

    def open(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        name = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
        if name.startswith(self.root) and any(c in mode for c in "wax+"):
            return _Budgeted(handle, self)
        return handle


class _Budgeted:
    def __init__(self, handle, disk: FullDisk):
        self._handle, self._disk = handle, disk

    def write(self, data):
        if len(data) > self._disk.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.budget -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    def install(out: Path, budget: int = 0) -> FullDisk:
        disk = FullDisk(out, budget)
        monkeypatch.setattr(builtins, "open", disk.open)
        monkeypatch.setattr(io, "open", disk.open)  # pathlib opens through io.open
        return disk

    return install


def small_source(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        write_video(root / f"v{i}.mp4", ultrasound_clip(10, seed=i), 10)
    return root


def test_disk_full_at_start(tmp_path, full_disk, capsys):
    src = small_source(tmp_path / "src", 2)
    out = tmp_path / "out"
    full_disk(out, budget=0)
    with pytest.raises(OSError) as raised:
        ingest_videos(src, out, size=16, progress=False)
    assert temporaries(out) == []  # no 0-byte ingest.json.tmp
    assert str(raised.value).startswith(f"{out}: no space left on device (while writing ingest.json)")
    assert isinstance(raised.value, store.OutputError)
    code, stdout, stderr = run_cli(capsys, str(src), str(out), "--size", "16")
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith(f"medcl ingest: {out}: no space left on device")
    assert "Traceback" not in stderr


def test_disk_full_mid_run_stops_and_the_rerun_resumes(tmp_path, monkeypatch):
    src = small_source(tmp_path / "src", 5)
    out = tmp_path / "out"
    real_save, calls = np.save, []

    def save_until_full(file, array, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third video's frames meet a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(file, array, **kwargs)

    monkeypatch.setattr(np, "save", save_until_full)
    with pytest.raises(OSError, match=f"^{out}: no space left on device") as raised:
        ingest_videos(src, out, size=16, progress=False)
    assert isinstance(raised.value, store.OutputError)
    assert len(calls) == 3  # stopped at once: no attempt at the other videos
    assert temporaries(out) == []
    finished = read_manifest(out)  # intact, and every row's frames complete
    assert [r.source for r in finished] == ["v0.mp4", "v1.mp4"]
    for record in finished:
        assert store.frames_file_ok(out / record.frames_file, record)
    assert (out / "errors.csv").read_text().strip() == "file,reason"  # a full disk is no file's fault

    monkeypatch.setattr(np, "save", real_save)  # space freed
    again = ingest_videos(src, out, size=16, progress=False)
    assert again.n_skipped == 2 and again.n_ingested == 3 and again.exit_code == 0


SHORT_WRITE = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from medcl.ingest.store import save_frames_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_frames_atomic(Path(sys.argv[1]), np.zeros((40, 64, 64), np.uint8))
except OSError as exc:
    print(exc.errno, exc)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_frames_writer_keeps_the_errno_of_a_short_write(tmp_path):
    """A disk that fills up in the middle of a frames file: the write is cut short. numpy's fast
    path (tofile) reports that as "N requested and M written" without errno, which hid ENOSPC;
    the frames writer must keep the errno (here EFBIG: a file size limit cuts the write short the
    same way, in a subprocess so that the limit binds nothing else)."""
    path = tmp_path / "x.npy"
    result = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(path)], capture_output=True, text=True)
    assert result.stdout.split(" ")[0] == str(errno.EFBIG), result.stdout + result.stderr
    assert not path.exists() and temporaries(tmp_path) == []


# ---------------------------------------------------------------- user errors: one line, exit 2


@pytest.mark.parametrize(
    "case,where",
    [
        ("missing_src", "nowhere"),
        ("bad_fps", "fps"),
        ("metadata_not_utf8", "latin1.csv"),
        ("bad_pattern", "--patient-pattern"),
        ("out_is_a_file", "out_file"),
        ("other_settings", "ingest.json"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys, case, where):
    src = small_source(tmp_path / "src", 1)
    out = tmp_path / "out"
    args = [str(src), str(out), "--size", "16"]
    if case == "missing_src":
        args[0] = str(tmp_path / "nowhere")
    elif case == "bad_fps":
        args += ["--fps", "0"]
    elif case == "metadata_not_utf8":
        (tmp_path / "latin1.csv").write_bytes("file,label\nv0.mp4,pneumonie aigu\xeb\n".encode("latin-1"))
        args += ["--metadata", str(tmp_path / "latin1.csv")]
    elif case == "bad_pattern":
        args += ["--patient-pattern", "(unclosed"]
    elif case == "out_is_a_file":
        args[1] = str(tmp_path / "out_file")
        (tmp_path / "out_file").write_text("")
    elif case == "other_settings":
        assert run_cli(capsys, *args)[0] == 0
        args += ["--fps", "5"]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("medcl ingest: ") and where in stderr, stderr
    assert "Traceback" not in stderr
