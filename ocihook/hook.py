"""``safedeploy-hook [prestart|createRuntime|poststop]``: the OCI hook (docs/hook.md).

Reads the OCI state JSON on stdin. prestart/createRuntime resolve the policy named by the
annotation ``safedeploy.policy``, load it for the container's cgroup v2 and attach the
shared pinned programs; poststop drains the events into the report and removes every map
entry and the state file. Fails closed: any error is one ``safedeploy:`` line on stderr
and exit 1, so the runtime refuses to start the container, with nothing left attached.

Hot path: no bcc, typer, jsonschema or even the policy module: a policy validated once is
cached in kernel form (compiler.compile_policy), keyed by the content hash of its document.
"""

import os
import sys
import time

from . import cgroup, enable_site_packages, origin, read_text, settings, sha256_hex, write_atomic
from .errors import SafedeployError
from .jsonfast import JSONError, dumps, loads

ANNOTATION = "safedeploy.policy"
MODE_ANNOTATION = "safedeploy.mode"
MAX_STATE_BYTES = 4 << 20
CACHE_FORMAT = 4  # bump when compile_policy's output (or what resolve_policy adds) changes
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def _valid_id(cid: str) -> bool:
    """[A-Za-z0-9][A-Za-z0-9_.+-]{0,255} (no regex on the hot path)."""
    return 0 < len(cid) <= 256 and cid[0] in _ALNUM and all(c in _ALNUM or c in "_.+-" for c in cid)


def _valid_policy_name(name: str) -> bool:
    """[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}, never '..'."""
    return (0 < len(name) <= 128 and (name[0] in _ALNUM or name[0] in "_-") and ".." not in name
            and all(c in _ALNUM or c in "_.-" for c in name))
STAGES = {"prestart": "start", "createRuntime": "start", "create": "start", "poststop": "stop"}


class HookError(SafedeployError):
    """A reason to refuse the container; str() is one line."""


# -- input --------------------------------------------------------------------------
def read_state(raw: bytes) -> dict:
    """The OCI state, parsed loosely (runc, crun and podman differ): an object with an id."""
    if len(raw) > MAX_STATE_BYTES:
        raise HookError("OCI state on stdin is larger than 4 MiB")
    try:
        state = loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, JSONError) as e:
        raise HookError(f"OCI state on stdin is not JSON ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:80]})") from None
    if not isinstance(state, dict):
        raise HookError("OCI state on stdin is not a JSON object")
    cid = state.get("id")
    if not isinstance(cid, str) or not _valid_id(cid):
        raise HookError(f"OCI state has no valid container id (got {str(cid)[:60]!r})")
    return state


def annotations_of(state: dict) -> dict[str, str]:
    """Annotations from the state, else from the bundle's config.json."""
    ann = state.get("annotations")
    if isinstance(ann, dict) and ann:
        return {str(k): str(v) for k, v in ann.items()}
    bundle = state.get("bundle")
    if isinstance(bundle, str) and bundle:
        try:
            with open(os.path.join(bundle, "config.json"), "rb") as f:
                cfg = loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            return {}
        ann = cfg.get("annotations") if isinstance(cfg, dict) else None
        if isinstance(ann, dict):
            return {str(k): str(v) for k, v in ann.items()}
    return {}


def stage_of(argv: list[str], state: dict) -> str:
    """'start' or 'stop': from argv, else from the state's status."""
    if argv:
        if argv[0] not in STAGES:
            raise HookError(f"unknown hook stage {argv[0]!r} (expected prestart, createRuntime or poststop)")
        return STAGES[argv[0]]
    return "stop" if state.get("status") == "stopped" else "start"


# -- policy resolution --------------------------------------------------------------
def policy_source(value: str, policy_dir=None) -> tuple[str, bytes]:
    """(source label, document bytes) for an annotation value: NAME, file:/abs, {json}, base64:..."""
    value = value.strip()
    if not value:
        raise HookError(f"annotation {ANNOTATION} is empty")
    if "\0" in value:
        raise HookError(f"annotation {ANNOTATION} contains a NUL byte")
    if value.startswith("{"):
        return "annotation (inline JSON)", value.encode()
    if value.startswith("base64:"):
        import base64  # noqa: PLC0415
        import binascii  # noqa: PLC0415
        try:
            return "annotation (base64)", base64.b64decode(value[7:], validate=True)
        except (binascii.Error, ValueError):
            raise HookError(f"annotation {ANNOTATION}: invalid base64") from None
    if value.startswith("file:"):
        return FILE_SOURCE + value[5:], _read_listed(value[5:])
    if not _valid_policy_name(value):
        raise HookError(f"annotation {ANNOTATION}: {value[:60]!r} is not a policy name, file:, base64: or JSON")
    base = os.fspath(policy_dir or settings.policy_dir())
    for ext in (".yaml", ".yml", ".json"):
        path = os.path.join(base, f"{value}{ext}")
        if os.path.isfile(path):
            return path, _read(path)
    raise HookError(f"unknown policy {value!r}: no {value}.yaml, .yml or .json in {base}")


