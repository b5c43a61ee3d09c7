"""LLaVA JSON / JSONL sources, and the ArrayRecord (TFDS) conversion round trip."""
import json
import os
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from leo_jax.data import sources, to_arrayrecord

RECORDS = [
    {
        "id": "single",
        "image": "coco/a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it? é"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    },
    {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {
        "id": "multi",
        "image": ["coco/a.jpg", "ocr/b.png"],
        "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}],
    },
]


@pytest.fixture
def dataset_dir(tmp_path):
    """Annotation files in tmp_path/ann, images under tmp_path/images (a separate image root, as LLaVA)."""
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "coco").mkdir(parents=True)
    (tmp_path / "images" / "ocr").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "images" / "coco" / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (25, 15, 3), dtype=np.uint8)).save(tmp_path / "images" / "ocr" / "b.png")
    (tmp_path / "ann").mkdir()
    with open(tmp_path / "ann" / "data.json", "w", encoding="utf-8") as f:
        json.dump(RECORDS, f, indent=2, ensure_ascii=False)
    with open(tmp_path / "ann" / "data.jsonl", "w", encoding="utf-8") as f:
        for i, record in enumerate(RECORDS):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            if i == 0:
                f.write("\n   \n")  # blank lines are not records
    return tmp_path


def _expected(record, image_root):
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    return record["conversations"], [os.path.join(image_root, name) for name in images], record["id"]


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_json_and_jsonl_parse_with_image_root(dataset_dir, name):
    root = str(dataset_dir / "images")
    source = sources.LlavaJsonSource(str(dataset_dir / "ann" / name), image_root=root)
    assert len(source) == len(RECORDS)
    for index, record in enumerate(RECORDS):
        got = source[index]
        assert got.error is None
        assert (got.conversations, got.images, got.sample_id) == _expected(record, root)
        assert all(os.path.isfile(p) for p in got.images)
    assert len(source[2].images) == 2 and source[1].images == []  # multi-image and text-only
    if name.endswith(".jsonl"):
        assert [source[i].origin.rsplit(":", 1)[1] for i in range(3)] == ["line 1", "line 4", "line 5"]


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_concurrent_reads_from_one_source_are_exact(dataset_dir, name):
    """The pipeline reads one source from several threads: no read may see another's file position."""
    from concurrent.futures import ThreadPoolExecutor

    big = [dict(r, id=f"{r['id']}-{k}", conversations=r["conversations"] * 40) for k in range(50) for r in RECORDS]
    path = dataset_dir / "ann" / name.replace("data", "big")
    with open(path, "w", encoding="utf-8") as f:
        if name.endswith(".json"):
            json.dump(big, f)
        else:
            f.writelines(json.dumps(r) + "\n" for r in big)
    source = sources.LlavaJsonSource(str(path))
    expected = [source[i] for i in range(len(source))]
    indices = [i % len(source) for i in range(4000)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(source.__getitem__, indices))
    assert all(g == expected[i] for g, i in zip(got, indices))


def test_default_image_root_is_annotation_directory(dataset_dir):
    source = sources.LlavaJsonSource(str(dataset_dir / "ann" / "data.jsonl"))
    assert source[0].images == [str(dataset_dir / "ann" / "coco" / "a.jpg")]


def test_source_pickles_without_records_and_random_access_through_grain(dataset_dir):
    source = sources.LlavaJsonSource(str(dataset_dir / "ann" / "data.jsonl"), str(dataset_dir / "images"))
    source[0]  # opens the file handle, which must not be pickled
    clone = pickle.loads(pickle.dumps(source))
    assert [clone[i] for i in range(3)] == [source[i] for i in range(3)]
    ds = grain.MapDataset.source(clone)
    assert ds[2].sample_id == "multi" and ds[0].sample_id == "single"


def test_malformed_jsonl_line_is_an_error_record_with_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(RECORDS[1]) + "\n{not json\n" + json.dumps({"conversations": "oops"}) + "\n"
        + json.dumps({"image": 3, "conversations": RECORDS[1]["conversations"]}) + "\n"
        + json.dumps({"conversations": [{"from": "human"}]}) + "\n"
    )
    source = sources.LlavaJsonSource(str(path))
    assert source[0].error is None
    assert source[1].error[0] == sources.MALFORMED_JSON and source[1].origin == f"{path}:line 2"
    for index in (2, 3, 4):
        assert source[index].error[0] == sources.MALFORMED_RECORD, source[index]
    assert "image" in source[3].error[1] and "conversations[0]" in source[4].error[1]


def test_raw_values_and_line_numbers_for_any_json_lines_file(tmp_path):
    """The reader behind benchmark files and the trainer's evaluation records: raw JSON values with their lines,
    blank lines skipped; `jsonl=True` reads a file whatever its name; a JSON array has no line numbers."""
    values = [{"question": "q1", "answers": ["a"]}, [1, 2], "text"]
    path = tmp_path / "bench.txt"
    path.write_text(json.dumps(values[0]) + "\n\n  \n" + json.dumps(values[1]) + "\n{bad\n" + json.dumps(values[2]))
    source = sources.LlavaJsonSource(str(path), jsonl=True)
    assert len(source) == 4 and [source.line_number(i) for i in range(4)] == [1, 4, 5, 6]
    assert [source.raw(i) for i in (0, 1, 3)] == values
    with pytest.raises(json.JSONDecodeError):
        source.raw(2)
    array = tmp_path / "records.json"
    array.write_text(json.dumps(RECORDS))
    as_array = sources.LlavaJsonSource(str(array))
    assert [as_array.raw(i) for i in range(len(as_array))] == RECORDS and as_array.line_number(0) is None


