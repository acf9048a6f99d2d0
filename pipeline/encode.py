"""`mrnet encode`: a whole image collection to Parquet on Ray Data, streaming, exactly once, resumable.

    listing (driver, streamed to OUT/_listing) -> read + hash + decode (CPU tasks) -> fit (actor pool, one GPU
    each, or CPU) -> each actor call writes its own part files atomically -> the driver sums small reports.

Exactly once: a rerun first loads the keys of everything already committed under this config_id, and read tasks
drop those images. Part files are named by a hash of (config_id, the batch's images), so a batch Ray retries
after a worker dies rewrites the same file rather than adding one. A driver killed at any moment leaves only
whole committed parts (plus hidden temporaries, removed on the next run), so the rerun finishes the rest.
"""
import functools
import hashlib
import json
import os
import platform
import signal
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from mrnet_core import device as devices
from mrnet_core.config import ConfigError
from mrnet_core import prior as priors
from mrnet_core.encode import Failure, choose_prior, encode, encode_in_batches
from mrnet_core.images import DEFAULT_MAX_PIXELS, ImageError, decode, resize_long_side
from mrnet_core.pyramid import level_sizes

from . import store
from .console import Progress, init_ray
from .lease import LeaseLost, held
from .priors import keep as keep_prior
from .priors import path_in as priors_path
from .settings import resolve
from .sources import filesystem, has_scheme, list_images, read_bytes

FORMAT = 3  # bump when a change to this pipeline changes what a row holds
LISTING_CHUNK = 10_000
READ_BATCH = 16
DEVICE_FAULT_EXIT = 70  # an Encoder's exit status after a device fault; Ray restarts the actor and retries its call

READ_SCHEMA = pa.schema([
    ("uri", pa.string()), ("status", pa.string()),  # ok, failed or skipped
    ("image_id", pa.string()), ("file_bytes", pa.int64()),
    ("channels", pa.int32()), ("height", pa.int32()), ("width", pa.int32()),
    ("pixels", pa.large_binary()),  # float32 [C, H, W]
    ("notes", pa.list_(pa.string())),
    ("stage", pa.string()), ("error_kind", pa.string()), ("message", pa.string()),
])


def now():
    return datetime.now(timezone.utc)


def read_image(uri, done, failed, size, levels, max_pixels):
    """One READ_SCHEMA row: the decoded image, or why it failed, or that it is already done."""
    if store.contains(failed, store.key(uri)):
        return {"uri": uri, "status": "skipped"}
    try:
        data = read_bytes(uri)
    except OSError as e:
        return {"uri": uri, "status": "failed", "stage": "read", "error_kind": "unreadable", "message": str(e)}
    image_id = hashlib.sha256(data).hexdigest()
    row = {"uri": uri, "image_id": image_id, "file_bytes": len(data)}
    if store.contains(done, store.key(uri, image_id)):
        return {**row, "status": "skipped"}
    try:
        image, notes = decode(data, uri, max_pixels)
        if size and max(image.shape[1:]) > size:  # shrink only: enlarging would only invent pixels to fit
            image = resize_long_side(image, size)
        c, h, w = image.shape
        try:
            level_sizes(h, w, levels=levels)
        except ValueError as e:
            raise ImageError(uri, f"{e} (after resizing)" if size else str(e), "too_small") from None
    except ImageError as e:
        return {**row, "status": "failed", "stage": "decode", "error_kind": e.kind, "message": str(e)}
    return {**row, "status": "ok", "channels": c, "height": h, "width": w, "notes": notes,
            "pixels": image.numpy().astype(np.float32).tobytes()}


def read_images(batch: pa.Table, keys_ref, size, levels, max_pixels):
    done, failed = ray.get(keys_ref[0])
    rows = [read_image(uri, done, failed, size, levels, max_pixels) for uri in batch.column("uri").to_pylist()]
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