FILE_SOURCE = "file:"  # a source label: its document's contents are never shown in errors


def _read_listed(path: str) -> bytes:
    """A `file:` policy: only a regular file below a directory SAFEDEPLOY_FILE_DIRS lists
    (symlinks and '..' resolved first). Whoever starts the container sees the hook's
    errors: they must learn nothing about files they could not read themselves."""
    if not os.path.isabs(path):
        raise HookError(f"annotation {ANNOTATION}: file: needs an absolute path, got {_show(path[:80])}")
    dirs = settings.file_dirs()
    if not dirs:
        raise HookError(f"annotation {ANNOTATION}: file: policies are off (no directory is listed in "
                        "SAFEDEPLOY_FILE_DIRS); use a policy name, base64: or inline JSON")
    real = os.path.realpath(path)
    if not any(real.startswith(os.path.realpath(d).rstrip("/") + "/") for d in dirs):
        raise HookError(f"annotation {ANNOTATION}: file: {_show(path[:120])} is outside the directories "
                        f"SAFEDEPLOY_FILE_DIRS lists ({':'.join(dirs)})")
    if not os.path.isfile(real):
        raise HookError(f"cannot read policy {_show(path[:120])}: not a regular file")
    return _read(real)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20 | 1)
    except OSError as e:
        raise HookError(f"cannot read policy {_show(path)}: {e.strerror}") from None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def resolve_policy(value: str, mode: str | None = None, policy_dir=None) -> dict:
    """The compiled policy (compiler.compile_policy) an annotation names, mode override
    applied. Validation runs once per distinct document; then it comes from the cache."""
    source, raw = policy_source(value, policy_dir)
    if mode is not None and mode not in ("audit", "enforce"):
        raise HookError(f"annotation {MODE_ANNOTATION} must be audit or enforce, not {mode[:30]!r}")
    digest = sha256_hex(source.encode() + b"\0" + raw)
    cache = os.path.join(settings.state_dir(), "policy-cache", f"{digest}.json")
    compiled = None
    try:
        compiled = loads(read_text(cache))
    except (OSError, ValueError):
        pass
    if not isinstance(compiled, dict) or compiled.get("format") != CACHE_FORMAT:
        enable_site_packages()
        from .compiler import compile_policy  # noqa: PLC0415
        from .policy import load_policy_text  # noqa: PLC0415
        if source.startswith(FILE_SOURCE):
            from .policy import PolicyError  # noqa: PLC0415
            try:
                policy = load_policy_text(raw, source[len(FILE_SOURCE):])
            except PolicyError as e:  # its messages may quote the file: say where, never what
                raise HookError(f"policy {_show(source[len(FILE_SOURCE):])} is not a valid safedeploy policy "
                                f"({len(e.errors)} problem{'s' if len(e.errors) != 1 else ''}; contents not "
                                f"shown: run 'safedeploy policy validate' on it)") from None
        else:
            policy = load_policy_text(raw, source)  # raises PolicyError (one line each)
        compiled = dict(compile_policy(policy), format=CACHE_FORMAT, source=source, digest=policy.digest,
                        capabilities=list(policy.capabilities), privileged=policy.privileged)
        try:
            write_atomic(cache, dumps(compiled))
        except OSError:
            pass  # no cache: the next start validates again
    if mode is not None:
        compiled["mode"] = mode
    return compiled


# -- state files ----------------------------------------------------------------------
def state_path(cid: str) -> str:
    return os.path.join(settings.state_dir(), f"{cid}.json")


def write_state(cid: str, data: dict) -> None:
    write_atomic(state_path(cid), dumps(data))


