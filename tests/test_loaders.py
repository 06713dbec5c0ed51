"""Benchmark loaders on small files in the real formats, bad rows and path escapes included."""

from __future__ import annotations

import base64
import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dpe.blobstore import ImageLimits
from dpe.taxonomy import KNOWN_CAPABILITIES
from producers.evaluator.loaders import BenchmarkError, load_benchmark
from producers.evaluator.service import Evaluator
from producers.evaluator.settings import BenchmarkSuite, EvaluatorConfig, EvaluatorSettings


def png(color: str = "red", size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def load(path, fmt, **suite):
    return load_benchmark(BenchmarkSuite(name="bench", path=path, format=fmt, **suite), KNOWN_CAPABILITIES)


TSV_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]


def write_tsv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(TSV_COLUMNS)
        writer.writerows(rows)


def test_vlmeval_tsv(tmp_path):
    image = b64(png())
    path = tmp_path / "mmstar.tsv"
    write_tsv(path, [
        [0, "Which colour?", "nan", "red", "green", "blue", "pink", "A", "coarse perception", image],
        [1, "Which shape?\twith a tab", "", "circle", "square", "star", "nan", "C", "Coarse Perception", image],
        [2, "Fewer options", "Look left", "left", "right", "nan", "up", "D", "spatial", image],
        [3, "Same image as row 0", "nan", "x", "y", "nan", "nan", "B", "color", "0"],
        [4, "bad base64", "nan", "x", "y", "z", "w", "A", "color", "!!not-base64!!"],
        [5, "not an image", "nan", "x", "y", "z", "w", "A", "color", b64(b"GIF89a but not really" * 10)],
        [6, "no answer", "nan", "x", "y", "z", "w", "nan", "color", image],
        [7, "answer D with 3 options", "nan", "x", "y", "z", "nan", "D", "color", image],
        [8, "astronomy", "nan", "x", "y", "z", "w", "A", "astronomy", image],
        [9, "refers to a row with no image", "nan", "x", "y", "nan", "nan", "A", "color", "77"],
        [0, "duplicate index", "nan", "x", "y", "z", "w", "A", "color", image],
    ])
    with path.open("a") as handle:
        handle.write("10\tq\tnan\tx\ty\tz\tw\tA\tcolor\t" + image + "\textra\tcells\n")

    loaded = load(path, "vlmeval_tsv", categories={"coarse perception": "existence"})

    report = loaded.report
    assert (report.rows, report.loaded) == (12, 4)
    assert dict(report.skipped) == {
        "bad_base64": 1, "undecodable_image": 1, "missing_answer": 1, "unknown_answer_letter": 1,
        "unknown_capability": 1, "missing_image": 1, "duplicate_id": 1, "malformed_row": 1,
    }
    assert dict(report.unknown_categories) == {"astronomy": 1}
    assert {example.row for example in report.examples if example.reason == "bad_base64"} == {5}
    items = {item.item_id: item for item in loaded.items}
    assert items["0"].capability == "existence" and items["0"].options == ("red", "green", "blue", "pink")
    assert items["1"].question == "Which shape?\twith a tab" and items["1"].answer == "C"
    assert items["1"].options == ("circle", "square", "star"), "rows may have fewer options"
    assert items["2"].options == ("left", "right", "up") and items["2"].answer == "C", "letters renumbered"
    assert items["2"].question == "Hint: Look left\nFewer options"
    assert items["3"].image == items["0"].image, "an index in the image cell reuses that row's image"
    assert items["0"].load_image().size == (8, 8)


