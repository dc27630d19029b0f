#!/usr/bin/python3
"""The Grafana dashboard against a real Prometheus scraping a real cluster.

Starts `muonps local --metrics` (a coordinator, 2 optimizer shards and 2
workers as processes on loopback) on a small job, and Prometheus with a
1-second scrape of the file_sd targets file `local` writes. Then:

  - `promtool check metrics` on every endpoint's /metrics, and the metric
    families each role must expose;
  - every PromQL expression of deploy/grafana/muonps-dashboard.json, with
    Grafana's interval variables replaced by concrete windows, must return at
    least one series with a finite value, as an instant query while the job
    runs and as a range query over the run;
  - the dashboard's structure (unique panel ids, the ${datasource} variable)
    and the provisioning files in deploy/grafana/provisioning.

    /usr/bin/python3 tests/observability/prometheus_dashboard_test.py \
        build/cli/muonps .

Standard library only. Exits 0 on success, 1 on failure, 77 (skipped) when
prometheus or promtool is not installed (Debian: prometheus). Prometheus and
`muonps local` are stopped at the end (SIGINT, then SIGKILL), and die with
this process if it is killed.
"""

import ctypes
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

SKIP = 77

# Grafana's interval variables and the windows they get here. With a 1 s
# scrape, a 20 s window holds ~20 samples and, at the test job's
# ~0.3-1 s per step, several optimizer steps.
GRAFANA_VARIABLES = {
    "$__rate_interval": "20s",
    "${__rate_interval}": "20s",
    "$__interval": "5s",
    "${__interval}": "5s",
    "$__range": "5m",
    "${__range}": "5m",
}

STARTUP_TIMEOUT = 60.0  # seconds: cluster formed and targets file written
READY_TIMEOUT = 90.0  # seconds: every target up with MIN_SAMPLES samples
MIN_SAMPLES = 20  # scrapes of each target before the dashboard is evaluated
EVAL_TIMEOUT = 45.0  # seconds: retrying until every expression has a value
STOP_TIMEOUT = 30.0  # seconds: SIGINT to exit, before SIGKILL
HTTP_TIMEOUT = 5.0  # seconds, one HTTP request

# Families each role must expose (muonps_ prefix left off).
EXPECTED_FAMILIES = {
    "coordinator": [
        "coordinator_jobs", "job_step", "job_total_steps", "job_train_loss", "job_validation_loss",
        "job_tokens_per_second", "job_grad_norm", "job_learning_rate", "job_expert_load_max_ratio",
        "cluster_workers", "cluster_shards", "job_step_workers", "job_tokens_total", "job_steps_total",
        "coordinator_task_reassignments_total", "job_step_duration_seconds",
        "job_global_step_duration_seconds"],
    "shard": [
        "shard_tensors", "shard_parameter_bytes", "shard_optimizer_state_bytes",
        "shard_parameter_version", "shard_update_rms", "shard_pushed_bytes_total",
        "shard_pulled_bytes_total", "shard_steps_total", "shard_push_duration_seconds",
        "shard_pull_duration_seconds", "shard_apply_duration_seconds",
        "shard_tensor_update_duration_seconds"],
    "worker": [
        "worker_seconds_total", "worker_last_task_seconds", "worker_tasks_total", "worker_tokens_total",
        "worker_expert_routed_tokens", "worker_model_flops_per_second"],
}
# Every server records these, but prometheus-cpp exposes a family only once
# it has a series: a worker's server (health checks only) shows them after
# its first request, which nothing makes under `muonps local`.
SERVER_FAMILIES = ["grpc_server_handled_total", "grpc_server_handling_seconds",
                   "grpc_server_in_flight_requests"]
SERVER_ROLES = ["coordinator", "shard"]


class TestFailure(Exception):
    pass


def Check(condition, message):
    if not condition:
        raise TestFailure(message)