class Encoder:
    """An actor holding one device; each call fits a batch of images, grouped by size, and commits its rows.

    Images that ran out of device memory even alone are deferred: no row, so the next run tries them again.
    A device fault other than out of memory ends the actor's process, so that Ray starts a fresh one (and a
    fresh CUDA context) and retries the batch; no image is marked failed for it.
    """

    def __init__(self, cfg, cfg_id, out, threads, encode_fn=encode, prior_ref=None):
        torch.set_num_threads(threads)
        self.cfg, self.cfg_id, self.out, self.encode_fn = cfg, cfg_id, out, encode_fn
        if prior_ref is not None:  # every image starts from the job's prior
            prior = priors.from_bytes(ray.get(prior_ref[0]), "the job's prior")
            self.encode_fn = functools.partial(encode_fn, prior=prior)
        self.device = "cpu"
        node = ray.get_runtime_context().get_node_id()[:12]
        if ray.get_gpu_ids():
            reason = devices.cuda_unusable_reason()
            if reason:
                raise devices.DeviceError(f"node {node}: Ray granted this worker a GPU, but {reason}")
            self.device = "cuda"
            devices.use_full_precision()
        name = torch.cuda.get_device_name() if self.device == "cuda" else "cpu"
        self.device_name = f"{name} (node {node})"

    def fit(self, items):
        """(rows, failures, deferred count) for same-sized images, fitted in batches that fit the device."""
        c, h, w = items[0]["channels"], items[0]["height"], items[0]["width"]
        images = torch.stack([torch.from_numpy(np.frombuffer(r["pixels"], np.float32).reshape(c, h, w).copy())
                              for r in items])
        rows, failures, deferred = [], [], 0
        for item, result in zip(items, encode_in_batches(images, self.cfg, self.device, encode_fn=self.encode_fn)):
            if isinstance(result, Failure):
                if result.retry:
                    deferred += 1
                    print(f"encode: {item['uri']}: {result.message}; deferred to the next run", file=sys.stderr)
                else:
                    failures.append({"uri": item["uri"], "stage": "fit", "error_kind": result.kind,
                                     "message": f"{item['uri']}: {result.message}"})
                continue
            rec, blob = result
            rate = rec.rate
            rows.append({
                "image_id": item["image_id"], "uri": item["uri"], "config_id": self.cfg_id,
                "width": w, "height": h, "channels": c, "model": rec.model, "architecture": rec.architecture,
                "weights": blob, "params": rec.params, "weight_bits": rec.weight_bits, "prior_id": rec.prior_id,
                "width_scale": rate and rate.scale, "target_met": rate and rate.met,
                "step_coarsening": rate.coarser if rate else rec.coarser,
                "model_bytes": rec.model_bytes, "raw_bytes": rec.raw_bytes,
                "file_bytes": item["file_bytes"], "bpp": rec.bpp,
                "psnr": [lv.psnr for lv in rec.levels], "ssim": [lv.ssim for lv in rec.levels],
                "fit_seconds": rec.fit_seconds, "batch": rec.batch,
                "epochs": [s.epochs for s in rec.stages], "notes": item["notes"],
                "device": self.device_name, "encoded_at": now(),
            })
        return rows, failures, deferred

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        groups, failures = defaultdict(list), []
        for r in rows:
            if r["status"] == "ok":
                groups[(r["channels"], r["height"], r["width"])].append(r)
            elif r["status"] == "failed":
                failures.append(r)
        encoded, deferred = [], 0
        try:
            for items in groups.values():
                done, failed, later = self.fit(items)
                encoded, failures, deferred = encoded + done, failures + failed, deferred + later
        except Exception as e:  # noqa: BLE001 (only device faults are caught; the rest propagate to Ray)
            if not devices.is_device_fault(e):
                raise
            # Nothing of this call is committed yet: a fresh actor redoes it whole.
            print(f"encode: device fault on {self.device_name}: {str(e).splitlines()[0]}; restarting this worker",
                  file=sys.stderr, flush=True)
            os._exit(DEVICE_FAULT_EXIT)
        for f in failures:
            f.update(config_id=self.cfg_id, failed_at=now())
        name = store.part_name(self.cfg_id, [f"{r['uri']}\0{r['image_id']}" for r in rows if r["status"] != "skipped"])
        # Failures first: a kill between the two writes leaves them recorded and the encodings still to do.
        if failures:
            store.write_part(self.out, "failures", name, failures, store.FAILURES)
        if encoded:
            store.write_part(self.out, "encodings", name, encoded, store.ENCODINGS)
        return pa.table({
            "done": [len(encoded)], "failed": [len(failures)], "deferred": [deferred],
            "skipped": [sum(r["status"] == "skipped" for r in rows)],
            "bytes_in": [sum(r["file_bytes"] or 0 for r in rows if r["status"] != "skipped")],
            "bytes_out": [sum(r["model_bytes"] for r in encoded)],
        })


