"""The embedding task type (pipelines/core/tasks/embedding/): its spec section, cleaning and blocking checks, every
loss, hard negatives, the whole graph through `tuneline run`, predict and export, and a real-model run on a slice of
BANKING77."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipelines.core.errors import SourceError, SpecError
from pipelines.core.spec import PipelineSpec, parse_spec
from pipelines.core.splitting import assign_splits
from pipelines.core.tasks import task_named
from pipelines.core.tasks.embedding.data import (clean_pairs, select_pairs, validate_cleaned_pairs,
                                                 validate_retrieval_splits)
from pipelines.core.training.compute import ComputeSettings
from tests.conftest import PROJECT_ROOT

SHARED = PROJECT_ROOT.parent / "shared" / "datasets"
SPEC = "source: {kind: local, path: x.csv}\nbase_model: {model: {source: local, path: m}}\n"


def spec_of(task: dict[str, Any], **sections: Any) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "emb", "source": {"kind": "local", "path": "x.csv"},
                                        "base_model": {"model": {"source": "local", "path": "m"}},
                                        "task": {"type": "embedding", **task}, **sections})


def raw(frame: pd.DataFrame, file: str = "pairs.csv") -> pd.DataFrame:
    out = frame.copy()
    out.insert(0, "source_file", file)
    out.insert(1, "source_row", range(2, len(out) + 2))
    return out


def topics(n: int = 120) -> pd.DataFrame:
    """Questions on distinct topics, each with an answer that shares its words (learnable by any model)."""
    subjects = ["river", "mountain", "piano", "violin", "tomato", "carrot", "planet", "comet", "castle", "bridge",
                "falcon", "salmon", "copper", "silver", "tulip", "maple", "glacier", "desert", "harbor", "canyon"]
    verbs = ["clean", "paint", "measure", "draw", "describe", "find"]
    rows = []
    for i in range(n):
        subject, verb = subjects[i % len(subjects)], verbs[(i // len(subjects)) % len(verbs)]
        rows.append({"query": f"how do I {verb} a {subject} number {i}",
                     "document": f"To {verb} the {subject} {i}, start with step {i % 7} and finish the {subject}."})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ the spec
def test_the_task_section_names_what_each_loss_needs() -> None:
    with pytest.raises(SpecError, match="task.loss triplet needs negatives"):
        parse_spec(SPEC + "task: {type: embedding, loss: triplet}\n", name="e", origin="e.yaml")
    with pytest.raises(SpecError, match="cosent learns from scored pairs: set task.score_column"):
        parse_spec(SPEC + "task: {type: embedding, loss: cosent}\n", name="e", origin="e.yaml")
    with pytest.raises(SpecError, match="range_max"):
        parse_spec(SPEC + "task: {type: embedding, hard_negatives: {range_min: 9, range_max: 9}}\n", name="e",
                   origin="e.yaml")
    with pytest.raises(SpecError, match="primary_metric"):
        parse_spec(SPEC + "task: {type: embedding}\nevaluation: {primary_metric: accuracy}\n", name="e",
                   origin="e.yaml")
    triplet = parse_spec(SPEC + "task: {type: embedding, loss: triplet, hard_negatives: {enabled: true}}\n",
                         name="e", origin="e.yaml")
    assert triplet.task.loss == "triplet" and triplet.task.mode == "pairs"


def test_the_task_brings_its_recipe_and_the_spec_overrides_it() -> None:
    spec = parse_spec(SPEC + "task: {type: embedding}\n", name="e", origin="e.yaml")
    assert (spec.training.learning_rate, spec.training.epochs, spec.training.warmup_fraction) == (2e-5, 1, 0.1)
    assert (spec.evaluation.primary_metric, spec.evaluation.baselines) == ("ndcg_at_10", ("base_model", "bm25"))
    own = parse_spec(SPEC + "task: {type: embedding}\ntraining: {learning_rate: 1.0e-4, epochs: 3}\n", name="e",
                     origin="e.yaml")
    assert (own.training.learning_rate, own.training.epochs, own.training.max_length) == (1e-4, 3, 128)
    classification = parse_spec(SPEC + "task: {text_column: q}\n", name="c", origin="c.yaml")
    assert classification.training.learning_rate == 1e-3  # other tasks keep the shared defaults


# ---------------------------------------------------------------------------------------- cleaning, checks
def test_a_missing_column_is_named_with_its_file_and_field() -> None:
    spec = spec_of({"query_column": "question", "document_column": "passage"})
    with pytest.raises(SourceError, match=r"pairs.csv, column 'passage': has no column 'passage' \(named by "
                                          r"task.document_column\); its columns are \['question', 'answer'\]"):
        task_named("embedding").clean(raw(pd.DataFrame({"question": ["q"], "answer": ["a"]})), spec)


def test_a_score_outside_zero_and_one_names_its_row() -> None:
    spec = spec_of({"score_column": "score", "loss": "cosent"})
    frame = raw(pd.DataFrame({"query": ["a", "b"], "document": ["x", "y"], "score": [0.5, 7]}))
    with pytest.raises(SourceError, match=r"pairs.csv, row 3, column 'score': holds 7"):
        select_pairs(frame, spec.task)


def test_empty_and_identical_pairs_block_training_and_name_their_rows() -> None:
    frame = topics(60)
    frame.loc[4, "document"] = None
    frame.loc[9, "document"] = frame.loc[9, "query"].upper() + "!"  # the same text once normalised
    frame.loc[11, "query"] = "   "
    spec = spec_of({})
    data = raw(frame)
    cleaned, log = task_named("embedding").clean(data, spec)
    assert len(cleaned) == 57 and log.metadata["dropped_empty_document"] == 1
    assert log.metadata["dropped_identical_pair"] == 1 and log.metadata["dropped_empty_query"] == 1
    report = validate_cleaned_pairs(cleaned, spec, data)
    check = report.check("pairs_are_complete")
    assert not check.passed and check.severity == "ERROR"
    rows = {(r["source_row"], r["problem"]) for r in check.examples if "source_row" in r}
    assert rows == {(6, "empty document"), (11, "query equals its document"), (13, "empty query")}
    assert "pairs.csv row 6" in check.summary()
    lenient = spec_of({"max_broken_pair_fraction": 0.1})
    assert validate_cleaned_pairs(cleaned, lenient, data).check("pairs_are_complete").passed
    clean_report = validate_cleaned_pairs(*task_named("embedding").clean(raw(topics(60)), spec)[:1], spec,
                                          raw(topics(60)))
    assert all(c.passed for c in clean_report.checks), [c.summary() for c in clean_report.checks]


# ------------------------------------------------------------------------------- a corpus file and qrels
def corpus_files(folder: Path, extra: int = 30, queries: int = 80) -> tuple[pd.DataFrame, pd.DataFrame]:
    """query -> document-id pairs in pairs.csv, and corpus.jsonl with every document plus `extra` no query names."""
    pairs = topics(queries)
    docs = [{"id": 1000 + i, "text": d} for i, d in enumerate(pairs["document"])]
    docs += [{"id": 5000 + i, "text": f"An unrelated note {i} about the weather in spring and autumn."}
             for i in range(extra)]
    qrels = pd.DataFrame({"question": pairs["query"], "doc": [1000 + i for i in range(len(pairs))]})
    corpus = pd.DataFrame(docs)
    write_files(folder, qrels, corpus)
    return qrels, corpus


def write_files(folder: Path, qrels: pd.DataFrame, corpus: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    qrels.to_csv(folder / "pairs.csv", index=False)
    corpus.to_json(folder / "corpus.jsonl", orient="records", lines=True)


def corpus_spec(**corpus: Any) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "emb", "source": {"kind": "local", "path": "pairs.csv"},
        "base_model": {"model": {"source": "local", "path": "m"}},
        "task": {"type": "embedding", "query_column": "question", "document_id_column": "doc",
                 "corpus": {"path": "corpus.jsonl", **corpus}}})


def test_a_corpus_file_with_query_relevance_pairs_is_one_retrieval_set(tmp_path: Path) -> None:
    from pipelines.core.sources import fingerprint_sources
    from pipelines.core.steps import read_raw_data, split_dataset
    from pipelines.core.tasks.embedding.retrieval import retrieval_set

    qrels, corpus = corpus_files(tmp_path)
    spec = corpus_spec()
    task = task_named("embedding")
    raw_rows, raw_log = read_raw_data(spec, tmp_path)
    assert raw_log.metadata["source"] == "pairs.csv + corpus corpus.jsonl"
    assert {f["file"] for f in raw_log.metadata["source_files"]} == {"pairs.csv", "corpus/corpus.jsonl"}
    sides = task.side_sources(spec)
    assert fingerprint_sources(spec.source, sides, tmp_path) == raw_log.params["source_sha256"]
    cleaned, _ = task.clean(raw_rows, spec)
    assert all(c.passed for c in validate_cleaned_pairs(cleaned, spec, raw_rows).checks)
    splits, split_log = split_dataset(cleaned, spec)
    assert split_log.metadata["shared_rows"] == len(corpus)
    assert sum(split_log.metadata[f"{s}_rows"] for s in ("train", "validation", "test")) == len(qrels)
    report = validate_retrieval_splits(splits, spec)
    assert all(c.passed for c in report.checks), [c.summary() for c in report.checks]
    sets = retrieval_set(splits, spec.task)
    assert set(sets.corpus_ids) == {str(i) for i in corpus["id"]}  # the documents no query names are ranked too
    assert "corpus file corpus.jsonl" in sets.corpus_origin
    test = splits[splits["split"] == "test"]
    assert [sets.relevant_of("test", k) for k in test["norm_text"]] == [{str(d)} for d in test["document_id"]]
    # The corpus is watched with the source: a changed document is new data.
    corpus.loc[len(corpus) - 1, "text"] = "A changed note."
    write_files(tmp_path, qrels, corpus)
    assert fingerprint_sources(spec.source, sides, tmp_path) != raw_log.params["source_sha256"]


def test_unknown_ids_duplicate_documents_and_a_bad_corpus_are_named(tmp_path: Path) -> None:
    from pipelines.core.steps import read_raw_data

    qrels, corpus = corpus_files(tmp_path)
    qrels.loc[3, "doc"] = 777  # no such document
    corpus.loc[len(corpus) - 1, "text"] = corpus.loc[0, "text"]  # the same text under another id
    write_files(tmp_path, qrels, corpus)
    spec = corpus_spec()
    raw_rows, _ = read_raw_data(spec, tmp_path)
    cleaned, log = task_named("embedding").clean(raw_rows, spec)
    assert log.metadata["dropped_unknown_document"] == 1
    report = validate_cleaned_pairs(cleaned, spec, raw_rows)
    broken = report.check("pairs_are_complete")
    assert not broken.passed and [(r["source_row"], r["problem"]) for r in broken.examples if "problem" in r] == [
        (5, "document id not in the corpus")]
    copies = report.check("documents_are_distinct")
    assert not copies.passed
    assert {(r["document_id"], r["same_text_as"]) for r in copies.examples if "document_id" in r} == {
        ("1000", "5029"), ("5029", "1000")}
    assert validate_cleaned_pairs(cleaned, corpus_spec(max_duplicate_fraction=0.05), raw_rows).check(
        "documents_are_distinct").passed

    write_files(tmp_path, qrels, corpus.rename(columns={"text": "body"}))
    with pytest.raises(SourceError, match=r"corpus.jsonl, column 'text': has no column 'text' \(named by "
                                          r"task.corpus.text_column\); its columns are \['id', 'body'\]"):
        task_named("embedding").clean(read_raw_data(spec, tmp_path)[0], spec)
    clash = pd.concat([corpus, pd.DataFrame([{"id": 1000, "text": "Another text."}])], ignore_index=True)
    write_files(tmp_path, qrels, clash)
    with pytest.raises(SourceError, match=r"corpus.jsonl, row \d+, column 'id': repeats document id '1000' of "
                                          r".*corpus.jsonl row 1 with another text"):
        task_named("embedding").clean(read_raw_data(spec, tmp_path)[0], spec)
    (tmp_path / "corpus.jsonl").write_text("")
    with pytest.raises(SourceError, match="corpus.jsonl"):
        read_raw_data(spec, tmp_path)
    (tmp_path / "corpus.jsonl").unlink()
    with pytest.raises(SourceError, match=r"task.corpus.path 'corpus.jsonl' does not exist"):
        read_raw_data(spec, tmp_path)
    with pytest.raises(SpecError, match="task.negative_column holds a negative document's text"):
        parse_spec(SPEC + "task: {type: embedding, negative_column: n, corpus: {path: c.jsonl}}\n", name="e",
                   origin="e.yaml")


def split(spec: PipelineSpec, frame: pd.DataFrame) -> pd.DataFrame:
    cleaned, _ = task_named("embedding").clean(raw(frame), spec)
    return assign_splits(cleaned, spec.splits, group_column="group").frame


def test_a_test_document_that_was_a_training_query_blocks_training() -> None:
    spec = spec_of({})
    splits = split(spec, topics(120))
    assert all(c.passed for c in validate_retrieval_splits(splits, spec).checks)
    train_query = splits.loc[splits["split"] == "train", "text"].iloc[0]
    test_row = splits.index[splits["split"] == "test"][0]
    splits.loc[test_row, "document"] = train_query  # the test query's document was trained on as a query
    report = validate_retrieval_splits(splits, spec)
    check = report.check("test_documents_were_not_training_queries")
    assert not check.passed and check.examples[0]["text"] == splits.loc[test_row, "text"]


def test_a_corpus_no_larger_than_k_blocks_training() -> None:
    spec = spec_of({"top_k": 50}, quality={"min_rows": 5})
    report = validate_retrieval_splits(split(spec, topics(40)), spec)
    check = report.check("corpus_is_larger_than_k")
    assert not check.passed and "at least 51 documents" in check.description
    assert validate_retrieval_splits(split(spec_of({}), topics(40)), spec_of({})).check(
        "corpus_is_larger_than_k").passed


def test_a_query_whose_label_has_no_train_text_has_no_relevant_document() -> None:
    spec = spec_of({"text_column": "text", "relevance_label_column": "intent"})
    frame = pd.DataFrame({"text": [f"{w} question {i}" for i, w in enumerate(["alpha", "beta"] * 40)],
                          "intent": ["a", "b"] * 40})
    splits = split(spec, frame)
    assert validate_retrieval_splits(splits, spec).check("every_query_has_a_relevant_document").passed
    lonely = splits.index[splits["split"] == "test"][0]
    splits.loc[lonely, "group"] = "c"  # a label with no text in the corpus (the train split)
    check = validate_retrieval_splits(splits, spec).check("every_query_has_a_relevant_document")
    assert not check.passed and check.examples[0]["text"] == splits.loc[lonely, "text"]


def test_label_mode_cleans_conflicts_and_keeps_labels() -> None:
    spec = spec_of({"text_column": "text", "relevance_label_column": "intent"})
    frame = raw(pd.DataFrame({"text": ["Lost card", "lost card!", "new pin", "new pin", None],
                              "intent": ["card", "pin", "pin", "pin", "card"]}))
    result = clean_pairs(select_pairs(frame, spec.task), spec.task, spec.cleaning)
    assert result.dropped["conflicting_labels"] == 2 and result.dropped["exact_duplicate"] == 1
    assert result.dropped["empty_query"] == 1 and result.frame["text"].tolist() == ["new pin"]


# ------------------------------------------------------------------------------------- training, each loss
def pairs_data(spec: PipelineSpec, frame: pd.DataFrame, model_dir: Path) -> pd.DataFrame:
    from pipelines.core.tasks.embedding.train import training_pairs

    base = _base_record(model_dir)
    return training_pairs(split(spec, frame), base, spec, ComputeSettings())[0]


def _base_record(model_dir: Path) -> Any:
    from pipelines.core.records import BaseModelRecord

    return BaseModelRecord(name="tiny-bert", source="local", local_path=str(model_dir), revision=None,
                           weights_sha256="0" * 64, license="apache-2.0", parameter_count=1_000_000,
                           architecture="BertModel", pooling="mean", pooling_declared_by="test", hidden_size=32,
                           max_position_embeddings=128, model_type="bert", lora_targets=("query", "value"))


TRAINING = {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "max_length": 32, "precision": "fp32",
            "logging_steps": 5}


@pytest.mark.parametrize("task", [
    {"loss": "multiple_negatives_ranking"},
    {"loss": "cached_multiple_negatives_ranking", "mini_batch_size": 4},
    {"loss": "triplet", "negative_column": "negative"},
    {"loss": "cosent", "score_column": "score"},
    {"loss": "multiple_negatives_ranking", "finetuning": "lora"},
])
def test_every_loss_trains_and_saves_a_model_sentence_transformers_loads(
        task: dict[str, Any], tiny_model_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    frame = topics(80)
    frame["negative"] = frame["document"].shift(7).fillna(frame["document"].iloc[-1])
    frame["score"] = [1.0 if i % 4 else 0.2 for i in range(len(frame))]
    spec = spec_of(task, training=TRAINING, splits={"seed": 3})
    data = pairs_data(spec, frame, tiny_model_dir)
    lines: list[str] = []
    record = task_named("embedding").train(data, _base_record(tiny_model_dir), spec, tmp_path / "ckpt",
                                           ComputeSettings(), progress=lines.append)
    assert record.task == "embedding" and record.task_data["loss"] == task["loss"]
    assert record.task_data["pairs_per_second"] > 0 and record.best_epoch == 1
    assert any("validation ndcg_at_10" in line for line in lines)
    loaded = SentenceTransformer(str(Path(record.path) / "model"))
    assert "peft" not in type(loaded[0].model).__module__  # LoRA is merged into the saved weights
    if task.get("finetuning") == "lora":
        assert record.trainable_parameters < 200_000  # adapters only, not the whole model
    assert loaded.encode(["a query"]).shape == (1, 32)


def test_hard_negatives_are_mined_from_the_corpus_and_never_relevant(tiny_model_dir: Path) -> None:
    spec = spec_of({"text_column": "text", "relevance_label_column": "intent",
                    "hard_negatives": {"enabled": True, "count": 2}}, training=TRAINING)
    words = ["card", "pin", "loan", "fee", "atm"]
    frame = pd.DataFrame({"text": [f"my {words[i % 5]} question number {i}" for i in range(150)],
                          "intent": [words[i % 5] for i in range(150)]})
    data = pairs_data(spec, frame, tiny_model_dir)
    train = data[data["split"] == "train"]
    corpus = set(train["text"])
    label_of = dict(zip(train["text"], train["group"], strict=True))
    for row in train.itertuples():
        assert len(row.negatives) == 2 and label_of[row.positive] == row.group
        for negative in row.negatives:
            assert negative in corpus and label_of[negative] != row.group


def test_batches_never_hold_two_rows_sharing_a_key() -> None:
    from datasets import Dataset

    from pipelines.core.tasks.embedding.train import disjoint_batch_sampler

    keys = tuple(frozenset({f"g{i % 6}", f"q{i}"}) for i in range(60))
    factory = pickle.loads(pickle.dumps(disjoint_batch_sampler(keys)))  # resumable checkpoints pickle it
    sampler = factory(Dataset.from_dict({"x": list(range(60))}), batch_size=4,
                                           drop_last=False, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) and all(len(b) == 4 for b in batches[:-1])
    for batch in batches:
        groups = [next(k for k in keys[i] if k.startswith("g")) for i in batch]
        assert len(set(groups)) == len(groups)
    sampler.set_epoch(1)
    assert list(sampler) != batches  # another epoch, another order


def test_length_grouped_batches_hold_texts_of_similar_length() -> None:
    from datasets import Dataset

    from pipelines.core.tasks.embedding.train import disjoint_batch_sampler

    rows = 400
    generator = np.random.default_rng(3)
    lengths = tuple(int(n) for n in generator.integers(5, 500, rows))
    keys = tuple(frozenset({f"g{i % 40}", f"q{i}"}) for i in range(rows))
    dataset = Dataset.from_dict({"x": list(range(rows))})

    def spread(factory: object) -> tuple[list[list[int]], float]:
        sampler = factory(dataset, batch_size=8, drop_last=False, seed=1)
        batches = list(sampler)
        return batches, float(np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]))

    grouped, grouped_spread = spread(pickle.loads(pickle.dumps(disjoint_batch_sampler(keys, lengths))))
    plain, plain_spread = spread(disjoint_batch_sampler(keys))
    assert grouped_spread < plain_spread / 4  # a batch's texts are of similar length
    for batch in grouped:  # and still never share a key
        assert len({i % 40 for i in batch}) == len(batch)
    assert sum(map(len, grouped)) >= rows * 0.9
    # the batches are shuffled: not in order of length
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


# --------------------------------------------------------------------------- the graph, predict and export
def tuneline(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("relevance", ["pairs", "corpus"])
def test_the_pipeline_runs_end_to_end_and_predict_and_export_use_its_model(
        relevance: str, tmp_path: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    from sentence_transformers import SentenceTransformer

    data = tmp_path / "raw" / "pairs.csv"
    data.parent.mkdir()
    topics(160).to_csv(data, index=False)
    task: dict[str, Any] = {"type": "embedding", "top_k": 3}
    documents = 160
    if relevance == "corpus":  # a corpus file with 40 documents no query names, and query -> id pairs
        documents = len(corpus_files(data.parent, extra=40, queries=160)[1])
        task.update(query_column="question", document_id_column="doc",
                    corpus={"path": str(data.parent / "corpus.jsonl")})
    specs = write_spec("emb", {
        "description": "tiny retrieval", "source": {"kind": "local", "path": str(data)},
        "task": task, "splits": {"seed": 3},
        "base_model": {"model": {"source": "local", "path": str(tiny_model_dir), "name": "tiny-bert"}},
        "training": {**TRAINING, "epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "checkpoint_every": 3}})
    home = tmp_path / "home"
    common = ("--specs-dir", str(specs), "--data-dir", str(tmp_path / "data"))
    out = tuneline("run", "--pipeline", "emb", "--json", *common, home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["task"] == "embedding" and set(summary["baselines"]) == {"base_model", "bm25"}
    report = json.loads(Path(summary["report_json"]).read_text())
    assert report["details"]["corpus_documents"] == documents and report["test_rows"] > 5
    assert [t["title"].split(" (")[0] for t in report["tables"]][:2] == [
        "Queries fine-tuning improved most", "Queries fine-tuning worsened most"]
    assert summary["ndcg_at_10"] > summary["baselines"]["base_model"]["ndcg_at_10"]  # random tiny weights

    registry = ("--data-dir", str(tmp_path / "data"))
    predicted = tuneline("predict", "--pipeline", "emb", "--version", "1", *registry, "how do I paint a river",
                         home=home)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = [line.split("\t") for line in predicted.stdout.strip().splitlines()]
    assert [line[1] for line in lines] == ["1", "2", "3"]
    scores = [float(line[2]) for line in lines]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    # The registered version is an MLflow Model: MLflow's own loader ranks the same documents.
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from resources.tracking import TrackingResource

    uri = TrackingResource(data_dir=str(tmp_path / "data")).tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    folder = client.download_artifacts(client.get_model_version("emb", "1").run_id, "model", str(tmp_path / "m"))
    served = mlflow.pyfunc.load_model(folder).predict(pd.DataFrame({"text": ["how do I paint a river"]}))
    assert served["rank"].tolist() == [1, 2, 3] and served["document"].tolist() == [line[3] for line in lines]

    exported = tmp_path / "exported"
    out = tuneline("export", "--pipeline", "emb", "--version", "1", *registry, "--output", str(exported), home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    from pipelines.core.tasks import checkpoint_from_folder
    from pipelines.core.tasks.embedding.retrieval import encode
    from pipelines.core.tasks.embedding.train import load_finetuned

    checkpoint = next((tmp_path / "data" / "checkpoints" / "emb").iterdir())
    record = checkpoint_from_folder(checkpoint)
    texts = ["how do I paint a river", "To draw the comet 3, start with step 3"]
    ours = encode(load_finetuned(record, ComputeSettings()), texts, 8).numpy()
    theirs = SentenceTransformer(str(exported)).encode(texts, normalize_embeddings=True)
    assert np.abs(ours - theirs).max() < 1e-5


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.real_model
@pytest.mark.skipif(not (SHARED / "banking77").is_dir(), reason="the shared banking77 files are not beside the "
                                                                "checkout")
def test_real_minilm_fine_tuned_on_a_banking77_slice_beats_its_zero_shot_self(
        tmp_path: Path, minilm_dir: Path) -> None:
    from pipelines.core.tasks.embedding.evaluate import evaluate_retrieval
    from pipelines.core.tasks.embedding.train import training_pairs

    train = pd.read_csv(SHARED / "banking77" / "train.csv")
    intents = sorted(train["category"].unique())[:20]
    frame = train[train["category"].isin(intents)].groupby("category").head(30)
    spec = spec_of({"text_column": "text", "relevance_label_column": "category"},
                   training={"epochs": 1, "batch_size": 16, "max_length": 32, "precision": "fp32"},
                   splits={"train": 0.6, "validation": 0.2, "test": 0.2, "seed": 5})
    base = _base_record(minilm_dir)
    data = training_pairs(split(spec, frame), base, spec, ComputeSettings())[0]
    record = task_named("embedding").train(data, base, spec, tmp_path / "ckpt", ComputeSettings(),
                                           progress=lambda _: None)
    report = evaluate_retrieval(data, record, spec, tmp_path / "report", ComputeSettings(), progress=lambda _: None)
    base_ndcg = report.baselines["base_model"]["ndcg_at_10"]
    assert report.metrics["ndcg_at_10"] > base_ndcg > 0.3
    assert not math.isnan(report.baselines["bm25"]["ndcg_at_10"])