def DieWithParent():
    """In a spawned process, before exec: SIGKILL when this test dies, even
    by a signal no cleanup sees (e.g. ctest's timeout)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def FreePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def HttpGet(url):
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return response.read().decode("utf-8")


def Tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no %s)\n" % path


# ------------------------------------------------------------------ dashboard

def WalkPanels(panels):
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from WalkPanels(panel.get("panels", []))


def DashboardQueries(dashboard):
    """(panel title, refId, expr) of every target with an expression."""
    queries = []
    for panel in WalkPanels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((panel.get("title", ""), target.get("refId", ""), target["expr"]))
    return queries


def Substitute(expr):
    """The expression with Grafana's interval variables replaced; fails on
    any other variable, which this test would not know how to fill."""
    # Longest names first: $__rate_interval before $__range.
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    Check("$" not in expr, "unknown Grafana variable in %r" % expr)
    return expr


def CheckDashboard(path):
    """The dashboard's structure; returns its queries."""
    with open(path) as f:
        dashboard = json.load(f)
    Check(dashboard.get("uid") == "muonps", "dashboard uid is %r, want 'muonps'" % dashboard.get("uid"))
    Check(isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 36,
          "schemaVersion %r, want >= 36" % dashboard.get("schemaVersion"))
    variables = dashboard.get("templating", {}).get("list", [])
    datasource_vars = [v for v in variables if v.get("name") == "datasource"]
    Check(len(datasource_vars) == 1 and datasource_vars[0].get("type") == "datasource"
          and datasource_vars[0].get("query") == "prometheus",
          "want one variable 'datasource' of type datasource, query prometheus: %r" % datasource_vars)
    ids = [p.get("id") for p in WalkPanels(dashboard.get("panels", []))]
    Check(all(isinstance(i, int) for i in ids), "a panel without an integer id: %r" % ids)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    Check(not duplicates, "duplicate panel ids %r" % duplicates)
    for panel in WalkPanels(dashboard.get("panels", [])):
        if panel.get("type") == "row":
            continue
        for owner in [panel] + panel.get("targets", []):
            ds = owner.get("datasource", {})
            Check(ds.get("uid") == "${datasource}",
                  "panel %r: datasource %r, want uid ${datasource}" % (panel.get("title"), ds))
    queries = DashboardQueries(dashboard)
    Check(queries, "no PromQL expressions in the dashboard")
    for _, _, expr in queries:
        Substitute(expr)
    print("dashboard: %d panels, %d queries, unique ids, ${datasource} variable" % (len(ids), len(queries)))
    return queries


def CheckProvisioning(grafana_dir):
    try:
        import yaml  # python3-yaml (Debian); not in the standard library
    except ImportError:
        print("provisioning: python3-yaml not installed; files not parsed")
        return
    path = os.path.join(grafana_dir, "provisioning", "datasources", "muonps.yaml")
    with open(path) as f:
        doc = yaml.safe_load(f)
    Check(doc.get("apiVersion") == 1, "%s: apiVersion %r" % (path, doc.get("apiVersion")))
    sources = doc.get("datasources") or []
    Check(len(sources) == 1 and sources[0].get("type") == "prometheus",
          "%s: want one prometheus data source" % path)
    Check("MUONPS_PROMETHEUS_URL" in str(sources[0].get("url")),
          "%s: url %r does not read MUONPS_PROMETHEUS_URL" % (path, sources[0].get("url")))
    path = os.path.join(grafana_dir, "provisioning", "dashboards", "muonps.yaml")
    with open(path) as f:
        doc = yaml.safe_load(f)
    Check(doc.get("apiVersion") == 1, "%s: apiVersion %r" % (path, doc.get("apiVersion")))
    providers = doc.get("providers") or []
    Check(len(providers) == 1 and providers[0].get("type") == "file"
          and providers[0].get("options", {}).get("path"), "%s: want one file provider with a path" % path)
    dashboards_path = providers[0]["options"]["path"]
    with open(os.path.join(grafana_dir, "README.md")) as f:
        Check(dashboards_path in f.read(), "README.md does not mount the dashboard at %s" % dashboards_path)
    print("provisioning: data source and dashboard provider parse; dashboards from %s" % dashboards_path)


