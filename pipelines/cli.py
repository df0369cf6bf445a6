"""The `tuneline` command: run a pipeline in the Dagster instance the UI uses, validate specs, open the UI."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import Any

POSTGRES_URL_VARIABLE = "TUNELINE_DAGSTER_POSTGRES_URL"
DAGSTER_YAML = """# Written by tuneline: the Dagster instance shared by `tuneline run` and `make ui`. tuneline rewrites this file
# when TUNELINE_DAGSTER_POSTGRES_URL is set or unset, unless you edit it (then it is yours and left alone).
telemetry:
  enabled: false
{storage}concurrency:
  runs:
    # Runs started from the UI, schedules and sensors queue beyond this many (sized to this machine's cores).
    max_concurrent_runs: {runs}
  pools:
    # The `training` pool (finetuned_checkpoint): one training at a time, so two never fight for the cores.
    default_limit: 1
"""
POSTGRES_STORAGE = f"""storage:
  # Runs, event logs, schedules, asset checks and concurrency slots in PostgreSQL. The URL (with its password)
  # is read from the environment when the instance starts, never written here.
  postgres:
    postgres_url:
      env: {POSTGRES_URL_VARIABLE}
"""


def _positive_int(value: str) -> int:
    """argparse type: a whole number of at least 1 (argparse names the option in its error)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {number}")
    return number


def postgres_url_for_dagster(url: str) -> str:
    """The instance's PostgreSQL URL with the driver named: SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3,
    which dagster-postgres does not use (it brings psycopg2). Anything but a PostgreSQL URL is refused, naming the
    variable (never the URL: it may hold a password)."""
    from pipelines.core.errors import InstanceError

    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme not in ("postgresql", "postgres", "postgresql+psycopg2") or not rest:
        raise InstanceError(f"{POSTGRES_URL_VARIABLE} must be a PostgreSQL URL, "
                         "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (it starts with "
                         f"{scheme + '://' if sep else 'something else'})")
    userinfo = rest.rpartition("@")[0]
    if any(c in userinfo for c in "@/#?"):
        raise InstanceError(f"the user or password in {POSTGRES_URL_VARIABLE} holds '@', '/', '#' or '?': "
                            "percent-encode them (%40, %2F, %23, %3F), or the URL's host is misread")
    return f"postgresql+psycopg2://{rest}"


# The file the previous release wrote (SQLite, no storage section): still tuneline's own, so it may be rewritten.
PREVIOUS_DAGSTER_YAML = """# Written by tuneline: the Dagster instance shared by `tuneline run` and `make ui`.
telemetry:
  enabled: false
concurrency:
  runs:
    # Runs started from the UI, schedules and sensors queue beyond this many (sized to this machine's cores).
    max_concurrent_runs: {runs}
  pools:
    # The `training` pool (finetuned_checkpoint): one training at a time, so two never fight for the cores.
    default_limit: 1
"""


SQLITE_EVENT_LOG = """event_log_storage:
  # Dagster's SQLite event log, with atomic claims of concurrency-pool slots (pipelines/instance.py): two trainings
  # that reach the `training` pool at the same moment cannot both take its one slot.
  module: pipelines.instance
  class: AtomicClaimSqliteEventLogStorage
  config:
    base_dir: {base_dir}
"""


def _sqlite_storage(home: Path) -> str:
    return SQLITE_EVENT_LOG.format(base_dir=json.dumps(str(home / "history" / "runs")))


def _tunelines_own_yaml(home: Path) -> set[str]:
    """Every dagster.yaml text tuneline has written, exactly: only these are rewritten; an edited one is the user's."""
    storages = ("", POSTGRES_STORAGE, _sqlite_storage(home))  # "": SQLite before its event log had atomic claims
    return ({DAGSTER_YAML.format(runs=r, storage=st) for r in range(1, 5) for st in storages}
            | {PREVIOUS_DAGSTER_YAML.format(runs=r) for r in range(1, 5)})


