"""One MLflow run per `mrnet encode` job: config and versions as params, aggregates as metrics, the report as
artifacts.

The driver alone talks to MLflow (workers never do), so the store and experiment are created once, before any
work, and nothing races on first use. Per-image figures stay in Parquet; the run holds aggregates, sent in one
`log_batch`. Tracking is never fatal: each call is retried a few times and a failure is reported in the job's
summary, with the Parquet output untouched.

Tracking never holds a job up for long: all of a job's MLflow calls together get a deadline (DEADLINE seconds by
default, `tracking_deadline` in the [job] table). A call still unanswered when the time is up (a server that
accepts connections but never answers) is abandoned, the job goes on, and the summary says why it is not tracked.

Where: MLFLOW_TRACKING_URI when set (a server, `databricks`, a database; the server decides where artifacts go);
otherwise an embedded SQLite store next to the results, `sqlite:///OUT/mlflow.db`, with artifacts in
OUT/mlartifacts. For an OUT on an object store the embedded store is `mlruns.db` in the working directory (SQLite
needs a local disk) while the artifacts still go to OUT/mlartifacts, under an experiment named after the whole URI.
"""
import itertools
import json
import os
import subprocess
import tempfile
import threading
import time

import numpy as np
import pyarrow.dataset as pads

from mrnet_core.metrics import is_lossless, lossy_mean

from . import store

ATTEMPTS = 3
WAIT = 1.0  # seconds before the first retry, doubling
DEADLINE = 60.0  # seconds all of a job's MLflow calls may take together


def tracking_uri(out):
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if store.is_remote(out):
        return f"sqlite:///{os.path.abspath('mlruns.db')}"
    return f"sqlite:///{os.path.join(out, 'mlflow.db')}"


def default_experiment(out, command="encode"):
    """mrnet-<OUT's folder name> (mrnet-study-... for a study); the whole URI for an OUT on an object store, whose
    runs share one local store: each OUT its own experiment, so that its artifacts go to that OUT."""
    prefix = "mrnet-study-" if command.startswith("study") else "mrnet-"
    if store.is_remote(out):
        return prefix + out.rstrip("/")
    return prefix + (os.path.basename(out.rstrip("/")) or "encode")


class DeadlinePassed(TimeoutError):
    """The job's time for tracking is spent."""


