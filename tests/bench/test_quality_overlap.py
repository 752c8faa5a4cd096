"""bench/quality.py refuses to measure on test questions that the training data holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def record(question: str, answer: str = "4") -> dict:
    return {"instruction": question, "input": "", "output": f"The answer is {answer}.", "answer": answer}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data folder shaped like ../shared/data, with disjoint train and test questions."""
    write(tmp_path / "arithmetic" / "math_train.json", [record("What is 2 + 2?"), record("What is 3 + 3?", "6")])
    for name in ("multiarith_test", "singleeq_test", "gsm8k_test"):
        write(tmp_path / "arithmetic" / f"{name}.json", [record(f"How many apples in {name}?", "5")])
    return tmp_path


def test_normalisation_folds_case_and_punctuation(load_bench):
    quality = load_bench("quality")
    a = quality.normalised_question({"instruction": "What is 2+2?", "input": ""})
    b = quality.normalised_question({"instruction": "  what IS 2 + 2 ", "input": "\n"})
    assert a == b == "what is 2 2"
    # The input is part of the question: the same instruction on another input is another question.
    assert quality.normalised_question({"instruction": "Solve", "input": "x=1"}) != quality.normalised_question(
        {"instruction": "Solve", "input": "x=2"})


def test_clean_data_passes(load_bench, data):
    quality = load_bench("quality")
    domain = quality.DOMAINS["arithmetic"]
    quality.check_no_overlap(data, domain.train_sets, domain.test_sets)


def test_planted_overlap_is_refused_naming_files_and_count(load_bench, data):
    quality = load_bench("quality")
    domain = quality.DOMAINS["arithmetic"]
    # Two test questions planted in the training file, one with other case and punctuation.
    write(data / "arithmetic" / "math_train.json",
          [record("What is 2 + 2?"), record("how many apples in gsm8k_test"), record("HOW MANY APPLES IN singleeq_test!!")])
    with pytest.raises(quality.TrainTestOverlap) as caught:
        quality.check_no_overlap(data, domain.train_sets, domain.test_sets)
    message = str(caught.value)
    assert "2 test question(s)" in message
    assert "arithmetic/gsm8k_test.json (1)" in message and "arithmetic/singleeq_test.json (1)" in message
    assert "multiarith" not in message


def test_the_script_stops_before_training(data, tmp_path):
    write(data / "arithmetic" / "math_train.json", [record("How many apples in multiarith_test?")])
    bench = Path(__file__).resolve().parents[2] / "bench" / "quality.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--domains", "arithmetic", "--data", str(data),
         "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "arithmetic/multiarith_test.json (1)" in done.stderr
    # Nothing was trained or written.
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.json").exists()