def dagster_yaml(home: Path) -> str:
    """The dagster.yaml tuneline writes for the instance at `home`: SQLite files in that folder (the default), or
    PostgreSQL when TUNELINE_DAGSTER_POSTGRES_URL is set; the run queue and the `training` pool in both."""
    postgres = bool(os.environ.get(POSTGRES_URL_VARIABLE))
    return DAGSTER_YAML.format(runs=max(1, min(4, (os.cpu_count() or 2) // 2)),
                               storage=POSTGRES_STORAGE if postgres else _sqlite_storage(home))


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def ensure_dagster_home() -> Path:
    """Use $DAGSTER_HOME, or <project>/.dagster_home, with the dagster.yaml of dagster_yaml(): written when missing,
    rewritten when tuneline wrote it for the other storage; a dagster.yaml of the user's own is left as it is."""
    from pipelines.core.files import write_bytes_atomic

    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if url:
        os.environ[POSTGRES_URL_VARIABLE] = postgres_url_for_dagster(url)  # what the instance (and its children) read
    home = Path(os.environ.get("DAGSTER_HOME") or project_root() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    wanted = dagster_yaml(home)
    current = config.read_text(encoding="utf-8") if config.exists() else None
    if current is None or (current != wanted and current in _tunelines_own_yaml(home)):
        write_bytes_atomic(config, wanted.encode("utf-8"))
    elif current != wanted and url and "postgres" not in current:
        print(f"warning: {POSTGRES_URL_VARIABLE} is set, but {config} is not one tuneline wrote and has no "
              "postgres storage: the instance stays where that file says", file=sys.stderr)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def shared_instance() -> Any:
    """The Dagster instance at $DAGSTER_HOME. Its SQLite storage is created (and migrated) under a file lock: two
    `tuneline run`s started together on a fresh instance would otherwise both stamp its schema."""
    import fcntl

    import dagster as dg

    home = ensure_dagster_home()
    with (home / ".tuneline-init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            instance = dg.DagsterInstance.get()
            instance.get_runs(limit=1)  # the run, event log and schedule storages exist and are migrated
            instance.get_asset_keys(limit=1)
            instance.all_instigator_state()
        except Exception as exc:
            url = os.environ.get(POSTGRES_URL_VARIABLE)
            if not url:
                raise
            from pipelines.core.errors import InstanceError

            raise InstanceError(f"the Dagster instance's PostgreSQL {_where(url)} ({POSTGRES_URL_VARIABLE}) cannot be "
                                f"used: {_without_password(exc, url)}") from None
        return instance


def _where(url: str) -> str:
    """'database 'x' at host:port' of a URL, never its password (a URL that does not parse says so)."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        return f"database {parsed.database!r} at {parsed.host}:{parsed.port or 5432}"
    except Exception:  # noqa: BLE001 - an unparsable URL is reported as such, without echoing it
        return "database (the URL does not parse)"


def _without_password(exc: BaseException, url: str) -> str:
    """The error's first line with every form of the URL's password (raw, percent-decoded) masked."""
    from urllib.parse import unquote

    cause = exc.__cause__ or exc
    text = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
    userinfo = url.partition("://")[2].rpartition("@")[0]
    password = userinfo.partition(":")[2]
    for secret in {password, unquote(password)} - {""}:
        text = text.replace(secret, "***")
    return text


def _print_summary(summary: dict[str, Any], run_id: str) -> None:
    baselines = summary["baselines"]
    names = ["fine-tuned", *baselines]
    metrics = summary["metric_names"]  # the task's, in its order
    print(f"\n{summary['pipeline']}: base model {summary.get('base_model', '')}, chosen among "
          f"{len(summary.get('selection', []))} candidate(s):")
    for row in summary.get("selection", []):
        score = "" if row.get("probe_value") is None else f" {row['probe_metric']} {row['probe_value']:.4f};"
        print(f"  {row['name']}: {row['verdict']};{score} {row['reason']}")
    doctor = summary.get("doctor")
    if doctor:
        print(f"\n{summary['pipeline']}: data doctor ({doctor['model']}): {doctor['summary']}")
        print(f"  learning curve: {doctor['more_data']}")
        if doctor.get("suspects_csv"):
            print(f"  label suspects, most suspicious first: {doctor['suspects_csv']}")
    print(f"\n{summary['pipeline']}: evaluation on {summary['test_rows']} test rows (Dagster run {run_id})")
    print("  " + "metric".ljust(22) + "".join(n.rjust(16) for n in names))
    for metric in metrics:
        values = [summary[metric], *(baselines[b].get(metric, math.nan) for b in baselines)]
        print("  " + metric.ljust(22) + "".join(f"{v:16.4f}" if v == v else "—".rjust(16) for v in values))
    for name, won in summary["beats_baselines"].items():
        verdict = "beats" if won else "does NOT beat"
        print(f"  the fine-tuned model {verdict} {name} on {summary['primary_metric']}")
    if summary.get("verdict"):
        print(f"  {summary['verdict']}")
    print(f"  promotion: {summary['promotion_reason']}")
    print(f"  report: {summary['report_html']}")
    print("Open the Dagster UI with `make ui` (http://127.0.0.1:3000) to see every step, its metadata and lineage;")
    print("the MLflow UI with `make mlflow-ui` (http://127.0.0.1:5000) for runs and registered models.")


def _pipeline_job(args: argparse.Namespace) -> tuple[Any, Any, Any] | int:
    """The definitions, the pipeline's job and the shared instance, with the libraries quiet and tuneline's
    terminal logger; or the exit code after a clear error (a broken spec, an unknown pipeline)."""
    if args.specs_dir and not Path(args.specs_dir).is_dir():
        print(f"error: --specs-dir {args.specs_dir}: no such folder (expected the folder of spec files)",
              file=sys.stderr)
        return 2
    from pipelines.core.files import ensure_writable

    ensure_writable(Path(args.data_dir).resolve() if args.data_dir else project_root() / "data")  # before any write
    ensure_dagster_home()
    from pipelines.quiet import VERBOSE_VARIABLE, quiet_libraries

    if args.verbose:  # every library's bars and warnings, here and in the processes this run starts
        os.environ[VERBOSE_VARIABLE] = "1"
    # Before the definitions import the libraries: tqdm reads TQDM_DISABLE once, when it is first imported.
    quiet_libraries()
    from pipelines.definitions import DATA_DIR, SPECS_DIR, build_definitions
    from pipelines.terminal import terminal_logger

    defs = build_definitions(specs_dir=Path(args.specs_dir) if args.specs_dir else SPECS_DIR,
                             data_dir=Path(args.data_dir).resolve() if args.data_dir else DATA_DIR,
                             loggers={"console": terminal_logger})
    job_name = f"{args.pipeline}_job"
    # The pipelines are the specs (each job carries its pipeline's name): a scoring job is not a pipeline.
    known = sorted({str(j.tags["tuneline/pipeline"]) for j in defs.jobs or [] if "tuneline/pipeline" in (j.tags or {})})
    broken = _broken_spec(Path(args.specs_dir) if args.specs_dir else SPECS_DIR, args.pipeline)
    if broken is not None:
        print(f"error: {broken}", file=sys.stderr)
        return 2
    if args.pipeline not in known:
        print(f"error: {_unknown_pipeline(args.pipeline, known)}", file=sys.stderr)
        return 2
    instance = shared_instance()
    _fail_abandoned_runs(instance, job_name)
    return defs, defs.resolve_job_def(job_name), instance


def _unknown_pipeline(name: str, known: list[str]) -> str:
    """No pipeline `name`: the closest names (a typo, another case, '-' for '_') and every pipeline there is."""
    import difflib

    if not known:
        return f"no pipeline {name!r}: the specs folder has no valid pipeline spec (tuneline init writes one)"
    folded = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower().replace("-", "_").replace(" ", "_"), list(folded), n=1,
                                      cutoff=0.6)
    hint = f" (did you mean {folded[close[0]]!r}?)" if close else ""
    return f"no pipeline {name!r}{hint}; pipelines are: {', '.join(sorted(known))}"


def _execute(job: Any, instance: Any, args: argparse.Namespace, **kwargs: Any) -> Any:
    """Run the job in this process; with --json, stdout carries the JSON object alone and progress goes to
    stderr. One line per progress message; failures are summed up afterwards, their details stay in the UI."""
    with redirect_stdout(sys.stderr) if args.json else nullcontext():
        return job.execute_in_process(instance=instance, raise_on_error=False, tags=_process_tags(),
                                      run_config={"loggers": {"console": {"config": {
                                          "log_level": "INFO", "verbose": bool(args.verbose)}}}},
                                      **kwargs)


DATA_ASSETS = ("raw_data", "cleaned_dataset", "splits")  # what `tuneline check` materializes, with their checks


def cmd_check(args: argparse.Namespace) -> int:
    """Materialize only the data assets (raw_data, cleaned_dataset, splits) and their checks, no training, and
    say whether the data is ready: exit 0 when every blocking check passed, 1 when one failed."""
    import dagster as dg

    from pipelines.terminal import check_lines, error_block

    found = _pipeline_job(args)
    if isinstance(found, int):
        return found
    defs, job, instance = found
    keys = [dg.AssetKey([args.pipeline, name]) for name in DATA_ASSETS]
    result = _execute(job, instance, args, asset_selection=keys)
    summary = check_lines(result, args.pipeline)
    if args.json:
        print(json.dumps({**summary, "run_id": result.run_id}))
    else:
        print("\n".join(summary["lines"]))
    if not result.success:
        # The failed checks are in the lines above (with --json, only here).
        block = error_block(result, args.pipeline, list(DATA_ASSETS), args.debug, checks=bool(args.json))
        print("\n".join(block), file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import dagster as dg

    from pipelines.terminal import error_block, warning_lines

    found = _pipeline_job(args)
    if isinstance(found, int):
        return found
    defs, job, instance = found
    result = _execute(job, instance, args)
    if not result.success:
        planned = [k.path[-1] for k in defs.resolve_asset_graph().toposorted_asset_keys if k.path[0] == args.pipeline]
        print("\n".join(error_block(result, args.pipeline, planned, args.debug)), file=sys.stderr)
        return 1
    for line in warning_lines(result):
        print(line, file=sys.stderr)
    report = result.asset_value(dg.AssetKey([args.pipeline, "evaluation_report"]))
    base = result.asset_value(dg.AssetKey([args.pipeline, "base_model"]))
    summary = {**report.summary(), "base_model": base.name, "selection": list(base.selection)}
    if "doctor" in report.details:  # the data doctor looked at these splits
        summary["doctor"] = {**report.details["doctor"], "suspects_csv": report.files.get("doctor_label_suspects")}
    if args.json:
        print(json.dumps({**summary, "run_id": result.run_id}))
    else:
        _print_summary(summary, result.run_id)
    return 0


def _process_tags() -> dict[str, str]:
    return {"tuneline/host": socket.gethostname(), "tuneline/pid": str(os.getpid())}


def _fail_abandoned_runs(instance: Any, job_name: str) -> None:
    """Runs of `job_name` that `tuneline run` started on this machine and whose process is gone (killed, crashed)
    are still STARTED in the instance: report them failed, so the UI does not show them running forever, and free
    the concurrency-pool slots they held."""
    import dagster as dg

    from pipelines.core.files import process_alive

    host = socket.gethostname()
    for run in instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.STARTED],
                                                       tags={"tuneline/host": host})):
        pid = int(run.tags.get("tuneline/pid", "0") or 0)
        if pid and not process_alive(pid):
            instance.report_run_failed(run, message=f"the process that ran it (pid {pid} on {host}) ended without "
                                                    "finishing it: killed or crashed")
            # Its claim on the `training` pool died with it: free the slot, or no training would start again.
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            print(f"note: Dagster run {run.run_id} was left running by process {pid}, which is gone: marked failed",
                  file=sys.stderr)


def _tracking(args: argparse.Namespace) -> Any:
    from pipelines.definitions import DATA_DIR
    from resources.tracking import TrackingResource

    return TrackingResource(data_dir=str(Path(args.data_dir).resolve() if args.data_dir else DATA_DIR))


def _registered_checkpoint(args: argparse.Namespace, tracking: Any, version: str | None = None) -> Any:
    """The champion (or `version`) of the pipeline's registered model, downloaded and loaded as a record."""
    from pipelines.core.errors import TunelineError
    from pipelines.core.serving import registered_record

    found = tracking.model_version(args.pipeline, version) if version else tracking.champion(args.pipeline)
    if found is None:
        registered = [v["version"] for v in tracking.registered_versions(args.pipeline)]
        if registered:  # trained, but no version beat the baselines (or the champion) to be promoted
            raise TunelineError(
                f"pipeline {args.pipeline!r} has {len(registered)} registered version(s) ({', '.join(registered)}) "
                f"in the model registry at {tracking.tracking_uri()}, none of them promoted to champion (the "
                f"evaluation report says why); pass --version {registered[-1]} to use the newest anyway")
        raise TunelineError(f"the model registry at {tracking.tracking_uri()} has no model for pipeline "
                            f"{args.pipeline!r}; run `tuneline run --pipeline {args.pipeline}` first")
    return registered_record(found[1], model_version=found[0])


def _column_fields() -> list[str]:
    """Every registered task type's column fields (text_column, messages_column, ...), for init's options."""
    from pipelines.init_spec import starters

    return sorted({f for _, starter in starters() for f in starter.column_fields})


def _column_assignment(value: str) -> str:
    field_name, sep, column = value.partition("=")
    if not sep or not field_name.strip() or not column:
        raise argparse.ArgumentTypeError(f"expected FIELD=NAME (e.g. label_column=intent), got {value!r}")
    return value


def cmd_predict(args: argparse.Namespace) -> int:
    """Answer with the registry's champion of a pipeline: labels for a classifier, responses for a chat model."""
    from pipelines.core.errors import TunelineError
    from pipelines.core.tasks import task_for
    from resources.compute import ComputeResource

    try:
        record = _registered_checkpoint(args, _tracking(args), args.version)
        rows = task_for(record).predict(record, args.texts, ComputeResource().settings("fp32"), args.max_new_tokens)
    except TunelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = f"{args.pipeline} v{record.model_version}"
    if args.json:
        print(json.dumps([{**row, "model": model} for row in rows], ensure_ascii=False))
        return 0
    task = task_for(record)
    for row in rows:
        print(task.prediction_line(row))
    print(f"({'version' if args.version else 'champion'}: {model})", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the model in a format other tools load (a classifier: ONNX; a chat model: base and adapter merged),
    checked against the registered model before the folder appears."""
    from pipelines.core.errors import TunelineError
    from pipelines.core.tasks import task_for

    try:
        record = _registered_checkpoint(args, _tracking(args), args.version)
        task = task_for(record)
        if not task.export_formats:
            raise TunelineError(f"{args.pipeline} is a {task.name} pipeline, which has no export format")
        fmt = args.format or task.export_formats[0]
        if fmt not in task.export_formats:
            raise TunelineError(f"--format {fmt} does not fit {args.pipeline}, a {task.name} pipeline: use "
                                f"{' or '.join(task.export_formats)}")
        out = task.export(record, Path(args.output), fmt)
    except TunelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.pipeline} v{record.model_version} as {fmt} to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a registered version (default: the champion) with `mlflow models serve` on this machine's Python."""
    from pipelines.core.errors import TunelineError

    tracking = _tracking(args)
    try:
        number, uri = tracking.served_version(args.pipeline, args.version)
    except TunelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow), "models", "serve", "-m", uri, "--env-manager", "local", "--host", args.host,
            "--port", str(args.port), "--workers", str(args.workers)]
    # The registry tuneline uses (the embedded store or $TUNELINE_TRACKING_URI; MLflow reads the same credential
    # variables), and this environment's bin folder first: MLflow starts uvicorn by name.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "MLFLOW_REGISTRY_URI": tracking.tracking_uri(),
           "PATH": f"{mlflow.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    url = f"http://{args.host}:{args.port}"
    print(f"serving {args.pipeline} v{number}{'' if args.version else ' (champion)'} at {url}/invocations "
          f"(health: {url}/ping); POST {{\"inputs\": [\"...\"]}} or {{\"dataframe_records\": [{{\"text\": \"...\"}}]}}",
          file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.execve(argv[0], argv, env)
    return 0  # not reached


def cmd_lineage(args: argparse.Namespace) -> int:
    """Which bytes produced a model version, or which versions a data file went into (from the records)."""
    ensure_dagster_home()
    from pipelines.core.digests import sha256_file
    from pipelines.definitions import SPECS_DIR, build_definitions
    from pipelines.lineage import LineageError, data_chains, format_lineage, format_scorings, raw_files, scorings, \
        version_lineage

    tracking = _tracking(args)
    tasks = data_chains(build_definitions(specs_dir=Path(args.specs_dir) if args.specs_dir else SPECS_DIR))
    if args.pipeline and args.pipeline not in tasks:
        print(f"error: {_unknown_pipeline(args.pipeline, list(tasks))}", file=sys.stderr)
        return 2
    instance = shared_instance()

    def upstream(pipeline: str, number: str) -> dict[str, Any]:
        """The lineage of the version a model started from (through the registry and the event log)."""
        found = [v for v in tracking.registered_versions(pipeline) if v["version"] == number]
        if not found or pipeline not in tasks:
            raise LineageError(f"started from {pipeline} v{number}, which the model registry (or the specs) no "
                               "longer has")
        return version_lineage(instance, pipeline, found[0], tasks[pipeline], upstream)

    if args.data:
        path = Path(args.data)
        if not path.is_file():
            print(f"error: --data {path}: no such file", file=sys.stderr)
            return 2
        sha = sha256_file(path)
        matches, scored_by = [], []
        for pipeline in [args.pipeline] if args.pipeline else sorted(tasks):
            for version in tracking.registered_versions(pipeline):
                try:
                    item = version_lineage(instance, pipeline, version, tasks[pipeline], upstream)
                except LineageError as exc:
                    print(f"warning: {pipeline} v{version['version']}: {exc}", file=sys.stderr)
                    continue
                files = [f for f in raw_files(item) if f["sha256"] == sha]
                if files:
                    matches.append({"pipeline": pipeline, "version": item["version"], "aliases": item["aliases"],
                                    "dagster_run_id": item["dagster_run_id"], "recorded_as": files[0]["file"]})
            for scoring in scorings(instance, pipeline):  # the other direction: which versions scored this file
                for f in scoring["files"]:
                    if f["sha256"] == sha:
                        scored_by.append({"pipeline": pipeline, "version": scoring["model_version"],
                                          "dagster_run_id": scoring["dagster_run_id"], "recorded_as": f["file"],
                                          "output": f["output"], "rows": f["rows"], "scored": f["scored"]})
        if args.json:
            print(json.dumps({"file": str(path), "sha256": sha, "model_versions": matches, "scored_by": scored_by}))
            return 0
        if matches:
            print(f"{path} (sha256 {sha}) went into:")
            for m in matches:
                aliases = f" @{', @'.join(m['aliases'])}" if m["aliases"] else ""
                print(f"  {m['pipeline']} v{m['version']}{aliases}  (recorded as {m['recorded_as']}, Dagster run "
                      f"{m['dagster_run_id']})")
        if scored_by:
            print(f"{path} (sha256 {sha}) was scored by:")
            for m in scored_by:
                print(f"  {m['pipeline']} v{m['version']}: {m['scored']} of {m['rows']} rows -> {m['output']}  "
                      f"(recorded as {m['recorded_as']}, Dagster run {m['dagster_run_id']})")
        if not matches and not scored_by:
            print(f"{path} (sha256 {sha}) is in the raw data of no registered model version and was never scored")
        return 0
    if not args.pipeline:
        print("error: give --pipeline NAME (with --version N) or --data PATH", file=sys.stderr)
        return 2
    versions = tracking.registered_versions(args.pipeline)
    if not versions:
        print(f"error: the model registry at {tracking.tracking_uri()} has no versions of {args.pipeline!r}",
              file=sys.stderr)
        return 2
    if args.version:
        chosen = [v for v in versions if v["version"] == str(args.version)]
        if not chosen:
            print(f"error: {args.pipeline} has no version {args.version}; versions are "
                  f"{', '.join(v['version'] for v in versions)}", file=sys.stderr)
            return 2
        version = chosen[0]
    else:
        version = next((v for v in versions if "champion" in v["aliases"]), versions[-1])
    try:
        item = version_lineage(instance, args.pipeline, version, tasks[args.pipeline], upstream)
    except LineageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scored = [x for x in scorings(instance, args.pipeline) if x["model_version"] == version["version"]]
    if args.json:
        print(json.dumps({**item, "scored": scored}))
    else:
        print(format_lineage(item))
        if scored:
            print(f"scored with v{version['version']}:")
            print("\n".join(format_scorings(scored)))
    return 0


def _broken_spec(folder: Path, pipeline: str) -> Any:
    """The SpecError of the pipeline's spec file when it does not validate, else None."""
    from pipelines.core.spec import read_specs

    return next((e for e in read_specs(folder).broken if Path(e.path).stem == pipeline), None)


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate spec files: every valid one says ok, every broken one lists all its problems with their lines."""
    from pipelines.core.errors import SpecError
    from pipelines.core.spec import SpecFolder, load_spec, read_specs
    from pipelines.definitions import SPECS_DIR

    if args.files:
        specs, broken = [], []
        for file in args.files:
            try:
                specs.append(load_spec(Path(file)))
            except SpecError as exc:
                broken.append(exc)
        found = SpecFolder(tuple(specs), tuple(broken))
    else:
        found = read_specs(Path(args.specs_dir) if args.specs_dir else SPECS_DIR)
    for spec in found.specs:
        print(f"ok: {spec.name} (spec hash {spec.spec_hash})")
    for error in found.broken:
        print(f"error: {error}", file=sys.stderr)
    return 2 if found.broken else 0


def cmd_list(args: argparse.Namespace) -> int:
    """The pipelines, their task and candidate models; broken spec files are listed with their first problem."""
    from pipelines.core.spec import read_specs
    from pipelines.definitions import SPECS_DIR

    found = read_specs(Path(args.specs_dir) if args.specs_dir else SPECS_DIR)
    for spec in found.specs:
        models = ", ".join(getattr(m, "name", None) or getattr(m, "path", "")
                           for m in spec.base_model.resolved_candidates)
        print(f"{spec.name}\t{spec.task.type}\t{models}")
    for error in found.broken:
        more = f" (+{len(error.problems) - 1} more)" if len(error.problems) > 1 else ""
        print(f"{Path(error.path).stem}\tBROKEN\t{error.path}: {error.problems[0]}{more}; see `tuneline validate`")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write a first spec for a data file or folder: the task and columns inferred, every section commented, the
    file validated by the project's own loader before it is written; then say what to check and how to run it."""
    from pipelines.init_spec import init_spec, report_lines

    columns, options = {}, {}
    for given in args.column or []:
        field_name, _, column = given.partition("=")
        columns[field_name.strip()], options[field_name.strip()] = column, f"--column {given}"
    for field_name in _column_fields():  # the shorthands: --text-column NAME for --column text_column=NAME
        column = getattr(args, f"column__{field_name}", None)
        if column is not None:
            columns[field_name], options[field_name] = column, f"--{field_name.replace('_', '-')}"
    out = init_spec(Path(args.data), name=args.name, specs_dir=Path(args.specs_dir) if args.specs_dir else None,
                    force=args.force, columns=columns, column_options=options)
    print("\n".join(report_lines(out)))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    ensure_dagster_home()
    dagster = Path(sys.executable).with_name("dagster")
    argv = [str(dagster), "dev", "-w", str(project_root() / "workspace.yaml"), "-h", args.host, "-p", str(args.port)]
    os.chdir(project_root())
    # A script that starts this in the background leaves SIGINT ignored, and dagster dev maps SIGTERM to its
    # SIGINT handler: with both back to their defaults, `kill PID` stops the webserver, daemon and code server.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.execv(argv[0], argv)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneline", description="Declarative fine-tuning pipelines on Dagster.")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize one pipeline end to end and print its evaluation summary")
    run.add_argument("--pipeline", required=True, help="the pipeline's name (its spec file's stem)")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    run.add_argument("--specs-dir", help="folder of spec files (default: pipelines/specs)")
    run.add_argument("--data-dir", help="folder for generated data (default: data/)")
    run.add_argument("--verbose", action="store_true", help="every progress line, DEBUG included, and the "
                                                            "libraries' own bars and warnings")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="materialize only the data assets (raw_data, cleaned_dataset, splits) and "
                                         "their checks, no training: is the data ready?")
    check.add_argument("pipeline", help="the pipeline's name (its spec file's stem)")
    check.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    check.add_argument("--specs-dir", help="folder of spec files (default: pipelines/specs)")
    check.add_argument("--data-dir", help="folder for generated data (default: data/)")
    check.add_argument("--verbose", action="store_true", help="every check's line and the libraries' own output")
    check.set_defaults(func=cmd_check)
    predict = sub.add_parser("predict", help="answer inputs with the pipeline's champion model (a classifier's label "
                                             "and probability, a chat model's response, ...)")
    predict.add_argument("--pipeline", required=True)
    predict.add_argument("--data-dir", help="folder of generated data holding the embedded MLflow store")
    predict.add_argument("--json", action="store_true", help="print one JSON list")
    predict.add_argument("--version", help="registry version to answer with (default: the champion)")
    predict.add_argument("--max-new-tokens", type=_positive_int, default=64,
                         help="chat models: most tokens per answer")
    predict.add_argument("texts", nargs="+", metavar="INPUT", help="one or more inputs, as the task reads them (a "
                                                                  "text to classify, an instruction to answer)")
    predict.set_defaults(func=cmd_predict)
    export = sub.add_parser("export", help="write the champion (or --version) as a folder other tools load, checked "
                                            "against the registered model: ONNX for a classifier, a merged "
                                            "transformers folder for a chat model")
    export.add_argument("--pipeline", required=True)
    export.add_argument("--output", required=True, help="new folder to write (must not exist)")
    export.add_argument("--version", help="registry version to export (default: the champion)")
    export.add_argument("--format", help="onnx (classifiers), merged (chat models: base and adapter in one "
                                         "transformers folder), gguf (that folder plus gguf/model.gguf for "
                                         "llama.cpp), sentence-transformers (embedding models); default: the first "
                                         "of these the pipeline's task has")
    export.add_argument("--data-dir", help="folder of generated data holding the embedded MLflow store")
    export.set_defaults(func=cmd_export)
    serve = sub.add_parser("serve", help="serve the pipeline's champion (or --version) over HTTP with `mlflow models "
                                          "serve`: POST /invocations, GET /ping")
    serve.add_argument("--pipeline", required=True)
    serve.add_argument("--version", help="registry version to serve (default: the champion)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5001, help="port to listen on (default: 5001; the MLflow UI "
                                                                 "takes 5000)")
    serve.add_argument("--workers", type=_positive_int, default=1, help="server processes, each with its own copy "
                                                                        "of the model (default: 1)")
    serve.add_argument("--data-dir", help="folder of generated data holding the embedded MLflow store")
    serve.set_defaults(func=cmd_serve)
    lineage = sub.add_parser("lineage", help="the chain from a model version back to its raw files, or the model "
                                              "versions a data file went into (--data)")
    lineage.add_argument("--pipeline", help="the pipeline (required without --data)")
    lineage.add_argument("--version", help="registry version (default: the champion, else the newest)")
    lineage.add_argument("--data", help="a data file: list the model versions trained on data that included it")
    lineage.add_argument("--json", action="store_true", help="print one JSON object")
    lineage.add_argument("--specs-dir", help="folder of spec files (default: pipelines/specs)")
    lineage.add_argument("--data-dir", help="folder of generated data holding the embedded MLflow store")
    lineage.set_defaults(func=cmd_lineage)
    validate = sub.add_parser("validate", help="validate spec files (default: every spec in pipelines/specs)")
    validate.add_argument("files", nargs="*")
    validate.add_argument("--specs-dir", help="folder of spec files validated when no file is named "
                                              "(default: pipelines/specs)")
    validate.set_defaults(func=cmd_validate)
    listing = sub.add_parser("list", help="list the pipelines")
    listing.add_argument("--specs-dir", help="folder of spec files (default: pipelines/specs)")
    listing.set_defaults(func=cmd_list)
    init = sub.add_parser("init", help="write a first spec for a data file or folder (CSV, TSV, JSONL, Parquet): "
                                       "task and columns inferred, every section commented")
    init.add_argument("data", help="a data file, or a folder of them (train/validation/test files are kept as splits)")
    init.add_argument("--name", help="the pipeline's name (default: a slug of the file or folder name)")
    init.add_argument("--specs-dir", help="folder to write NAME.yaml into (default: pipelines/specs)")
    init.add_argument("--force", action="store_true", help="overwrite an existing spec of that name")
    init.add_argument("--column", action="append", type=_column_assignment, metavar="FIELD=NAME",
                      help="a column field of the task section and the data's column for it, e.g. "
                           "label_column=intent or messages_column=chat (repeat it; default: inferred)")
    for field_name in _column_fields():
        init.add_argument(f"--{field_name.replace('_', '-')}", dest=f"column__{field_name}", metavar="NAME",
                          help=f"shorthand for --column {field_name}=NAME")
    init.set_defaults(func=cmd_init)
    ui = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on the shared instance")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    args = parser.parse_args(argv)
    from pipelines.core.errors import TunelineError

    try:
        return int(args.func(args))
    except TunelineError as exc:  # a user error: one short block; --debug shows where it came from
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