def within(fn, seconds):
    """fn(), or DeadlinePassed when it has not returned after `seconds`. It runs in a daemon thread, which is left
    behind when it hangs: MLflow's clients have no way to abandon a call, and the job must not wait for it."""
    if seconds <= 0:
        raise DeadlinePassed("the job's tracking deadline has passed")
    result = {}

    def call():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
            result["error"] = e

    thread = threading.Thread(target=call, name="mrnet-mlflow", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise DeadlinePassed(f"no answer before the job's tracking deadline ({seconds:.1f} s were left)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def retried(what, fn, log, tracker):
    """fn() with ATTEMPTS tries, within the time for tracking the tracker has left (which it spends); (result,
    None) or (None, the last error as one line)."""
    started = time.monotonic()
    try:
        for attempt in range(ATTEMPTS):
            try:
                return within(fn, tracker["seconds_left"] - (time.monotonic() - started)), None
            except DeadlinePassed as e:
                return None, f"{what}: {e}"
            except Exception as e:  # any tracking failure: network, server, store
                error = f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(f"mlflow: attempt {attempt + 1}/{ATTEMPTS} failed: {error}")
                if attempt + 1 < ATTEMPTS:
                    left = tracker["seconds_left"] - (time.monotonic() - started)
                    time.sleep(max(0.0, min(WAIT * 2**attempt, left)))
        return None, error
    finally:
        tracker["seconds_left"] -= time.monotonic() - started


def client_for(out):
    # Bound MLflow's own HTTP retries (7, with backoff, by default) so a dead server costs seconds, not minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient  # slow to import; only jobs that track pay for it
    return MlflowClient(tracking_uri(out))


def experiment_id(client, name, out):
    """The experiment's id, creating it (artifacts in OUT/mlartifacts for an embedded store) if need be."""
    from mlflow.exceptions import MlflowException
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    embedded = tracking_uri(out).startswith(("sqlite:", "file:"))
    try:
        return client.create_experiment(name, artifact_location=store.join(out, "mlartifacts") if embedded else None)
    except MlflowException:  # created meanwhile by another job
        return client.get_experiment_by_name(name).experiment_id


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start(out, experiment=None, log=print, command="encode", parent=None, deadline=DEADLINE):
    """Open the job's run (status RUNNING), nested under run `parent` if given. Returns a dict for finish() and
    retried(): the MLflow calls made with it take `deadline` seconds in all at most. Never raises."""
    name = experiment or default_experiment(out, command)
    tracker = {"experiment": name, "tracking_uri": tracking_uri(out), "run_id": None, "error": None,
               "seconds_left": deadline, "command": command, "parent": parent}

    def open_run():
        client = client_for(out)
        exp = experiment_id(client, name, out)
        commit = git_commit()
        tags = {"mlflow.source.git.commit": commit, "git_commit": commit,
                "mlflow.source.name": f"mrnet {command.split()[0]}", "out": out}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(exp, run_name=f"{command} {time.strftime('%Y-%m-%d %H:%M:%S')}", tags=tags)
        return run.info.run_id

    tracker["run_id"], tracker["error"] = retried("open run", open_run, log, tracker)
    return tracker


def params(cfg, job, cfg_id, versions):
    flat = {f"fit.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in cfg.to_dict().items()}
    flat.update({f"job.{k}": v for k, v in job.items()})
    flat.update({f"version.{k}": v for k, v in versions.items()}, config_id=cfg_id)
    return {k: str(v)[:6000] for k, v in flat.items()}


def aggregates(out, cfg_id, summary):
    """Metric name -> value: job counts and speed, and over every image encoded under the config: PSNR and SSIM
    per level (mean, median, 5th percentile), bpp, compression ratios, and the codecs' PSNR at the same bytes."""
    m = {"images/done": summary["done"], "images/failed": summary["failed"], "images/skipped": summary["skipped"],
         "images/listed": summary["listed"], "images_per_second": summary["images_per_second"],
         "seconds": summary["seconds"], "bytes_in": summary["bytes_in"], "bytes_out": summary["bytes_out"]}
    is_config = pads.field("config_id") == cfg_id
    rows = store.read_table(out, "encodings", ["psnr", "ssim", "bpp", "raw_bytes", "file_bytes", "model_bytes",
                                               "width", "height"], is_config).to_pydict()
    m["images/encoded_total"] = len(rows["bpp"])
    for key in ("psnr", "ssim"):
        levels = max((len(v) for v in rows[key]), default=0)
        for k in range(levels):
            values = np.array([v[k] for v in rows[key] if len(v) > k])
            m.update({f"{key}/level_{k}/mean": values.mean(), f"{key}/level_{k}/median": np.median(values),
                      f"{key}/level_{k}/p5": np.percentile(values, 5)})
    if rows["bpp"]:
        model = np.array(rows["model_bytes"], dtype=float)
        m.update({"bpp/mean": np.mean(rows["bpp"]), "bpp/median": np.median(rows["bpp"]),
                  "compression_ratio/raw": np.sum(rows["raw_bytes"]) / model.sum(),
                  "compression_ratio/file": np.sum(rows["file_bytes"]) / model.sum()})
        # Honest bytes: the prior every image needs, shared by the config's images, as a second figure.
        pixels = float(np.dot(rows["width"], rows["height"]))
        m["bpp_with_prior"] = 8 * (model.sum() + summary.get("prior_bytes", 0)) / pixels
        m["prior_bytes"] = summary.get("prior_bytes", 0)
    from .compare import CODECS, IMAGES
    columns = [f"{c}_{k}" for c in CODECS for k in ("psnr", "bpp")]  # only what the means need
    compared = store.read_table(out, "comparison/images", columns, is_config, IMAGES).to_pydict()
    for codec in CODECS:
        mean, lossless = lossy_mean(compared.get(f"{codec}_psnr", []))
        if mean is not None:  # exact matches are counted, not averaged in as 120 dB
            m[f"{codec}/psnr_at_budget/mean"] = mean
        if compared.get(f"{codec}_psnr"):
            m[f"{codec}/lossless_at_budget"] = lossless
            # The bytes of the same images as the PSNR mean: lossy figures only.
            bpps = [b for b, p in zip(compared[f"{codec}_bpp"], compared[f"{codec}_psnr"])
                    if b is not None and p is not None and not is_lossless(p)]
            if bpps:
                m[f"{codec}/bpp_at_budget/mean"] = float(np.mean(bpps))
    return {k: float(v) for k, v in m.items()}


def artifacts(out, cfg_id):
    """Names under OUT of the files to log: the report, its plots, the contact sheet and a per-image summary
    Parquet (written here, as OUT/report/summary.parquet)."""
    import pyarrow.parquet as pq
    from .collection import batches
    from .compare import IMAGES
    is_config = pads.field("config_id") == cfg_id
    rows, schema = batches(out, "comparison/images", None, is_config, IMAGES), IMAGES
    first = next(rows, None)
    if first is None:  # --no-render: the encodings' own figures, without the weights
        schema = store.ENCODINGS.remove(store.ENCODINGS.get_field_index("weights"))
        rows = batches(out, "encodings", schema.names, is_config, store.ENCODINGS)
    else:
        rows = itertools.chain([first], rows)
    with store.output(out, "report/summary.parquet") as f, pq.ParquetWriter(f, schema) as writer:
        for batch in rows:  # a batch at a time: memory does not grow with the collection
            writer.write_batch(batch)
    names = ["report/summary.parquet", "report.html", "viewer.html", "contact_sheet.png", "report/rate_distortion.svg",
             "report/psnr_per_level.svg"]
    return [n for n in names if store.exists(out, n)]


def log_artifacts(client, run_id, out, names):
    """Log OUT's files `names` (relative) to the run, each in its folder; a remote OUT's through a local copy,
    since MLflow logs only local files."""
    with tempfile.TemporaryDirectory(prefix="mrnet-artifacts-") as scratch:
        for name in names:
            path = os.path.join(out, name)
            if store.is_remote(out):
                path = os.path.join(scratch, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(store.read_bytes(out, name) or b"")
            client.log_artifact(run_id, path, os.path.dirname(name) or None)


def devices(out, cfg_id):
    col = store.read_table(out, "encodings", ["device"], pads.field("config_id") == cfg_id).column("device")
    return sorted(set(col.to_pylist()))


def ray_cluster():
    import ray
    if not ray.is_initialized():
        return "none", "{}"
    ctx = ray.get_runtime_context()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return f"{ctx.gcs_address} ({len(nodes)} node(s))", json.dumps(ray.cluster_resources(), sort_keys=True)


def finish(tracker, out, summary, cfg, job, versions, log=print, status="FINISHED"):
    """Log params, metrics, tags and artifacts to the job's run and close it. Returns what the summary reports:
    {experiment, tracking_uri, run_id} or the same with `error`; never raises."""
    cfg_id = summary["config_id"]
    try:  # OUT's own file, written once here rather than inside the retried, time-limited MLflow calls
        names = artifacts(out, cfg_id)
    except OSError as e:
        log(f"mlflow: cannot write {store.join(out, 'report/summary.parquet')}: {e}")
        names = []
    if tracker["run_id"] is None:  # the start failed: the server may be back, if time is left
        tracker.update(start(out, tracker["experiment"], log, tracker["command"], tracker["parent"],
                             tracker["seconds_left"]))
        if tracker["run_id"] is None:
            log(f"mlflow: not recorded ({tracker['tracking_uri']}): {tracker['error']}; the Parquet output is complete")
            return report(tracker)

    def log_all():
        from mlflow.entities import Metric, Param, RunTag
        client, now = client_for(out), int(time.time() * 1000)
        cluster, resources = ray_cluster()
        tags = {"ray.cluster": cluster, "ray.resources": resources, "devices": "; ".join(devices(out, cfg_id)),
                "config_id": cfg_id}
        client.log_batch(tracker["run_id"],
                         metrics=[Metric(k, v, now, 0) for k, v in aggregates(out, cfg_id, summary).items()],
                         params=[Param(k, v) for k, v in params(cfg, job, cfg_id, versions).items()],
                         tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
        log_artifacts(client, tracker["run_id"], out, names)
        client.set_terminated(tracker["run_id"], status)

    _, tracker["error"] = retried("log run", log_all, log, tracker)
    if tracker["error"]:
        log(f"mlflow: run {tracker['run_id']} incomplete ({tracker['tracking_uri']}): {tracker['error']}; "
            "the Parquet output is complete")
    else:
        log(f"mlflow: run {tracker['run_id']} in experiment {tracker['experiment']} at {tracker['tracking_uri']}")
    return report(tracker)


def report(tracker):
    """What a job's summary says of its run: experiment, tracking_uri, run_id, error."""
    return {k: tracker[k] for k in ("experiment", "tracking_uri", "run_id", "error")}
