"""`medcl ingest --part k/N` and `medcl ingest merge`: the merged parts equal a single-machine
ingest (manifest rows, errors, frames, settings; shards with one merged index), and every refusal
is one line naming the folders (and the video)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_ingest import ultrasound_clip, write_video

from medcl.cli import main
from medcl.data.manifest import read_manifest
from medcl.data.shards import ShardStore
from medcl.ingest import ingest_videos
from medcl.ingest.parts import merge_ingests, parse_part, part_of

# part_of(., 2): a.mp4, a.avi, c.mp4, e.png, broken.mp4 -> 1; sub/b.mp4, d.mp4 -> 2
PART_1 = {"a.mp4", "a.avi", "c.mp4", "e.png", "broken.mp4"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("parts") / "src"
    (src / "sub").mkdir(parents=True)
    write_video(src / "a.mp4", ultrasound_clip(8, seed=1), 10)
    write_video(src / "a.avi", ultrasound_clip(8, seed=2), 10, codec="mpeg4")  # its id clashes with a.mp4's
    write_video(src / "sub" / "b.mp4", ultrasound_clip(8, seed=3), 10)
    write_video(src / "c.mp4", ultrasound_clip(12, seed=4), 10)
    write_video(src / "d.mp4", ultrasound_clip(8, seed=5), 10)
    Image.fromarray(ultrasound_clip(1, seed=6)[0]).save(src / "e.png")
    (src / "broken.mp4").write_text("not a video\n")
    (src / "meta.csv").write_text("file,label,patient_id\na.mp4,covid,p1\nsub/b.mp4,regular,p2\nd.mp4,covid,p1\n")
    return src


def ingest_cli(src: Path, out: Path, *extra: str) -> int:
    return main(["ingest", str(src), str(out), "--size", "16", "--no-progress", "--metadata", str(src / "meta.csv"),
                 *extra])


@pytest.fixture(scope="module")
def ingested(source) -> dict[str, Path]:
    root = source.parent
    assert ingest_cli(source, root / "single", "--shards", "--shard-size", "3kB") == 2  # broken.mp4 fails
    assert ingest_cli(source, root / "part1", "--part", "1/2", "--shards", "--shard-size", "3kB") == 2
    assert ingest_cli(source, root / "part2", "--part", "2/2", "--shards", "--shard-size", "3kB") == 0
    return {name: root / name for name in ("single", "part1", "part2")}


def test_parts_are_a_stable_hash_of_the_path():
    assert {name for name in PART_1 | {"sub/b.mp4", "d.mp4"} if part_of(name, 2) == 1} == PART_1
    assert part_of("a.mp4", 5) == part_of("a.avi", 5)  # clashing ids share a part, for any N
    assert parse_part("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(ValueError, match="expected k/N"):
            parse_part(bad)


def test_merged_parts_equal_a_single_ingest(ingested, source, tmp_path, capsys):
    assert {r.source for r in read_manifest(ingested["part1"])} == PART_1 - {"broken.mp4"}
    assert main(["ingest", "merge", str(ingested["part2"]), str(ingested["part1"]), "-o", str(tmp_path / "all")]) == 2
    assert "6 videos" in capsys.readouterr().out  # broken.mp4 failed, as in the single ingest
    merged, single = tmp_path / "all", ingested["single"]
    records = read_manifest(merged)
    assert records == read_manifest(single) and len(records) == 6
    assert {r.source: r.video_id for r in records}["a.mp4"] == "a_mp4"  # as one machine names the clash
    for name in ("errors.csv", "ingest.json"):
        assert (merged / name).read_text() == (single / name).read_text()
    store = ShardStore(merged)
    store.check_matches(merged / "manifest.csv")
    assert len(store.shards) == len(ShardStore(ingested["part1"]).shards) + len(ShardStore(ingested["part2"]).shards)
    by_id = {v.video_id: v for v in store.videos}
    for record in records:
        frames = np.load(merged / record.frames_file)
        np.testing.assert_array_equal(frames, np.load(single / record.frames_file))
        np.testing.assert_array_equal(store.read(by_id[record.video_id]), frames)
    again = ingest_videos(source, ingested["part2"], size=16, metadata=source / "meta.csv", part="2/2", progress=False)
    assert again.n_skipped == 2 and again.n_ingested == 0  # a part reruns as a resume


def refused(capsys, *argv: str) -> str:
    assert main(["ingest", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medcl ingest") and "\n" not in err, err
    return err


def test_merge_refusals_are_one_line(ingested, source, tmp_path, capsys):
    p1, p2, single = (str(ingested[k]) for k in ("part1", "part2", "single"))
    copy = shutil.copytree(ingested["part1"], tmp_path / "part1-again")
    assert "part 1/2 given twice" in refused(capsys, "merge", p1, str(copy), p2, "-o", str(tmp_path / "m1"))
    assert "part(s) 2/2 missing" in refused(capsys, "merge", p1, "-o", str(tmp_path / "m2"))
    assert "is one part of a split ingest but" in refused(capsys, "merge", p1, p2, single, "-o", str(tmp_path / "m3"))
    twice = refused(capsys, "merge", single, str(shutil.copytree(single, tmp_path / "single-again")),
                    "-o", str(tmp_path / "m4"))
    assert "video 'a' is in both" in twice and "single-again" in twice
    assert ingest_cli(source, tmp_path / "part2-24", "--part", "2/2", "--size", "24") == 0
    assert "different settings" in refused(capsys, "merge", p1, str(tmp_path / "part2-24"), "-o", str(tmp_path / "m5"))
    assert "is one of the inputs" in refused(capsys, "merge", p1, p2, "-o", p1)
    assert "not an ingest folder" in refused(capsys, "merge", str(source), "-o", str(tmp_path / "m6"))
    assert "--part '3/2'" in refused(capsys, str(source), str(tmp_path / "m7"), "--part", "3/2")
    assert "--shard-size 'big'" in refused(capsys, "shard", p1, "--shard-size", "big")
    assert "not an ingest folder" in refused(capsys, "shard", str(source))
    merge_ingests([p1, p2], tmp_path / "m8")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_ingests([p1, p2], tmp_path / "m8")
    assert merge_ingests([p1, p2], tmp_path / "m8", overwrite=True).n_videos == 6


def test_shard_command_converts_an_ingest_folder(ingested, tmp_path, capsys):
    folder = Path(shutil.copytree(ingested["part2"], tmp_path / "plain"))
    shutil.rmtree(folder / "shards")
    assert main(["ingest", "shard", str(folder), "--no-progress"]) == 0
    assert "2 videos in" in capsys.readouterr().out
    assert {v.video_id for v in ShardStore(folder).videos} == {r.video_id for r in read_manifest(folder)}
    assert main(["ingest", "shard", str(folder), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
