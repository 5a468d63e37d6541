"""The ``safedeploy`` command line (typer). Thin: parse, call the module that does the job,
turn its one-line errors into ``safedeploy: ...`` on stderr and an exit status."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__

app = typer.Typer(
    name="safedeploy",
    help="Hermetic deploy environments: only the destinations a policy allows are reachable; "
         "the circular dependencies of an outage fail fast with EPERM and are reported.",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None, add_completion=False)
policy_app = typer.Typer(help="Validate and explain policies.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


def _err(msg: str) -> None:
    typer.echo(msg if msg.startswith("safedeploy:") else f"safedeploy: {msg}", err=True)


@contextlib.contextmanager
def _errors():
    """Known failures (ocihook.errors.SafedeployError) become their lines on stderr and
    exit status 1, never a traceback."""
    from .errors import SafedeployError
    try:
        yield
    except SafedeployError as e:
        for line in e.lines():
            _err(line)
        raise typer.Exit(1) from None
    except PermissionError as e:
        _err(f"{e.filename or 'operation'}: permission denied (run as root)")
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safedeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


# -- policy -------------------------------------------------------------------------
@policy_app.command("validate")
def policy_validate(files: List[Path] = typer.Argument(..., help="Policy files (YAML or JSON).")) -> None:
    """Check policies against the schema and semantics. Exit 0 when all are valid; else
    print `FILE: <json-path>: <message>` lines and exit 1."""
    from .policy import validate_files
    problems = validate_files(files)
    for line in problems:
        typer.echo(line, err=True)
    if problems:
        raise typer.Exit(1)
    for f in files:
        typer.echo(f"{f}: valid")


@policy_app.command("explain")
def policy_explain(
    file: Path = typer.Argument(..., help="Policy file."),
    dest: str = typer.Argument(..., help="name[:port], ip[:port] or [v6]:port, e.g. api.github.com:443"),
    proto: str = typer.Option("tcp", "--proto", help="tcp, udp, or another IP protocol (icmp, sctp, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print the verdict for one destination and the rule that decided it.

    A name with a port is a connection to it (as judged for an address learned from its
    DNS answer); a bare name is its DNS lookup (what the kernel lets through or drops).

    Examples: safedeploy policy explain deploy.yaml api.github.com:443
              safedeploy policy explain deploy.yaml api.github.com
    """
    from .policy import IP_PROTOCOLS, decide, decide_query, display_ip, load_policy_file, parse_dest, protocol_name
    if proto not in ("tcp", "udp", "udplite", "mptcp") and proto not in IP_PROTOCOLS:
        _err(f"--proto must be tcp, udp or an IP protocol name ({', '.join(sorted(IP_PROTOCOLS))}), not {proto!r}")
        raise typer.Exit(2)
    with _errors():
        pol = load_policy_file(file)
        try:
            d = parse_dest(dest, proto)
        except ValueError as e:
            _err(f"{dest}: {e}")
            raise typer.Exit(2) from None
        lookup = d.name is not None and d.port is None
        dec = decide_query(pol, d.name) if lookup else decide(pol, d)
    out = {"dest": dest, "name": d.name, "ip": display_ip(d.ip) if d.ip else None, "port": d.port,
           "proto": d.proto, "kind": "dns" if lookup else "connect", "verdict": dec.verdict,
           "effective": dec.effective, "rule": dec.rule_text, "reason": dec.reason, "mode": pol.mode,
           "capabilities": list(pol.capabilities), "privileged": pol.privileged,
           "protocols": [protocol_name(p) for p in pol.protocols], "raw_sockets": pol.raw_sockets,
           "source_routes": pol.source_routes, "serve_dns": pol.serve_dns, "connect_error": pol.connect_error}
    if as_json:
        typer.echo(json.dumps(out))
        return
    why = f" ({dec.reason})" if dec.reason else ""
    what = f"DNS lookup of {d.name}" if lookup else f"{dest} [{d.proto}]"
    typer.echo(f"{dec.verdict.upper()} {what} — rule: {dec.rule_text}{why}; "
               f"in {pol.mode} mode this is {dec.effective}")
    typer.echo(f"privileges: {_privileges(pol)}")
    named = ", ".join(str(protocol_name(p)) for p in pol.protocols) or "none"
    typer.echo(f"policy: other IP protocols allowed: {named}; raw_sockets: {pol.raw_sockets}; "
               f"source_routes: {pol.source_routes}; serve_dns: {pol.serve_dns}; "
               f"a refused connect returns {pol.connect_error}"
               f"{' (EHOSTUNREACH to an address only an unlisted name resolved to)' if pol.connect_error == 'EPERM' else ''}")


