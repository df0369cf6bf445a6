"""`tuneline lineage`: from a registered model version back to the raw bytes, and from a data file to the
versions trained on it, read only from the records (Dagster's event log and the MLflow registry)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipelines.core.digests import combined_digest, sha256_file
from tests.conftest import tiny_spec
from tests.test_cli import tuneline


def test_lineage_of_two_versions_and_the_reverse_query(tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path,
                                                       write_spec: Callable[..., Path]) -> None:
    raw = tmp_path / "watched"
    raw.mkdir()
    first = raw / "questions.csv"
    shutil.copy(trec_slice_csv, first)
    kept_first = tmp_path / "first_copy.csv"
    shutil.copy(first, kept_first)  # the bytes of version 1's data, kept after the file changes
    spec = tiny_spec(raw, tiny_model_dir)
    spec["promotion"] = {"min_improvement": 0.5}  # version 2 does not become champion
    specs = write_spec("tiny", spec)
    home, data = tmp_path / "home", tmp_path / "data"
    common = ["--specs-dir", str(specs), "--data-dir", str(data)]
    assert tuneline("run", "--pipeline", "tiny", *common, home=home).returncode == 0

    # New data: drop 20 questions and add a second file; then materialize again.
    frame = pd.read_csv(first)
    frame.iloc[20:].to_csv(first, index=False)
    frame.iloc[:20].to_csv(raw / "more.csv", index=False)
    assert tuneline("run", "--pipeline", "tiny", *common, home=home).returncode == 0

    lineage = {}
    for version in ("1", "2"):
        out = tuneline("lineage", "--pipeline", "tiny", "--version", version, "--json", *common, home=home)
        assert out.returncode == 0, out.stderr[-2000:]
        lineage[version] = json.loads(out.stdout)
    v1, v2 = lineage["1"], lineage["2"]
    assert v2["aliases"] == []  # promotion.min_improvement 0.5: version 2 never becomes champion
    assert [f["sha256"] for f in v1["raw_files"]] == [sha256_file(kept_first)]
    assert {f["file"]: f["sha256"] for f in v2["raw_files"]} == {
        "more.csv": sha256_file(raw / "more.csv"), "questions.csv": sha256_file(first)}
    assert v1["raw_files"][0]["size"] == kept_first.stat().st_size
    # The chain goes checkpoint -> splits -> cleaned_dataset -> raw_data, each a recorded materialization.
    assert [s["asset"] for s in v1["chain"]] == ["finetuned_checkpoint", "splits", "cleaned_dataset", "raw_data"]
    assert v1["chain"][0]["sha256"] == v1["checkpoint_sha256"] and v1["chain"][1]["sha256"] == v1["data_sha256"]
    assert v1["dagster_run_id"] != v2["dagster_run_id"] and v1["mlflow_run_id"] != v2["mlflow_run_id"]
    assert v1["chain"][1]["sha256"] != v2["chain"][1]["sha256"]
    # The other half of the question: the base model each version was fine-tuned from, as its training read it.
    for item in (v1, v2):
        base = item["base_model"]
        assert (base["name"], base["source"], base["license"]) == ("tiny-bert", "local", "apache-2.0")
        weights = tiny_model_dir / "model.safetensors"  # the digest over the one weights file, named
        assert base["weights_sha256"] == combined_digest([(weights.name, sha256_file(weights))])

    # Reverse: the first file's bytes went into version 1 only; the current file into version 2 only.
    out = tuneline("lineage", "--data", str(kept_first), "--json", *common, home=home)
    assert [(m["pipeline"], m["version"]) for m in json.loads(out.stdout)["model_versions"]] == [("tiny", "1")]
    out = tuneline("lineage", "--data", str(first), "--json", *common, home=home)
    assert [m["version"] for m in json.loads(out.stdout)["model_versions"]] == ["2"]
    # The text form names every link of the chain.
    text = tuneline("lineage", "--pipeline", "tiny", "--version", "1", *common, home=home).stdout
    assert text.startswith("tiny v1") and "MLflow run" in text and "Dagster run" in text
    assert f"  fine-tuned from base model tiny-bert (local): weights sha256 {v1['base_model']['weights_sha256']}, " \
           "licence apache-2.0" in text
    assert f"questions.csv  sha256 {sha256_file(kept_first)}  {kept_first.stat().st_size} bytes" in text