def write_listing(source, folder):
    """Stream the source's URIs into Parquet files of LISTING_CHUNK rows; the count."""
    fs, path = filesystem(folder)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path)
    count, chunk = 0, []

    def flush():
        pq.write_table(pa.table({"uri": chunk}), f"{path}/{count // LISTING_CHUNK:06d}.parquet", filesystem=fs)

    for uri in source:
        chunk.append(uri)
        count += 1
        if len(chunk) == LISTING_CHUNK:
            flush()
            chunk = []
    if chunk:
        flush()
    return count


def versions():
    import mrnet_core
    from importlib.metadata import PackageNotFoundError, version
    try:
        mrnet = version("mrnet")
    except PackageNotFoundError:
        mrnet = getattr(mrnet_core, "__version__", "unknown")
    return {"mrnet": mrnet, "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "pyarrow": pa.__version__}


def plan_resources(num_gpus, num_cpus, actors):
    """(num_gpus per actor, actors, torch threads per actor).

    A GPU each when the cluster has GPUs. Otherwise CPU actors that leave a CPU to read; since decoding is light
    next to fitting, each CPU actor's torch uses its share of all the cluster's CPUs, not just the one it reserves.
    """
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 1)
    if num_gpus is None:
        num_gpus = 1 if gpus else 0
    if num_gpus and not gpus:
        raise ConfigError(f"num_gpus: {num_gpus} per actor, but the Ray cluster has no GPU")
    if actors is None:
        actors = int(gpus // num_gpus) if num_gpus else int(max(1, cpus - 1) // num_cpus)
    actors = max(1, actors)
    threads = max(1, int(num_cpus)) if num_gpus else max(1, int(num_cpus), int(cpus // actors))
    if num_gpus:
        check_gpu_workers(num_gpus)
    return num_gpus, actors, threads


@functools.cache  # planned by the command, then by `run`: one probe task per job is enough
def gpu_worker_problem(num_gpus):
    """Why torch cannot use the GPU of a worker granted `num_gpus`, or None (one task, on one node)."""
    return ray.get(ray.remote(num_gpus=num_gpus, num_cpus=0)(devices.cuda_unusable_reason).remote())


def check_gpu_workers(num_gpus):
    """Stop before any work when a worker granted a GPU has a torch that cannot use it (the common cause: a CPU
    build of torch on the GPU nodes). One task on one node; each Encoder checks its own node too."""
    reason = gpu_worker_problem(num_gpus)
    if reason:
        raise devices.DeviceError(f"a Ray worker granted a GPU cannot use it: {reason}. Install a CUDA build of torch "
                                  f"on the GPU nodes, or set num_gpus = 0 to fit on CPUs")


def run(source, out, cfg, size=None, max_pixels=DEFAULT_MAX_PIXELS, batch_size=16, actors=None, num_gpus=None,
        num_cpus=1, log=print, encode_fn=encode, lease_lost=None):
    """Encode every image `source` names into OUT (see pipeline/store.py). Ray must be initialised. The summary.

    The caller holds OUT's lease (pipeline/lease.py); `lease_lost` is its Event, set when the lease is lost, which
    stops the job. `encode_fn` is what the actors fit each batch with (`mrnet_core.encode.encode`; tests inject
    failures here)."""
    start = time.perf_counter()
    prior = choose_prior(cfg)
    cfg_id = store.config_id({"fit": cfg.to_dict(), "size": size, "format": FORMAT,
                              **({"prior_id": prior.prior_id} if prior else {})})
    num_gpus, actors, threads = plan_resources(num_gpus, num_cpus, actors)
    store.remove_temporaries(out)
    if prior is not None:
        keep_prior(out, prior)  # before any row needs it
    for stray in stray_files(out):
        log(f"encode: warning: {stray['file']}: {stray['reason']}; skipped (move it out of OUT)")
    listing = store.join(out, "_listing", cfg_id)
    listed = write_listing(list_images(source), listing)
    done, failed = store.done_keys(out, cfg_id)
    log(f"encode: {listed} image(s) listed from {source}; {len(done)} encoded and {len(failed)} failed before under "
        f"config {cfg_id}; {actors} actor(s), {num_gpus} GPU, {num_cpus} CPU and {threads} torch thread(s) each; "
        + (f"prior {prior.prior_id}" if prior else "no prior"))
    totals = dict.fromkeys(["done", "failed", "deferred", "skipped", "bytes_in", "bytes_out"], 0)
    if listed:
        keys_ref = [ray.put((done, failed))]  # in a list so Ray passes the reference, not the arrays, to tasks
        ds = ray.data.read_parquet(listing)
        ds = ds.map_batches(read_images, batch_size=READ_BATCH, batch_format="pyarrow", num_cpus=1,
                            fn_kwargs={"keys_ref": keys_ref, "size": size, "levels": cfg.levels,
                                       "max_pixels": max_pixels})
        ds = ds.map_batches(Encoder, batch_size=batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                            num_gpus=num_gpus, num_cpus=num_cpus,  # Ray Data restarts dead actors, retries calls
                            fn_constructor_kwargs={"cfg": cfg, "cfg_id": cfg_id, "out": out,
                                                   "threads": threads, "encode_fn": encode_fn,
                                                   # by reference: the actors' own arguments stay small
                                                   "prior_ref": [ray.put(prior.data)] if prior else None})
        progress = Progress("encode", listed)
        for report in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            stop_if_terminated()
            if lease_lost is not None and lease_lost.is_set():
                raise LeaseLost(f"{out}: this job lost its lease on the folder (it expired or another job took "
                                f"it over); stopped")
            for k in totals:
                totals[k] += column_sum(report, k)
            seen = totals["done"] + totals["failed"] + totals["deferred"] + totals["skipped"]
            progress.update(seen, f"{totals['done']} done, {totals['failed']} failed, {totals['skipped']} skipped")
        progress.close()
        stop_if_terminated()
    fs, path = filesystem(listing)
    fs.delete_dir(path)
    if not fs.get_file_info(pafs.FileSelector(path.rsplit("/", 1)[0])):
        fs.delete_dir(path.rsplit("/", 1)[0])
    seconds = time.perf_counter() - start
    summary = {"config_id": cfg_id, "listed": listed, **totals, "seconds": round(seconds, 2),
               "images_per_second": round(totals["done"] / seconds, 3),
               "prior_id": prior.prior_id if prior else None,
               # the bytes every file needs beside its own: none for latent pyramids, which only start from it
               "prior_bytes": len(prior.data) if prior and cfg.model != "g" else 0}
    store.ensure_tables(out)
    write_manifest(out, cfg, cfg_id, size, max_pixels, summary, log)
    if totals["deferred"]:
        log(f"encode: {totals['deferred']} image(s) ran out of device memory even alone and were deferred: "
            f"a rerun tries them again (with fewer actors per device, or on a larger one)")
    log(f"encode: {totals['done']} done, {totals['failed']} failed, {totals['skipped']} skipped in {seconds:.1f} s "
        f"({summary['images_per_second']:.2f} images/s); {totals['bytes_in']:,} bytes in, "
        f"{totals['bytes_out']:,} bytes out -> {out}")
    return summary


def stray_files(out):
    """Files in OUT's tables that are not their parts (a README, a truncated part): [{"file", "reason"}]."""
    return [s for folder in ("encodings", "failures") for s in store.part_files(out, folder)[1]]


def column_sum(table, column):
    return int(sum(table.column(column).to_pylist()))


def write_manifest(out, cfg, cfg_id, size, max_pixels, summary, log=print):
    try:
        manifest = store.read_manifest(out)
    except store.CorruptFile as e:  # keep what it holds for a person to read; the new one starts afresh
        aside = f"manifest.json.corrupt-{now().strftime('%Y%m%dT%H%M%S')}"
        store.write_bytes(out, aside, store.read_bytes(out, "manifest.json"))
        log(f"encode: warning: {e}; kept as {aside}, and a new manifest written (configs of earlier runs not in "
            f"this one are missing from it)")
        manifest = {}
    manifest.setdefault("configs", {})[cfg_id] = {"fit": cfg.to_dict(), "size": size, "format": FORMAT,
                                                  "prior_id": summary.get("prior_id")}
    if summary.get("prior_id"):
        manifest.setdefault("priors", {})[summary["prior_id"]] = priors_path(summary["prior_id"])
    counts = {}
    for folder, name in (("encodings", "encoded"), ("failures", "failed")):
        dataset = store.dataset(out, folder)
        for c in manifest["configs"] if dataset else []:
            counts.setdefault(c, {})[name] = dataset.count_rows(filter=pads.field("config_id") == c)
    manifest.update(versions=versions(), counts=counts, skipped_files=stray_files(out),
                    last_run={**summary, "max_pixels": max_pixels, "finished_at": now().isoformat()})
    store.write_json(out, "manifest.json", manifest)


def cmd_encode(args):
    cfg, job = resolve(args)
    out = args.out if has_scheme(args.out) else os.path.abspath(args.out)
    if not ray.is_initialized():
        init_ray(args.ray_address)
    plan_resources(job.get("num_gpus"), job.get("num_cpus", 1), job.get("actors"))  # its errors before any file
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    # the lease before any other file: one job at a time writes OUT
    with exit_on_sigterm(), held(out, job.get("wait", False), log) as lease_lost:
        return encode_holding(args, out, cfg, job, log, lease_lost)


# Set by SIGTERM. The handler's SystemExit is lost when the signal lands while Python runs a finaliser or a weakref
# callback ("Exception ignored in ..."), so the job also stops at its next check of this flag (`stop_if_terminated`).
TERMINATED = threading.Event()


def stop_if_terminated():
    """SystemExit(143) once SIGTERM has arrived within `exit_on_sigterm`."""
    if TERMINATED.is_set():
        raise SystemExit(128 + signal.SIGTERM)


def _on_sigterm(signum, frame):
    TERMINATED.set()
    sys.exit(128 + signum)


@contextmanager
def exit_on_sigterm():
    """Within the block, SIGTERM (a scheduler stopping or pre-empting the job) ends the job like Ctrl-C: the lease
    on OUT is released and the MLflow run marked failed on the way out, so the next run need not wait for the
    lease to expire. Committed parts stay; a rerun does the rest."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    TERMINATED.clear()
    previous, previous_hook = signal.signal(signal.SIGTERM, _on_sigterm), sys.unraisablehook

    def quiet_lost_exit(unraisable):  # our exit, lost in a finaliser: the flag stops the job, so no traceback
        if not (isinstance(unraisable.exc_value, SystemExit) and TERMINATED.is_set()):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_lost_exit
    try:
        yield
    finally:  # outside the block nothing stops on the flag (a study or a test runs jobs in this process after)
        TERMINATED.clear()
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


def encode_holding(args, out, cfg, job, log, lease_lost):
    """The job, once it holds OUT's lease. `job`: every setting of the [job] table and flags; all are logged."""
    from . import track
    # One MLflow run per job, opened first; all its calls together take `deadline` seconds at most.
    deadline = job.get("tracking_deadline", track.DEADLINE)
    tracker = track.start(out, getattr(args, "experiment", None), log, deadline=deadline)
    try:
        run_settings = {k: v for k, v in job.items() if k not in ("preset", "wait", "tracking_deadline")}
        summary = run(args.input, out, cfg, log=log, lease_lost=lease_lost, **run_settings)
        stop_if_terminated()
        if not getattr(args, "no_render", False):
            from .collection import render_collection
            summary["render"] = render_collection(out, summary["config_id"], log=log)
            stop_if_terminated()
    except BaseException:
        if tracker["run_id"]:
            track.retried("mark run failed", lambda: track.client_for(out).set_terminated(tracker["run_id"], "FAILED"),
                          log, tracker)
        raise
    summary["mlflow"] = track.finish(tracker, out, summary, cfg, job, versions(), log)
    print(json.dumps(summary))
    return 1 if getattr(args, "strict", False) and summary["failed"] else 0