# ------------------------------------------------------------------ cluster

def WriteCorpus(path):
    """~100 KB of varied sentences: far more than the validation tail's
    minimum (5% must hold one window of max_position_embeddings + 1)."""
    words = ["muon", "shard", "worker", "expert", "router", "gradient", "token", "layer",
             "momentum", "schulz", "newton", "lease", "pull", "push", "step", "norm"]
    with open(path, "w") as f:
        for i in range(2400):
            f.write("The %s sends the %s to the %s at step %d.\n" %
                    (words[i % 16], words[(3 * i + 1) % 16], words[(5 * i + 2) % 16], i))


def WriteJob(path, work_dir):
    """The default MoE model (4 layers, 3 of them MoE with 8 experts) on
    128-token windows: ~0.3-1 s a step on 2 cores. total_steps is far more
    than the test waits for (~100 steps here), so that the job still runs
    on a much faster machine; the test cancels it when done."""
    job = {
        "name": "dashboard-test",
        "seed": "11",
        "model": {"max_position_embeddings": 128},
        "schedule": {"total_steps": 2000, "warmup_steps": 5},
        "data": {"path": os.path.join(work_dir, "corpus.txt"), "eval_every": 5, "eval_windows": 4},
        "batch": {"slots": 4, "micro_batch": 2},
        "checkpoint": {"dir": os.path.join(work_dir, "checkpoints"), "every_steps": 20, "keep_last": 1},
    }
    with open(path, "w") as f:
        json.dump(job, f, indent=1)


def ReadTargets(path):
    """[(role, host:port)] from a Prometheus file_sd file."""
    with open(path) as f:
        groups = json.load(f)
    return [(g["labels"]["role"], t) for g in groups for t in g["targets"]]