def test_vlmeval_without_required_columns_is_a_file_error(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("a\tb\n1\t2\n")
    with pytest.raises(BenchmarkError, match="not a VLMEvalKit TSV"):
        load(path, "vlmeval_tsv")
    with pytest.raises(BenchmarkError, match="does not exist"):
        load(tmp_path / "absent.tsv", "vlmeval_tsv")


def test_pope_jsonl_with_bad_rows_and_path_escapes(tmp_path):
    bench = tmp_path / "pope"
    (bench / "images").mkdir(parents=True)
    (bench / "images" / "cat.png").write_bytes(png("gray"))
    (tmp_path / "secret.png").write_bytes(png("black"))
    (bench / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    (bench / "images" / "broken.png").write_bytes(png()[:30])
    lines = [
        {"question_id": 1, "image": "images/cat.png", "text": "Is there a cat in the image?", "label": "yes"},
        {"question_id": 2, "image": "images/cat.png", "text": "Is there a dog in the image?", "label": "no"},
        {"question_id": 3, "image": "../secret.png", "text": "q", "label": "no"},
        {"question_id": 4, "image": str(tmp_path / "secret.png"), "text": "q", "label": "no"},
        {"question_id": 5, "image": "images/link.png", "text": "q", "label": "no"},
        {"question_id": 6, "image": "images/none.png", "text": "q", "label": "no"},
        {"question_id": 7, "image": "images/cat.png", "text": "q", "label": "maybe"},
        {"question_id": 8, "image": "images/cat.png", "label": "yes"},
        {"question_id": 9, "image": "images/broken.png", "text": "q", "label": "yes"},
        {"question_id": "bad id!", "image": "images/cat.png", "text": "q", "label": "yes"},
    ]
    path = bench / "pope.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n[1, 2]\n")

    loaded = load(path, "pope_jsonl")

    assert [(item.item_id, item.answer, item.capability, item.answer_type) for item in loaded.items] == [
        ("1", "yes", "existence", "yes_no"), ("2", "no", "existence", "yes_no")]
    assert dict(loaded.report.skipped) == {
        "image_outside_folder": 3, "missing_image": 1, "bad_answer": 1, "missing_question": 1,
        "undecodable_image": 1, "bad_id": 1, "malformed_row": 2,
    }
    assert loaded.report.rows == 12


def test_generic_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(png("blue"))
    rows = [
        {"id": "c1", "question": "Colour?", "answer": "blue", "answer_type": "choice", "options": ["red", "blue"],
         "image": "a.png", "capability": "color"},
        {"id": "n1", "question": "Value?", "answer": "3.5", "answer_type": "number", "tolerance": 0.5,
         "image": "a.png", "category": "Chart"},
        {"question": "Word?", "answer": "cat", "answer_type": "text", "image": "a.png", "category": "text_reading"},
        {"id": "c1", "question": "dup", "answer": "A", "answer_type": "choice", "options": ["x", "y"], "image": "a.png",
         "capability": "color"},
        {"id": "x1", "question": "q", "answer": "C", "answer_type": "choice", "options": ["x", "y"], "image": "a.png",
         "capability": "color"},
        {"id": "x2", "question": "q", "answer": "1", "answer_type": "essay", "image": "a.png", "capability": "color"},
        {"id": "x3", "question": "q", "answer_type": "number", "image": "a.png", "capability": "color"},
        {"id": "x4", "question": "q", "answer": "many", "answer_type": "number", "image": "a.png",
         "capability": "color"},
        {"id": "x5", "question": "q", "answer": "1", "answer_type": "number", "image": "a.png",
         "capability": "astrology"},
    ]
    path = tmp_path / "generic.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")

    loaded = load(path, "jsonl", categories={"chart": "chart"})

    items = {item.item_id: item for item in loaded.items}
    assert sorted(items) == ["3", "c1", "n1"], "a row without an id is numbered by position"
    assert (items["c1"].answer, items["c1"].options) == ("B", ("red", "blue")), "an option's text becomes its letter"
    assert (items["n1"].capability, items["n1"].tolerance) == ("chart", 0.5)
    assert dict(loaded.report.skipped) == {
        "duplicate_id": 1, "unknown_answer_letter": 1, "unknown_answer_type": 1, "missing_answer": 1,
        "bad_answer": 1, "unknown_capability": 1,
    }


def test_generic_parquet_with_paths_and_embedded_bytes(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "b.png").write_bytes(png("green"))
    table = pa.table({
        "id": ["p1", "p2", "p3", "p4"],
        "question": ["Is it green?", "How many?", "Is it red?", "q"],
        "answer": ["yes", "2", "no", "yes"],
        "answer_type": ["yes_no", "number", "yes_no", "yes_no"],
        "image": [{"bytes": png("green"), "path": None}, {"bytes": None, "path": "img/b.png"},
                  {"bytes": b"\x89PNG broken", "path": None}, {"bytes": None, "path": "../../etc/passwd"}],
        "capability": ["color", "counting", "color", "color"],
    })
    path = tmp_path / "bench.parquet"
    pq.write_table(table, path)

    loaded = load(path, "parquet")

    assert [item.item_id for item in loaded.items] == ["p1", "p2"]
    assert loaded.items[1].load_image().getpixel((0, 0)) == (0, 128, 0)
    assert dict(loaded.report.skipped) == {"undecodable_image": 1, "image_outside_folder": 1}
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(BenchmarkError, match="not a readable Parquet"):
        load(tmp_path / "junk.parquet", "parquet")


def test_oversized_images_are_refused_before_decoding(tmp_path):
    (tmp_path / "big.png").write_bytes(png(size=64))
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "1", "answer_type": "number", "image": "big.png",
                                "capability": "counting"}) + "\n")
    suite = BenchmarkSuite(name="b", path=path, format="jsonl")
    loaded = load_benchmark(suite, KNOWN_CAPABILITIES, ImageLimits(max_pixels=100))
    assert dict(loaded.report.skipped) == {"image_too_large": 1}


def test_evaluator_samples_benchmarks_afresh_per_version(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "question": "q", "answer": str(i), "answer_type": "number",
                                        "image": "a.png", "capability": "counting"}) + "\n" for i in range(40)))
    suite = BenchmarkSuite(name="b", path=path, format="jsonl", sample=5)
    settings = EvaluatorSettings(synthetic=None, benchmarks=[suite])
    evaluator = Evaluator(settings, ImageLimits())
    versions = [[item.item_id for item in evaluator.items_for(version)] for version in (1, 2, 1)]
    assert len(versions[0]) == 5 and versions[0] == versions[2] and versions[0] != versions[1]


def test_mapping_to_an_unknown_capability_is_a_settings_error(tmp_path):
    suite = BenchmarkSuite(name="b", path=tmp_path / "b.tsv", format="vlmeval_tsv", categories={"math": "astrology"})
    with pytest.raises(ValueError, match=r"maps categories to \['astrology'\], which are not in capabilities"):
        EvaluatorConfig(evaluator=EvaluatorSettings(benchmarks=[suite]))