def _privileges(pol) -> str:
    """What the policy lets a run keep and a container have, of what could take it out."""
    if pol.privileged:
        return ("privileged: true — every capability, --privileged, writable cgroupfs: "
                "a process that wants out of the cgroup can leave (docs/security.md)")
    if pol.capabilities:
        return (f"capabilities: {', '.join(pol.capabilities)} kept by runs and allowed in containers; "
                "every other way out of the cgroup is dropped or refused")
    return "none: runs drop, and containers are refused, every capability that leads out of the cgroup"


@policy_app.command("suggest")
def policy_suggest(
    reports: List[Path] = typer.Argument(..., help="Reports of audit runs (files or ids)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Extend this policy; print a diff too."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the policy here (default stdout)."),
    name: str = typer.Option("suggested", "--name", help="Policy name when there is no --base."),
) -> None:
    """The smallest policy that would have let audit runs pass: names (with their ports)
    where the kernel knew the name, addresses otherwise.

    Workflow: safedeploy run --audit --policy p.yaml -- ./deploy.sh; then
    safedeploy policy suggest <report> --base p.yaml -o p2.yaml
    """
    from . import report, settings
    from .policy import load_policy_file
    from .suggest import diff, suggest, to_yaml
    with _errors():
        records = []
        for r in reports:
            path = r if r.exists() else Path(settings.log_dir()) / f"{r}.jsonl"
            records += report.load(path)
        base_policy = load_policy_file(base) if base else None
        doc, problems = suggest(records, base_policy, name)
    text = to_yaml(doc)
    if output:
        output.write_text(text)
        _err(f"wrote {output}")
    else:
        typer.echo(text, nl=False)
    if base:
        typer.echo(diff(base, text), err=True, nl=False)
    for p in problems:
        _err(f"warning: {p}")


# -- run ----------------------------------------------------------------------------
@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_cmd(
    cmd: List[str] = typer.Argument(..., help="The command, after --."),
    policy: Path = typer.Option(..., "--policy", "-p", help="Policy file (YAML or JSON)."),
    audit: bool = typer.Option(False, "--audit", help="Block nothing; record what would be blocked."),
    report_file: Optional[Path] = typer.Option(None, "--report", help="Write the report here "
                                               "(default $SAFEDEPLOY_LOG_DIR/<run-id>.jsonl)."),
    fail_on_violation: bool = typer.Option(False, "--fail-on-violation",
                                           help="Exit 3 when anything was blocked or would have been (CI gates)."),
    keep_cap: List[str] = typer.Option([], "--keep-cap", metavar="CAP",
                                       help="Keep a capability that run drops by default (repeatable): "
                                            "SYS_ADMIN, NET_ADMIN, BPF, NET_RAW, SYS_MODULE, SYS_PTRACE, "
                                            "DAC_READ_SEARCH, SYS_RAWIO, PERFMON. Each one is a way out: "
                                            "see docs/security.md."),
) -> None:
    """Run CMD (and every process it starts) in its own cgroup under a policy.

    Example: safedeploy run --policy deploy.yaml -- ./deploy.sh --env prod

    Exits with CMD's status (or 3 with --fail-on-violation when anything was blocked or
    would have been); blocked destinations are summarised on stderr.

    CMD cannot leave the cgroup: it gets a cgroup namespace and a cgroup2 view rooted at
    its own cgroup, and loses the capabilities that would let it out (--keep-cap opts back in).
    """
    from . import caps, loader, report, runner
    from .policy import load_policy_file
    for c in keep_cap:
        try:
            caps.normalize(c)
        except caps.CapError as e:
            _err(f"--keep-cap: {e}")
            raise typer.Exit(2) from None
        if caps.normalize(c) not in caps.DANGEROUS:
            _err(f"--keep-cap: {caps.normalize(c)} is never dropped (only {', '.join(caps.DANGEROUS)} are)")
            raise typer.Exit(2)
    with _errors():
        pol = load_policy_file(policy)
        if audit:
            pol = dataclasses.replace(pol, mode="audit")
        res = runner.run(cmd, pol, report_file, log=loader.stderr_log, keep=keep_cap)
    for line in report.summary(res.records):
        _err(line)
    if res.dropped:
        _err(f"{res.dropped} decisions were counted but not kept in detail: the run's events quota was full "
             "(enforcement unaffected)")
    kept = ", ".join(res.kept) if res.kept else "none"
    _err(f"report: {res.report_path} ({len(res.records)} destinations, {res.violations} violations; "
         f"capabilities kept: {kept})")
    if fail_on_violation and res.violations:
        raise typer.Exit(runner.EXIT_VIOLATION)
    raise typer.Exit(res.returncode)


# -- report -------------------------------------------------------------------------
@app.command("report")
def report_cmd(
    target: str = typer.Argument(..., help="A report file, a container/run id or id prefix, or a podman container name."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Show a report: who tried to reach what, and what was blocked."""
    from . import report, settings
    with _errors():
        path = report.find(target, settings.log_dir())
        records = report.load(path)
        summary = report.load_summary(path)
    if fmt == "json":
        for rec in report.aggregate(records):
            typer.echo(json.dumps(rec))
        if summary:
            typer.echo(json.dumps(summary))
    elif fmt == "table":
        typer.echo(report.format_table(records, summary), nl=False)
    else:
        _err(f"--format must be table or json, not {fmt!r}")
        raise typer.Exit(2)


@app.command("watch")
def watch_cmd(
    target: Optional[str] = typer.Argument(None, help="A container or run id (or prefix), or a cgroup id; "
                                           "default: every policed cgroup."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Stop after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event."),
    wide: bool = typer.Option(False, "--wide", help="Whole lines: do not cut them to the terminal's width."),
) -> None:
    """Live: every blocked or would-block attempt as it happens — destination, DNS name,
    container or run, deciding rule, process and command line. Ctrl-C stops."""
    from .visible import visible
    from .watch import watch
    what = visible(target) if target else "every policed cgroup"
    with _errors():
        watch(target, duration, as_json, out=lambda line: typer.echo(line), wide=wide,
              ready=lambda: _err(f"watching {what} (Ctrl-C stops)"))


# -- status / doctor ----------------------------------------------------------------
@app.command("status")
def status_cmd() -> None:
    """Policed cgroups, program versions and map fill levels."""
    from . import loader
    from .pinned import PinnedMaps
    from .hook import state_records
    from .visible import visible
    from .watch import owner_text
    root = Path(loader.settings.bpffs_root())
    current = Path(loader.pin_dir())
    versions = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not versions:
        typer.echo(f"no programs pinned under {root} (they are compiled on first use)")
        typer.echo("policed cgroups: 0")
        return
    with _errors():
        total = 0
        for ver in versions:
            if not loader.is_pinned(ver):
                typer.echo(f"version {ver.name}: incomplete pins")
                continue
            tag = " (current)" if ver == current else ""
            with PinnedMaps.open(ver) as maps:
                cgs = maps.policed_cgroups()
                total += len(cgs)
                typer.echo(f"version {ver.name}{tag}: {len(cgs)} policed cgroups")
                owners = state_records()
                counts = maps.event_counts()
                for cgid, val in sorted(cgs.items()):
                    mode = "audit" if val.mode else "enforce"
                    rec = owners.get(cgid)
                    who = owner_text(rec, cgid)
                    pol = visible(rec.get("compiled", {}).get("name", "?")) if rec else "?"
                    c = counts.get(cgid, {})
                    typer.echo(f"  {who}: policy {pol} ({mode}), blocked {c.get('blocked', 0)}, "
                               f"would-block {c.get('would-block', 0)}, allowed {c.get('allowed', 0)}")
                for name, (n, cap) in maps.fill().items():
                    typer.echo(f"  map {name}: {n}/{cap}")
                for name, n in maps.stats().items():
                    typer.echo(f"  {name}: {n}")
        typer.echo(f"policed cgroups: {total}")


@app.command("doctor")
def doctor_cmd(hooks_dir: Optional[Path] = typer.Option(None, "--hooks-dir", show_default=False,
                                                         help="The hooks.d to check (default: "
                                                              "/usr/share/containers/oci/hooks.d).")) -> None:
    """Check kernel, cgroup v2, bpffs, privileges, bcc, headers, runtimes, and that the hooks.d
    entries run the hook (entry -> launcher -> python -> package)."""
    from .doctor import run_checks
    ok = True
    for name, good, detail, required in run_checks(hooks_dir):
        mark = "ok  " if good else ("FAIL" if required else "warn")
        typer.echo(f"{mark} {name}: {detail}")
        ok &= good or not required
    raise typer.Exit(0 if ok else 1)


@app.command("install")
def install_cmd(
    hooks_dir: Path = typer.Option(Path("/usr/share/containers/oci/hooks.d"), "--hooks-dir",
                                   help="Where podman reads oci-hooks(5) files (stock podman: only this one)."),
    hook_path: Optional[Path] = typer.Option(None, "--hook-path", show_default=False,
                                             help="Where to put the hook launcher the hooks.d files point to "
                                                  "(default: /usr/local/libexec/safedeploy/safedeploy-hook; "
                                                  "/usr/libexec/... for the .deb)."),
    preload: bool = typer.Option(True, "--preload/--no-preload", help="Compile and pin the programs now."),
) -> None:
    """Install the OCI hook (hooks.d files + launcher), /etc/safedeploy/policies with an
    example, mount bpffs and preload the programs, so container starts are warm.

    Then: podman run --annotation safedeploy.policy=example ...
    """
    from .install import DEFAULT_HOOK_PATH, install
    with _errors():
        install(hooks_dir, hook_path or DEFAULT_HOOK_PATH, preload, log=typer.echo)


@app.command("uninstall")
def uninstall_cmd(
    hooks_dir: Path = typer.Option(Path("/usr/share/containers/oci/hooks.d"), "--hooks-dir"),
    hook_path: Optional[Path] = typer.Option(None, "--hook-path", show_default=False),
) -> None:
    """Remove the hook and hooks.d files; clean state; unpin programs no container uses.
    Policies and reports are kept."""
    from .install import DEFAULT_HOOK_PATH, uninstall
    with _errors():
        uninstall(hooks_dir, hook_path or DEFAULT_HOOK_PATH, log=typer.echo)


@app.command("gc")
def gc_cmd(all_versions: bool = typer.Option(False, "--all", help="Also unpin the current programs if no "
                                             "container uses them (package removal).")) -> None:
    """Clean up after containers whose poststop never ran (a killed runtime): write their
    reports, drop their map entries and state, remove unused old program versions."""
    from .install import gc, retire
    with _errors():
        if all_versions:
            retire(log=typer.echo)
            return
        n = gc(log=typer.echo)
    typer.echo(f"gc: {n} objects removed")


@app.command("preload")
def preload_cmd() -> None:
    """Mount bpffs and compile/pin the programs now, so the next container start is warm
    (run at boot by safedeploy.service, and by `install`)."""
    from . import loader
    with _errors():
        loader.ensure_bpffs()
        typer.echo(f"programs: {loader.ensure_programs(log=typer.echo)}")


@app.command("demo")
def demo_cmd(runtime: str = typer.Option("auto", "--runtime", help="podman, runc or auto (podman if installed).")) -> None:
    """The main job on a built-in example: a real busybox container under the policy `demo`
    reaches its package mirror, is refused the circular dependency (the auth service it
    should repair) at once, and the report is printed."""
    from .demo import run_demo
    with _errors():
        rc = run_demo(runtime, log=typer.echo)
    raise typer.Exit(rc)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