def read_state_file(cid: str) -> dict | None:
    try:
        return loads(read_text(state_path(cid)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HookError(f"state file {state_path(cid)} is unreadable: {e}") from None


def state_records() -> dict[int, dict]:
    """cgroup id -> state record, for every readable state file (watch, status)."""
    out = {}
    sdir = settings.state_dir()
    try:
        names = os.listdir(sdir)
    except OSError:
        return out
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            try:
                rec = loads(read_text(os.path.join(sdir, name)))
                out[int(rec["cgid"])] = rec
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return out


# -- stages -----------------------------------------------------------------------------
def container_cgroup(pid: int, mount: str) -> str:
    """The container's own cgroup v2 (under mount, the cgroup2 mount point); never the root
    or the runtime's own cgroup (that would police the host)."""
    path = cgroup.cgroup_of_pid(pid, mount=mount)
    if path == mount:
        raise HookError(f"container process {pid} is in the root cgroup v2: no cgroup of its own to police")
    try:
        own = cgroup.cgroup_of_pid(os.getpid(), mount=mount)
    except cgroup.CgroupError:
        own = None
    if path == own:
        raise HookError(f"container process {pid} shares the runtime's cgroup {path}: refusing to police it")
    return path


def start(state: dict, ann: dict[str, str], log=None, creator: dict | None = None) -> dict | None:
    """prestart/createRuntime: policy -> checks -> maps -> attach -> state file. A
    container created from a policed cgroup (creator) gets that cgroup's policy: by
    inheritance when it was nested under it, else applied to its own cgroup."""
    from . import privileges  # noqa: PLC0415
    cid = state["id"]
    pid = state.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise HookError(f"OCI state of {cid} has no container pid (status {state.get('status')!r})")
    if creator is not None and creator.get("id") == cid:
        raise HookError(f"container {cid} is already policed (state file {state_path(cid)} exists)")
    if creator is not None:
        theirs = creator["compiled"]
        if ANNOTATION in ann:
            mine = resolve_policy(ann[ANNOTATION], ann.get(MODE_ANNOTATION))
            if mine.get("digest") != theirs.get("digest") or mine.get("mode") != theirs.get("mode"):
                raise HookError(f"container {cid} is created from {creator['id']}, policed by policy "
                                f"{theirs.get('name')!r}, but asks for policy {mine.get('name')!r}: refused; a "
                                f"container started by a policed deploy runs under the deploy's policy "
                                f"(drop the {ANNOTATION} annotation)")
        compiled = theirs
    else:
        compiled = resolve_policy(ann[ANNOTATION], ann.get(MODE_ANNOTATION))
    try:  # mountinfo read once: the privileges check, the container's cgroup and the apply
        host = cgroup.mounts()
    except OSError as e:
        raise HookError(f"cannot read /proc/self/mountinfo: {e.strerror}") from None
    mount = cgroup.cgroup2_mount(mounts=host)
    try:
        allowed = privileges.judge(privileges.read_config(state.get("bundle")), compiled, cid, host)
    except privileges.Refused as e:
        raise HookError(str(e)) from None
    if creator is not None and creator["nested"]:
        return None  # inside the policed cgroup already: its programs and report cover it
    path = container_cgroup(pid, mount)
    if read_state_file(cid) is not None:
        raise HookError(f"container {cid} is already policed (state file {state_path(cid)} exists)")
    extra = dict(allowed, parent=creator["id"]) if creator is not None else allowed
    record = {"id": cid, "pid": pid, "compiled": compiled, "cgroup": str(path), "cgid": cgroup.cgroup_id(path),
              "started": time.time(), "attachment": None, "extra": extra}
    record = register_and_apply(record, log, mount)
    if may_refuse_queries(compiled):  # refused UDP queries answered REFUSED at once (dig & co.)
        from . import refuser  # noqa: PLC0415
        try:
            refuser.spawn(record["attachment"]["pin_dir"], record["cgid"], pid)
        except OSError:
            pass  # only the fast failure of those clients is lost, not the policy
    return record


def may_refuse_queries(compiled: dict) -> bool:
    """Whether egress can refuse a real client's DNS query under this policy, so that the
    container needs a refuser (ocihook/refuser.py): in enforce mode, a policy whose default
    is deny (unparseable queries, `dns.unlisted: deny`) or that denies a name, or that names
    its resolvers. Under any other policy every query is let through by name, and a query to
    a denied resolver fails at connect()/sendto() already (a container's sockets are all
    made under the policy): no process is forked for nothing."""
    if compiled.get("mode") == "audit":
        return False
    return bool(compiled.get("default") == "deny" or compiled.get("name_denies") or compiled.get("has_resolvers"))


def register_and_apply(record: dict, log=None, mount: str | None = None) -> dict:
    """State file first, naming the attachment about to be made (a crash from here on leaves
    something gc can clean: releasing what was not attached yet is harmless), then the
    policy, under the lock gc takes before it looks for map entries nobody owns."""
    from . import loader, session  # noqa: PLC0415
    cid = record["id"]
    link = origin.cgid_index(record["cgid"])
    pins = loader.ensure_programs(log)
    record["attachment"] = session.Attachment(record["cgroup"], record["cgid"], pins).to_dict()
    with cgroup.locked(lock_path()):
        write_state(cid, record)
        try:
            os.makedirs(os.path.dirname(link), exist_ok=True)
            _unlink(link)
            os.symlink(os.path.join("..", f"{cid}.json"), link)
            session.apply(record["cgroup"], record["compiled"], log, pins=pins, mount=mount)
        except BaseException:
            _unlink(link)
            _unlink(state_path(cid))
            raise
    return record


def lock_path() -> str:
    """The lock start, `run` and gc share: held while a state file is written and its
    policy applied, and while gc looks for map entries nobody owns."""
    return os.path.join(settings.state_dir(), ".lock")


def spool_path(cid: str) -> str:
    return os.path.join(settings.state_dir(), "spool", f"{cid}.jsonl")


def _read_spool(spool: str) -> dict | None:
    try:
        return loads(read_text(spool))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HookError(f"spooled records {spool} are unreadable: {e}") from None


def _flush(cid: str, data: dict) -> str:
    from . import report  # noqa: PLC0415
    out = data.get("out") or os.path.join(settings.log_dir(), f"{cid}.jsonl")
    try:
        report.write(data["records"], out, data["dropped"], cid, data["policy"], data.get("counters"),
                     extra=data.get("extra"))
    except OSError as e:
        raise HookError(f"cannot write report {out}: {e.strerror or e}; {len(data['records'])} records are "
                        f"kept in {spool_path(cid)} until 'safedeploy gc' can write it") from None
    report.syslog_blocked(data["records"])
    _unlink(spool_path(cid))
    return str(out)


def stop(state: dict) -> str | None:
    """poststop: drain events into the report, remove map entries and the state file.
    A container that is already cleaned (or was never policed) is fine. Holds a lock on
    the state file itself (never replaced while it lives): a poststop and a gc of the same
    container never both drain or both write its report."""
    from . import events, loader, session  # noqa: PLC0415
    import fcntl  # noqa: PLC0415
    cid = state["id"]
    try:
        fd = os.open(state_path(cid), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink == 0:
            return None  # another stop finished it while we waited
        record = read_state_file(cid)
        if record is None:
            return None
        compiled = record["compiled"]
        if not os.path.exists(spool_path(cid)):  # a spool means: released, report still to write
            if record.get("attachment"):
                att = session.Attachment.from_dict(record["attachment"])
            else:  # prestart died between the state file and the attachment: what it may have loaded
                att = session.Attachment(record["cgroup"], record["cgid"], loader.pin_dir())

            def spool(drained) -> None:
                # on disk before the kernel drops them (never by replacing the state file,
                # whose inode carries the lock); a failure here leaves them in the kernel
                records = events.to_records(drained, compiled, cid, frozenset(record.get("stop_pids", ())))
                write_atomic(spool_path(cid), dumps({"records": records, "dropped": drained.dropped,
                                                     "policy": compiled["name"], "out": record.get("report"),
                                                     "extra": record.get("extra"), "counters": drained.counters}))
            session.release(att, compiled, keep=spool)
        data = _read_spool(spool_path(cid))
        out = _flush(cid, data) if data else None
        if os.path.realpath(origin.cgid_index(record["cgid"])) == os.path.realpath(state_path(cid)):
            _unlink(origin.cgid_index(record["cgid"]))
        _unlink(state_path(cid))
        return out
    finally:
        os.close(fd)


def run(argv: list[str], stdin: bytes, log=None) -> int:
    state = read_state(stdin)
    stage = stage_of(argv, state)
    if stage == "stop":
        stop(state)
        return 0
    ann = annotations_of(state)
    try:
        found = origin.policed_origin(state)
    except origin.OriginError as e:
        raise HookError(str(e)) from None
    if ANNOTATION not in ann and found is None:
        return 0  # not ours: touch nothing
    start(state, ann, log, found)
    return 0


def _show(value) -> str:
    """A user-supplied value in a message: quoted and escaped when it is not plain."""
    text = str(value)
    return text if text.isprintable() and " " not in text else repr(text)


def _known(e: Exception) -> bool:
    """A failure of the system (OSError) rather than a bug: its message is enough."""
    return isinstance(e, OSError)


def _fail(msg: str) -> int:
    from .visible import visible  # noqa: PLC0415
    msg = visible(msg)  # one line, whatever came in
    if os.environ.get("SAFEDEPLOY_DETACHED"):  # a background poststop: nobody reads stderr
        try:
            os.makedirs(settings.log_dir(), exist_ok=True)
            with open(os.path.join(settings.log_dir(), "hook-errors.log"), "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} safedeploy: {msg}\n")
        except OSError:
            pass
        return 1
    sys.stderr.write(f"safedeploy: {msg}\n")
    sys.stderr.flush()
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        stdin = sys.stdin.buffer.read(MAX_STATE_BYTES + 1)
        rc = run(argv, stdin, log=lambda m: sys.stderr.write(m + "\n"))
    except SafedeployError as e:
        rc = _fail(str(e))
    except Exception as e:  # noqa: BLE001 — fail closed with one line, whatever it was
        rc = _fail(str(e) if _known(e) else f"internal error: {e.__class__.__name__}: {e}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip interpreter teardown: the runtime is waiting for us


if __name__ == "__main__":
    main()
