"""A lease on OUT, so that two `mrnet encode` jobs never write one output folder at once.

OUT/_lease.json names its holder (host, pid), a random token, when it started and when it expires. The holder
renews it from a background thread every HEARTBEAT seconds and deletes it when done. Another job stops with
LeaseHeld, or with `--wait` waits, and takes the lease over once it has expired (its holder was killed, or stalled
for TTL seconds) or, on the same machine, as soon as the holder's process is gone.

Who wins a race: on a local disk a file is created with os.link, which fails when the name exists, so of two jobs
creating the lease, or claiming one expired lease for take-over (OUT/_lease.<its token>.claim), exactly one wins.
Object stores (any other pyarrow filesystem) have no exclusive create: a job checks that the name is free, writes,
waits SETTLE seconds and reads back; it has won if it reads its own token. Two jobs can still both win when one
checks before the other's write and writes after the other's read-back: SETTLE makes that unlikely, not impossible.

A holder that stalls past its expiry (a long pause, a lost network) finds at its next heartbeat that the lease is
no longer its own and stops the job, but parts its actors commit meanwhile may duplicate the new holder's.
"""
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager

import pyarrow.fs as pafs

from .sources import filesystem, read_object

TTL = 60.0  # seconds a lease lasts without a heartbeat
HEARTBEAT = 10.0
SETTLE = 2.0  # object stores: how long a writer waits before reading its write back
POLL = 1.0  # --wait: how often to look again


class LeaseHeld(Exception):
    """Another job holds OUT (one line naming it)."""


class LeaseLost(OSError):
    """This job's lease expired or was taken over while it ran."""


def _machine():
    """This boot of this machine and this PID namespace (Linux), else None: there, a pid that is gone is dead."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _holder_gone(lease):
    """Whether the lease's holder ran on this machine and its process is gone (never True for another host)."""
    if lease.get("machine") is None or lease.get("machine") != _machine():
        return False
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):  # PermissionError: alive, another user's
        return False
    return False


def _read(fs, path):
    """The lease at path, or None when there is none. A file that is not a lease expires TTL after it was written."""
    try:
        data = read_object(fs, path)
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(data)
        float(lease["expires_at"])
        str(lease["token"])
        return lease
    except (ValueError, KeyError, TypeError):
        mtime = fs.get_file_info(path).mtime
        return {"token": hashlib.sha256(data).hexdigest()[:32], "holder": "an unreadable lease file",
                "expires_at": (mtime.timestamp() if mtime else 0) + TTL}


def _is_local(fs):
    return isinstance(fs, pafs.LocalFileSystem)


def _write(fs, path, data):
    """Replace path's content whole: a temporary file renamed over it (an object store's put is whole already)."""
    if not _is_local(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _create(fs, path, data, settle=SETTLE):
    """Whether this call created path holding `data`; False when it exists already or another writer won."""
    if _is_local(fs):
        tmp = f"{path}.{secrets.token_hex(8)}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # atomic, and never replaces: exactly one of two racing jobs gets here
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    with fs.open_output_stream(path) as f:
        f.write(data)
    time.sleep(settle)
    try:
        return read_object(fs, path) == data
    except FileNotFoundError:
        return False


def _delete(fs, path):
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def _encode(lease):
    return json.dumps(lease, indent=2).encode()


def describe(lease):
    """The holder and times, for one line of an error or a log."""
    when = lambda key: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease[key])))  # noqa: E731
    started = f", started {when('started_at')}" if "started_at" in lease else ""
    return f"{lease.get('holder', 'unknown')}{started}, expires {when('expires_at')}"


def _take_over(fs, path, stale, lease, settle):
    """Whether this job replaced the expired lease `stale` with `lease`.

    One claim per stale token lets one job do it.
    """
    claim = f"{path[: -len('.json')]}.{stale['token']}.claim"
    if not _create(fs, claim, lease["token"].encode(), settle):
        old = _read(fs, claim)  # a claimer killed mid-take-over leaves its claim: it expires like a lease
        if old is not None and float(old["expires_at"]) < time.time():
            _delete(fs, claim)
        return False
    try:
        current = _read(fs, path)
        if current is None or current["token"] != stale["token"]:
            return False  # released or taken over meanwhile
        _write(fs, path, _encode(lease))
        return True
    finally:
        _delete(fs, claim)


def lease_path(out):
    """(filesystem, path) of OUT's lease."""
    return filesystem(out.rstrip("/") + "/_lease.json")


def acquire(fs, path, wait=False, log=print, ttl=TTL, settle=SETTLE):
    """This job's lease, once it holds the one at `path`. LeaseHeld when another job holds it and `wait` is
    false; with `wait`, polls until it is released or expires."""
    out = path.rpartition("/")[0]
    if out:
        fs.create_dir(out, recursive=True)
    start = time.time()
    lease = {"holder": f"{socket.gethostname()} pid {os.getpid()}", "host": socket.gethostname(), "pid": os.getpid(),
             "machine": _machine(), "token": secrets.token_hex(16), "started_at": start, "heartbeat_at": start,
             "expires_at": start + ttl}
    waiting = False
    while True:
        current = _read(fs, path)
        if current is None:
            if _create(fs, path, _encode(lease), settle):
                return lease
            continue  # another job created it first: look at theirs
        if float(current["expires_at"]) < time.time() or _holder_gone(current):
            if _take_over(fs, path, current, lease, settle):
                log(f"encode: {out}: took over the lease of {describe(current)} (gone)")
                return lease
        elif not wait:
            raise LeaseHeld(f"{out}: another encode job holds this folder ({describe(current)}); "
                            f"rerun with --wait to wait for it")
        elif not waiting:
            log(f"encode: {out}: waiting for the job holding this folder ({describe(current)})")
            waiting = True
        time.sleep(POLL)
        lease["heartbeat_at"] = time.time()
        lease["expires_at"] = lease["heartbeat_at"] + ttl


def renew(fs, path, lease, ttl=TTL):
    """Push the lease's expiry on; False when it is no longer this job's (it expired first, or was taken over)."""
    now = time.time()
    if now > float(lease["expires_at"]):
        return False
    current = _read(fs, path)
    if current is None or current["token"] != lease["token"]:
        return False
    lease.update(heartbeat_at=now, expires_at=now + ttl)
    _write(fs, path, _encode(lease))
    return True


def release(fs, path, lease):
    """Delete the lease if it is still this job's."""
    current = _read(fs, path)
    if current is not None and current["token"] == lease["token"]:
        _delete(fs, path)


@contextmanager
def held(out, wait=False, log=print, ttl=TTL, heartbeat=HEARTBEAT):
    """Hold OUT's lease for the `with` block, renewed in the background and released at its end (errors and
    KeyboardInterrupt too). Yields an Event set when the lease is lost; the job should stop then."""
    fs, path = lease_path(out)
    lease = acquire(fs, path, wait, log, ttl)
    lost, stop = threading.Event(), threading.Event()

    def beat():
        while not stop.wait(heartbeat):
            try:
                kept = renew(fs, path, lease, ttl)
            except OSError as e:  # a passing storage error: the lease stays ours until it expires
                log(f"encode: {out}: cannot renew the lease: {e}")
                kept = time.time() < float(lease["expires_at"])
            if not kept:
                log(f"encode: {out}: lost the lease (it expired or another job took it over); stopping")
                lost.set()
                return

    thread = threading.Thread(target=beat, name="mrnet-lease", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()
        if not lost.is_set():
            try:
                release(fs, path, lease)
            except OSError as e:
                log(f"encode: {out}: cannot release the lease ({e}); it expires by itself in {ttl:.0f} s")