def test_malformed_json_array_fails_naming_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"conversations": []}, {"broken": ]')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON in record 1"):
        sources.LlavaJsonSource(str(path))
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="JSON array"):
        sources.LlavaJsonSource(str(tmp_path / "obj.json"))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        sources.LlavaJsonSource(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert len(sources.LlavaJsonSource(str(tmp_path / "empty.json"))) == 0


def test_open_sources_concatenates_files(dataset_dir):
    ann = dataset_dir / "ann"
    source = sources.open_sources(f"{ann / 'data.json'},{ann / 'data.jsonl'}", str(dataset_dir / "images"))
    assert len(source) == 6
    assert [source[i].sample_id for i in range(6)] == ["single", "text", "multi"] * 2
    assert source[4].origin.endswith("data.jsonl:line 4")
    with pytest.raises(IndexError):
        source[6]


def test_array_record_round_trip(dataset_dir, tmp_path):
    """Every record read back from the ArrayRecord shards equals the JSON record, image bytes included."""
    ann = dataset_dir / "ann" / "data.jsonl"
    with open(ann, "a", encoding="utf-8") as f:
        f.write("{broken\n")  # dropped at conversion, counted
        f.write(json.dumps({"id": "gone", "image": "coco/missing.jpg", "conversations": RECORDS[1]["conversations"]}))
    root = str(dataset_dir / "images")
    dataset_path, stats = to_arrayrecord.convert(str(ann), str(tmp_path / "tfds"), root, progress=False)
    assert stats == {"converted": 4, "malformed_json": 1, "missing_image": 1}
    assert any(name.startswith("llava_conversations-train.array_record") for name in os.listdir(dataset_path))

    json_source = sources.LlavaJsonSource(str(ann), root)
    shards = sources.ArrayRecordSource(dataset_path)
    assert len(shards) == 4
    kept = [i for i in range(len(json_source)) if json_source[i].error is None]
    for shard_index, json_index in enumerate(kept):
        original, converted = json_source[json_index], shards[shard_index]
        assert converted.conversations == original.conversations
        assert converted.sample_id == original.sample_id
        expected_bytes = [open(p, "rb").read() if os.path.exists(p) else b"" for p in original.images]
        assert converted.images == expected_bytes
    assert shards[3].images == [b""]  # missing at conversion: stored empty, skipped by the pipeline
    # Random access in any order through Grain, and the source pickles for worker processes.
    ds = grain.MapDataset.source(pickle.loads(pickle.dumps(shards)))
    assert [ds[i].sample_id for i in (2, 0, 3, 1)] == ["multi", "single", "gone", "text"]
    assert sources.open_source(dataset_path).__class__ is sources.ArrayRecordSource
    with pytest.raises(FileNotFoundError, match="not a TFDS dataset directory"):
        sources.ArrayRecordSource(str(tmp_path))


def test_to_arrayrecord_resumes_a_killed_conversion_and_checks_its_arguments(dataset_dir, tmp_path, capsys):
    """Shards of 1 record: a run killed while writing shard 2 (its temporary file half written, no counts) resumes
    there, leaves the finished shards untouched, and gives the same dataset as an uninterrupted run."""
    ann, root = str(dataset_dir / "ann" / "data.jsonl"), str(dataset_dir / "images")
    whole, stats = to_arrayrecord.convert(ann, str(tmp_path / "whole"), root, records_per_shard=1, progress=False)
    assert stats == {"converted": 3}
    out = tmp_path / "resumed"
    to_arrayrecord.convert(ann, str(out), root, records_per_shard=1, progress=False)
    shard_paths = sorted(p for p in out.iterdir() if p.name.startswith("llava_conversations-train.array_record")
                         and not p.name.endswith(".json"))
    assert len(shard_paths) == 3
    (out / "dataset_info.json").unlink()  # killed before the metadata ...
    os.rename(shard_paths[2], str(shard_paths[2]) + ".tmp")  # ... while shard 2 was still being written
    os.remove(str(shard_paths[2]) + ".stats.json")
    (out / (shard_paths[2].name + ".tmp")).write_bytes(b"half a shard")
    finished = [os.stat(p).st_mtime_ns for p in shard_paths[:2]]
    to_arrayrecord.main(["--src", ann, "--image-root", root, "--out", str(out), "--records-per-shard", "1"])
    assert "3 records, count verified" in capsys.readouterr().out
    assert [os.stat(p).st_mtime_ns for p in shard_paths[:2]] == finished
    a, b = sources.ArrayRecordSource(whole), sources.ArrayRecordSource(str(out))
    assert len(a) == len(b) == 3
    for i in range(3):
        assert (a[i].conversations, a[i].images, a[i].sample_id) == (b[i].conversations, b[i].images, b[i].sample_id)
    with pytest.raises(ValueError, match="resume with the same --src, --image-root and --records-per-shard"):
        to_arrayrecord.convert(ann, str(out), root, records_per_shard=2, progress=False)