def WaitForFile(path, process, log, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        Check(process.poll() is None,
              "muonps local exited (%s) before writing %s:\n%s" % (process.returncode, path, Tail(log)))
        Check(time.monotonic() < deadline, "no %s after %.0f s:\n%s" % (path, timeout, Tail(log)))
        time.sleep(0.2)


def Stop(process, name):
    """SIGINT, then SIGKILL after STOP_TIMEOUT; returns the exit status."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print("%s did not stop within %.0f s of SIGINT; SIGKILL" % (name, STOP_TIMEOUT))
            process.kill()
            process.wait()
    return process.returncode


# ------------------------------------------------------------------ prometheus

class Prometheus:
    def __init__(self, url):
        self.url = url

    def Api(self, path, **params):
        try:
            body = json.loads(HttpGet("%s/api/v1/%s?%s" % (self.url, path, urllib.parse.urlencode(params))))
        except urllib.error.HTTPError as e:  # a bad query: the error is in the body
            raise TestFailure("%s %r: HTTP %d: %s" % (path, params, e.code, e.read().decode("utf-8", "replace")))
        Check(body.get("status") == "success", "%s %r: %r" % (path, params, body))
        return body["data"]

    def Query(self, expr, at):
        """Series of an instant query at `at` (unix seconds): [(labels, value)]."""
        data = self.Api("query", query=expr, time="%.3f" % at)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        Check(data["resultType"] == "vector", "%r: result type %s" % (expr, data["resultType"]))
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def QueryRange(self, expr, start, end, step):
        """Series of a range query: [(labels, [values])]."""
        data = self.Api("query_range", query=expr, start="%.3f" % start, end="%.3f" % end, step=step)
        Check(data["resultType"] == "matrix", "%r: result type %s" % (expr, data["resultType"]))
        return [(r["metric"], [float(v) for _, v in r["values"]]) for r in data["result"]]


def WriteConfig(path, targets_file):
    # JSON is YAML; promtool checks it below.
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "muonps",
            "file_sd_configs": [{"files": [targets_file], "refresh_interval": "1s"}],
        }],
    }
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def WaitReady(prom, expected_targets, local, local_log):
    """Until every target is up and has MIN_SAMPLES samples."""
    deadline = time.monotonic() + READY_TIMEOUT
    status = ""
    while True:
        Check(local.poll() is None,
              "muonps local exited (%s) before Prometheus had %d scrapes (raise total_steps?):\n%s"
              % (local.returncode, MIN_SAMPLES, Tail(local_log)))
        Check(time.monotonic() < deadline, "Prometheus not ready after %.0f s: %s" % (READY_TIMEOUT, status))
        try:
            active = prom.Api("targets", state="active")["activeTargets"]
            up = sorted(t["labels"]["instance"] for t in active if t["health"] == "up")
            counts = prom.Query('count_over_time(up{job="muonps"}[2m])', time.time())
            fewest = min((v for _, v in counts), default=0)
            status = "%d/%d targets up, fewest samples %d" % (len(up), len(expected_targets), fewest)
            if up == sorted(expected_targets) and len(counts) == len(expected_targets) and fewest >= MIN_SAMPLES:
                print("prometheus: %s" % status)
                return
        except (OSError, ValueError) as e:  # not serving yet
            status = str(e)
        time.sleep(1.0)


# ------------------------------------------------------------------ checks

def CheckMetrics(promtool, targets):
    """promtool check metrics on every endpoint, and the expected families."""
    failures = []
    for role, target in targets:
        text = HttpGet("http://%s/metrics" % target)
        families = set(re.findall(r"^# TYPE muonps_(\S+) ", text, re.MULTILINE))
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        ours = [c for c in complaints if not c.startswith("exposer_")]
        library = [c for c in complaints if c.startswith("exposer_")]
        verdict = "OK" if result.returncode == 0 else "exit %d" % result.returncode
        print("promtool check metrics %-11s %s: %s, %d muonps_ families, %d lines"
              % (role, target, verdict, len(families), text.count("\n")))
        for c in library:
            print("    (prometheus-cpp's own metric) %s" % c)
        for c in ours:
            print("    %s" % c)
        if ours or (result.returncode != 0 and not library):
            failures.append("%s %s: promtool: %s" % (role, target, "; ".join(ours) or verdict))
        expected = EXPECTED_FAMILIES[role] + (SERVER_FAMILIES if role in SERVER_ROLES else [])
        missing = [f for f in expected if f not in families]
        if missing:
            failures.append("%s %s: missing families %s" % (role, target, ", ".join("muonps_" + m for m in missing)))
    Check(not failures, "\n".join(failures))


def Finite(values):
    return sum(1 for v in values if math.isfinite(v))


def EvaluateDashboard(prom, queries, local, local_log, run_start):
    """Every query, instant at now while the job runs, until all have a
    finite value (some need a step, an eval or a histogram window first),
    then as range queries over the run."""
    deadline = time.monotonic() + EVAL_TIMEOUT
    while True:
        Check(local.poll() is None, "muonps local exited (%s) during the evaluation (raise total_steps?):\n%s"
              % (local.returncode, Tail(local_log)))
        now = time.time()
        instant = []
        for title, ref, expr in queries:
            series = prom.Query(Substitute(expr), now)
            example = next((v for _, v in series if math.isfinite(v)), float("nan"))
            instant.append((len(series), Finite(v for _, v in series), example))
        if all(finite > 0 for _, finite, _ in instant) or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    failures = []
    # series, finite: of the instant query; range: series of the range query
    # with a finite value; value: the first finite one of the instant query.
    print("%-6s %-6s %-6s %-10s %s" % ("series", "finite", "range", "value", "panel / ref: expression"))
    for (title, ref, expr), (count, finite, example) in zip(queries, instant):
        ranged = prom.QueryRange(Substitute(expr), run_start, now, "2s")
        ranged_finite = sum(1 for _, values in ranged if Finite(values) > 0)
        print("%-6d %-6d %-6d %-10.4g %s / %s: %s" % (count, finite, ranged_finite, example, title, ref, expr))
        if finite == 0:
            failures.append("%s / %s: no finite value at %.0f: %s" % (title, ref, now, expr))
        if ranged_finite == 0:
            failures.append("%s / %s: no finite value over the run: %s" % (title, ref, expr))
    Check(not failures, "\n".join(failures))


# ------------------------------------------------------------------ main

def Run(binary, source_dir, prometheus_bin, promtool, work_dir):
    grafana_dir = os.path.join(source_dir, "deploy", "grafana")
    queries = CheckDashboard(os.path.join(grafana_dir, "muonps-dashboard.json"))
    CheckProvisioning(grafana_dir)

    WriteCorpus(os.path.join(work_dir, "corpus.txt"))
    job_file = os.path.join(work_dir, "job.json")
    WriteJob(job_file, work_dir)
    log_dir = os.path.join(work_dir, "local")
    local_log = os.path.join(work_dir, "local.log")
    processes = {}
    try:
        with open(local_log, "w") as log:
            processes["local"] = subprocess.Popen(
                [binary, "local", "--metrics", "--shards", "2", "--workers", "2", "--log_dir", log_dir,
                 job_file], stdout=log, stderr=subprocess.STDOUT, preexec_fn=DieWithParent,
                cwd=work_dir)  # local's default checkpoint and data root
        local = processes["local"]
        targets_file = os.path.join(log_dir, "prometheus_targets.json")
        WaitForFile(targets_file, local, local_log, STARTUP_TIMEOUT)
        targets = ReadTargets(targets_file)
        roles = sorted(role for role, _ in targets)
        Check(roles == ["coordinator", "shard", "shard", "worker", "worker"], "targets by role: %r" % roles)

        config = os.path.join(work_dir, "prometheus.yml")
        WriteConfig(config, targets_file)
        check = subprocess.run([promtool, "check", "config", config], capture_output=True, text=True)
        Check(check.returncode == 0, "promtool check config:\n%s%s" % (check.stdout, check.stderr))
        port = FreePort()
        prom_log = os.path.join(work_dir, "prometheus.log")
        run_start = time.time()
        with open(prom_log, "w") as log:
            processes["prometheus"] = subprocess.Popen(
                [prometheus_bin, "--config.file=" + config,
                 "--storage.tsdb.path=" + os.path.join(work_dir, "tsdb"),
                 "--web.listen-address=127.0.0.1:%d" % port],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=DieWithParent)
        prom = Prometheus("http://127.0.0.1:%d" % port)
        try:
            WaitReady(prom, [t for _, t in targets], local, local_log)
        except TestFailure:
            print("prometheus log:\n" + Tail(prom_log))
            raise
        CheckMetrics(promtool, targets)
        EvaluateDashboard(prom, queries, local, local_log, run_start)
    finally:
        Stop(processes.get("prometheus"), "prometheus")
        status = Stop(processes.get("local"), "muonps local")
        if status is not None:
            # 130: cancelled by the SIGINT above (checkpointed); 0: the job
            # ended on its own first.
            print("muonps local exit status %s" % status)


def main(argv):
    if len(argv) != 3:
        print("usage: %s MUONPS_BINARY SOURCE_DIR" % argv[0])
        return 2
    binary, source_dir = os.path.abspath(argv[1]), os.path.abspath(argv[2])
    prometheus_bin, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus_bin is None or promtool is None:
        print("prometheus or promtool not installed (Debian: prometheus); skipped")
        return SKIP
    start = time.monotonic()
    work_dir = tempfile.mkdtemp(prefix="muonps-dashboard-")
    try:
        Run(binary, source_dir, prometheus_bin, promtool, work_dir)
    except (TestFailure, OSError, ValueError, subprocess.SubprocessError) as e:
        print("FAILED: %s\nlogs kept in %s" % (e, work_dir))
        return 1
    shutil.rmtree(work_dir, ignore_errors=True)
    print("PASSED in %.1f s" % (time.monotonic() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
