"""Using a pipeline's champion outside training, side by side in one process: batch scoring of a file (the
scored_data asset's path) against `tuneline predict`'s path on the same rows; single-request latency through
`mlflow models serve` against a call in this process; and the ONNX export against the torch model.

    .venv/bin/python benchmarks/serving.py                                   # the default TREC pipeline's champion
    .venv/bin/python benchmarks/serving.py --rows 10000 --requests 200 --skip-onnx

The rows are the pipeline's own cleaned texts, repeated to --rows. rows/s = rows / wall seconds of the whole call
(model loading included for both paths; the scoring path also reads the CSV and writes the Parquet file). Latency:
one row per request, sequential, after 5 warm-up requests; p50 and p95 of the wall time of each. The ONNX figures
compare probabilities batch by batch (128 rows, length-sorted as the torch path sorts them).
Needs a champion in the registry under --data-dir (run the pipeline first: `make demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipelines.core.hardware import resolve_compute  # noqa: E402
from pipelines.core.scoring import read_incoming, score_rows, write_scored  # noqa: E402
from pipelines.core.sections import ScoringConfig  # noqa: E402
from pipelines.core.serving import registered_record  # noqa: E402
from pipelines.core.sources import read_source  # noqa: E402
from pipelines.core.spec import load_spec  # noqa: E402
from pipelines.core.tasks import task_for  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(url: str, texts: list[str]) -> list[dict[str, object]]:
    request = urllib.request.Request(url, data=json.dumps({"inputs": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return list(json.loads(answer.read())["predictions"])


def server_latency(uri: str, tracking_uri: str, texts: list[str], requests: int, folder: Path) -> dict[str, float]:
    """p50 / p95 seconds of single-row requests to `mlflow models serve` (started here, stopped by process group)."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri,
           "PATH": f"{mlflow.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (folder / "serve.log").open("w")
    server = subprocess.Popen([str(mlflow), "models", "serve", "-m", uri, "--env-manager", "local", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        started = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError((folder / "serve.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        ready = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}/invocations"
        for text in texts[:5]:
            post(url, [text])
        times = []
        for text in (texts * (requests // len(texts) + 1))[:requests]:
            t0 = time.perf_counter()
            post(url, [text])
            times.append(time.perf_counter() - t0)
        return {"p50": percentile(times, 50), "p95": percentile(times, 95), "ready_s": ready}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="trec_questions")
    parser.add_argument("--specs-dir", default=str(ROOT / "pipelines" / "specs"))
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()

    from resources.tracking import TrackingResource  # MLflow's registry is what is being measured

    tracking = TrackingResource(data_dir=str(Path(args.data_dir).resolve()))
    found = tracking.champion(args.pipeline)
    if found is None:
        print(f"{args.pipeline} has no champion under {args.data_dir}: run the pipeline first", file=sys.stderr)
        return 2
    record = registered_record(found[1], model_version=found[0])
    task = task_for(record)
    spec = load_spec(Path(args.specs_dir) / f"{args.pipeline}.yaml")
    cleaned, _ = task.clean(read_source(spec.source, ROOT)[0], spec)
    pool = [t for t in cleaned["text"].tolist() if isinstance(t, str)]
    texts = (pool * (args.rows // len(pool) + 1))[:args.rows]
    compute = resolve_compute("auto", "fp32")
    print(f"{args.pipeline} v{record.model_version} ({record.base_model.name}, {task.name}); {len(texts):,} rows; "
          f"{compute.device}")
    figures: dict[str, float] = {}

    t0 = time.perf_counter()
    reference = task.predict(record, texts, compute, 64)
    figures["predict_rows_s"] = len(texts) / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="tuneline-serving-bench-") as scratch:
        folder = Path(scratch)
        (folder / "incoming").mkdir()
        pd.DataFrame({"text": texts}).to_csv(folder / "incoming" / "new.csv", index=False)
        cfg = ScoringConfig(incoming=str(folder / "incoming"), output=str(folder / "scored"))
        t0 = time.perf_counter()
        rows, _ = read_incoming(cfg, folder, args.pipeline)
        answer = task.predictor(record, compute)
        scored, _ = score_rows(rows, answer, task.serving, str(record.model_version), cfg.batch_size,
                               progress=lambda _: None)
        write_scored(scored, cfg.output, folder)
        figures["scoring_rows_s"] = len(texts) / (time.perf_counter() - t0)
        same = sum(a == r[task.serving.prediction] for a, r in zip(scored["prediction"], reference, strict=True))
        figures["scoring_same_answer"] = same / len(texts)

        times = []
        for text in (texts * (args.requests // len(texts) + 1))[:args.requests]:
            t0 = time.perf_counter()
            answer([text], 64)
            times.append(time.perf_counter() - t0)
        figures["in_process_p50_ms"], figures["in_process_p95_ms"] = (percentile(times, 50) * 1e3,
                                                                      percentile(times, 95) * 1e3)
        if not args.skip_server:
            served = server_latency(f"models:/{args.pipeline}/{record.model_version}", tracking.tracking_uri(),
                                    texts, args.requests, folder)
            figures["server_p50_ms"], figures["server_p95_ms"] = served["p50"] * 1e3, served["p95"] * 1e3
            figures["server_ready_s"] = served["ready_s"]

        if not args.skip_onnx and "onnx" in getattr(task, "export_formats", ()):
            from pipelines.core.tasks.classification.export import export_onnx, onnx_classifier, onnx_predict
            from pipelines.core.tasks.classification.train import load_classifier, predict_proba

            t0 = time.perf_counter()
            export_onnx(record, folder / "onnx")
            figures["onnx_export_s"] = time.perf_counter() - t0
            session, tokenizer, manifest = onnx_classifier(folder / "onnx")
            figures["onnx_parity_max_diff"] = manifest["parity"]["max_probability_difference"]
            model, torch_tokenizer = load_classifier(record)
            t0 = time.perf_counter()
            torch_probs = predict_proba(model, torch_tokenizer, texts, manifest["max_length"], compute, batch_size=128)
            figures["torch_rows_s"] = len(texts) / (time.perf_counter() - t0)
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            onnx_probs = np.zeros_like(torch_probs)
            t0 = time.perf_counter()
            for start in range(0, len(order), 128):
                batch = order[start:start + 128]
                onnx_probs[batch] = onnx_predict(session, tokenizer, [texts[i] for i in batch], manifest["max_length"])
            figures["onnx_rows_s"] = len(texts) / (time.perf_counter() - t0)
            figures["onnx_max_diff_all_rows"] = float(np.abs(onnx_probs - torch_probs).max())
            figures["onnx_same_label"] = float((onnx_probs.argmax(1) == torch_probs.argmax(1)).mean())

    print("| figure | value |\n| --- | --- |")
    for name, value in figures.items():
        print(f"| {name} | {value:.6g} |")
    print(f"scoring / predict rows/s: {figures['scoring_rows_s'] / figures['predict_rows_s']:.2f}x")
    if "server_p50_ms" in figures:
        print(f"server / in-process p50 latency: {figures['server_p50_ms'] / figures['in_process_p50_ms']:.2f}x")
    if "onnx_rows_s" in figures:
        print(f"onnx / torch rows/s: {figures['onnx_rows_s'] / figures['torch_rows_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
