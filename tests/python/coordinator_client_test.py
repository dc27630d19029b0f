#!/usr/bin/python3
"""Drives the coordinator from Python, through the .proto files alone.

No C++ client code is involved: the stubs are generated at test time from
proto/, and a real cluster (one coordinator, one optimizer shard, one worker)
is started from the built `muonps` binary. The test checks what any gRPC
client relies on: health, cluster membership, submit/watch/get/list/cancel,
and the status codes of the documented errors.

    MUONPS_BINARY=build/cli/muonps MUONPS_SOURCE_DIR=. \
        /usr/bin/python3 tests/python/coordinator_client_test.py

Stubs come from the same protoc that builds the C++ code plus gRPC's
grpc_python_plugin (Debian: protobuf-compiler, protobuf-compiler-grpc), not
from grpc_tools: Debian 12's python3-grpc-tools bundles protoc 3.5.1, which
rejects the proto3 `optional` fields of job.proto. MUONPS_PROTOC and
MUONPS_GRPC_PYTHON_PLUGIN override the tools found on PATH.

Exits 77 (skipped) when the grpc module or the stub generators are missing.
"""

import contextlib
import ctypes
import glob
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

SKIP = 77

try:
    import grpc
except ImportError:
    print("python3 cannot import grpc (install python3-grpcio); skipped")
    sys.exit(SKIP)

SOURCE_DIR = os.environ.get("MUONPS_SOURCE_DIR", "")
BINARY = os.environ.get("MUONPS_BINARY", "")
PROTOC = os.environ.get("MUONPS_PROTOC") or shutil.which("protoc")
GRPC_PYTHON_PLUGIN = (os.environ.get("MUONPS_GRPC_PYTHON_PLUGIN")
                      or shutil.which("grpc_python_plugin"))

# Filled by GenerateStubs: the generated modules.
job_pb2 = coordinator_pb2 = coordinator_pb2_grpc = None
health_pb2 = health_pb2_grpc = None

WORK_DIR = ""  # temp dir: stubs, corpus, checkpoints, service logs
RPC_TIMEOUT = 10.0  # seconds, unary calls
STARTUP_TIMEOUT = 20.0  # seconds, cluster up and registered
SMALL_JOB_TIMEOUT = 40.0  # seconds, the 8-step job from submit to end


def GenerateStubs(out_dir):
    """Runs protoc over proto/ into out_dir and imports the modules."""
    global job_pb2, coordinator_pb2, coordinator_pb2_grpc, health_pb2, health_pb2_grpc
    os.makedirs(out_dir)
    proto_dir = os.path.join(SOURCE_DIR, "proto")
    protos = sorted(glob.glob(os.path.join(proto_dir, "muonps", "v1", "*.proto")))
    protos.append(os.path.join(proto_dir, "grpc", "health", "v1", "health.proto"))
    subprocess.run([PROTOC, "-I", proto_dir,
                    "--plugin=protoc-gen-grpc_python=" + GRPC_PYTHON_PLUGIN,
                    "--python_out=" + out_dir, "--grpc_python_out=" + out_dir] + protos,
                   check=True)
    sys.path.insert(0, out_dir)
    # health.proto lives at grpc/health/v1/, so its modules are
    # grpc.health.v1.*, inside the already imported grpc package.
    grpc.__path__.append(os.path.join(out_dir, "grpc"))
    from muonps.v1 import job_pb2 as job
    from muonps.v1 import coordinator_pb2 as coordinator
    from muonps.v1 import coordinator_pb2_grpc as coordinator_grpc
    from grpc.health.v1 import health_pb2 as health
    from grpc.health.v1 import health_pb2_grpc as health_grpc
    job_pb2, coordinator_pb2, coordinator_pb2_grpc = job, coordinator, coordinator_grpc
    health_pb2, health_pb2_grpc = health, health_grpc


def DieWithParent():
    """In a spawned service, before exec: SIGKILL when this test process dies,
    even by a signal no cleanup sees (e.g. ctest's timeout)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def Ended(state):
    return state in (coordinator_pb2.JOB_STATE_SUCCEEDED, coordinator_pb2.JOB_STATE_FAILED,
                     coordinator_pb2.JOB_STATE_CANCELLED)


def WriteCorpus(path):
    """64 sentences, 3374 bytes: the default 5% validation tail (168 byte
    tokens) holds the T + 1 = 33 tokens LoadTokenCorpus requires."""
    words = ["muon", "shard", "worker", "expert", "router", "gradient", "token", "layer"]
    with open(path, "w") as f:
        for i in range(64):
            f.write("The %s sends the %s to the %s at step %d.\n" %
                    (words[i % 8], words[(3 * i + 1) % 8], words[(5 * i + 2) % 8], i))


def TinySpec(name, total_steps, checkpoint_dir=""):
    """A JobSpec small enough that a step takes milliseconds on one core."""
    spec = job_pb2.JobSpec(name=name, seed=7)
    m = spec.model
    m.hidden_size = 64
    m.num_hidden_layers = 2
    m.num_attention_heads = 2
    m.max_position_embeddings = 32
    m.n_routed_experts = 4
    m.num_experts_per_tok = 2
    m.intermediate_size = 128
    m.moe_intermediate_size = 32
    spec.schedule.total_steps = total_steps
    spec.schedule.warmup_steps = 2
    spec.data.path = os.path.join(WORK_DIR, "corpus.txt")
    spec.data.eval_every = 4
    spec.data.eval_windows = 4
    spec.batch.slots = 2
    spec.batch.micro_batch = 2
    if checkpoint_dir:
        spec.checkpoint.dir = checkpoint_dir
    return spec


class CoordinatorClientTest(unittest.TestCase):
    """One cluster for every test; each test ends the jobs it submits, since
    jobs run one at a time."""

    @classmethod
    def setUpClass(cls):
        cls.procs = {}
        # Class cleanups run even when setUpClass fails half-way.
        cls.addClassCleanup(cls.StopCluster)
        port_file = os.path.join(WORK_DIR, "coordinator.port")
        cls.Spawn("coordinator", ["coordinator", "--listen", "127.0.0.1:0",
                                  "--port_file", port_file, "--lease_seconds", "3",
                                  "--checkpoint_root", WORK_DIR])
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not os.path.exists(port_file):
            cls.CheckAlive()
            if time.monotonic() > deadline:
                raise AssertionError("coordinator wrote no port file")
            time.sleep(0.05)
        with open(port_file) as f:
            cls.address = "127.0.0.1:%d" % int(f.read())
        cls.Spawn("shard", ["shard", "--coordinator", cls.address,
                            "--listen", "127.0.0.1:0", "--threads", "1",
                            "--checkpoint_root", WORK_DIR])
        cls.Spawn("worker", ["worker", "--coordinator", cls.address, "--threads", "1",
                             "--data_root", WORK_DIR])
        cls.channel = grpc.insecure_channel(cls.address)
        cls.jobs = coordinator_pb2_grpc.JobServiceStub(cls.channel)
        cls.health = health_pb2_grpc.HealthStub(cls.channel)

    @classmethod
    def Spawn(cls, name, args):
        log = open(os.path.join(WORK_DIR, name + ".log"), "w")
        cls.procs[name] = subprocess.Popen([BINARY] + args, stdout=log, stderr=subprocess.STDOUT,
                                           preexec_fn=DieWithParent)
        log.close()

    @classmethod
    def CheckAlive(cls):
        for name, proc in cls.procs.items():
            if proc.poll() is not None:
                raise AssertionError("%s exited with status %d (log: %s.log)" %
                                     (name, proc.returncode, name))

    @classmethod
    def StopCluster(cls):
        if getattr(cls, "channel", None) is not None:
            cls.channel.close()
        # Workers and shards first, so none spends its lease retrying a
        # coordinator that is gone.
        for name in ("worker", "shard", "coordinator"):
            proc = cls.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def setUp(self):
        self.CheckAlive()
        self.WaitForCluster()

    def WaitForCluster(self):
        """Health SERVING, then one shard and one worker with live leases."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        serving = health_pb2.HealthCheckResponse.SERVING
        cluster = None
        while time.monotonic() < deadline:
            self.CheckAlive()
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=""),
                                           timeout=1.0).status
                if status == serving:
                    cluster = self.jobs.GetCluster(coordinator_pb2.GetClusterRequest(),
                                                   timeout=RPC_TIMEOUT)
                    if len(cluster.shards) == 1 and len(cluster.workers) == 1:
                        return cluster
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            time.sleep(0.05)
        self.fail("cluster not ready within %.0f s: %s" % (STARTUP_TIMEOUT, cluster))

    def Submit(self, spec):
        response = self.jobs.SubmitJob(coordinator_pb2.SubmitJobRequest(spec=spec),
                                       timeout=RPC_TIMEOUT)
        self.assertTrue(response.job_id)
        return response

    def Get(self, job_id):
        return self.jobs.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id),
                                timeout=RPC_TIMEOUT).job

    def Cancel(self, job_id):
        return self.jobs.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job_id),
                                   timeout=RPC_TIMEOUT).job

    def Watch(self, job_id, timeout):
        return self.jobs.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id),
                                  timeout=timeout)

    def WatchUntilStep(self, job_id):
        """Opens a watch and reads it up to the first STEP event; returns the
        stream, still open."""
        stream = self.Watch(job_id, SMALL_JOB_TIMEOUT)
        for event in stream:
            if event.kind == coordinator_pb2.JOB_EVENT_KIND_STEP:
                return stream
            self.assertFalse(Ended(event.job.state), event)
        self.fail("watch of %s ended without a STEP event" % job_id)

    @contextlib.contextmanager
    def CancelledOnError(self, *job_ids):
        """Cancels the jobs when the block raises, so a failed test leaves no
        job running in front of the next test's (best effort)."""
        try:
            yield
        except BaseException:
            for job_id in job_ids:
                try:
                    self.Cancel(job_id)
                except grpc.RpcError:
                    pass
            raise

    # -- tests ---------------------------------------------------------------

    def test_cluster(self):
        cluster = self.WaitForCluster()
        self.assertTrue(cluster.shards[0].member_id.startswith("shard-"), cluster)
        self.assertTrue(cluster.shards[0].address, cluster)
        self.assertTrue(cluster.workers[0].member_id.startswith("worker-"), cluster)
        self.assertLess(cluster.shards[0].last_seen_seconds_ago, 3.0, cluster)
        self.assertLess(cluster.workers[0].last_seen_seconds_ago, 3.0, cluster)

    def test_submit_watch_to_success(self):
        ckpt_dir = os.path.join(WORK_DIR, "ckpt")
        submitted = self.Submit(TinySpec("python-small", 8, ckpt_dir))
        job_id = submitted.job_id
        # Defaults are filled in; explicit values are kept.
        self.assertEqual(submitted.spec.model.hidden_size, 64)
        self.assertEqual(submitted.spec.model.vocab_size, 256)
        self.assertTrue(submitted.spec.optimizer.HasField("lr"))
        with self.CancelledOnError(job_id):
            events = list(self.Watch(job_id, SMALL_JOB_TIMEOUT))

        kinds = [coordinator_pb2.JobEventKind.Name(e.kind) for e in events]
        self.assertEqual(events[0].kind, coordinator_pb2.JOB_EVENT_KIND_SNAPSHOT, kinds)
        self.assertIn(coordinator_pb2.JOB_EVENT_KIND_PLACEMENT, [e.kind for e in events], kinds)
        placement = next(e for e in events if e.kind == coordinator_pb2.JOB_EVENT_KIND_PLACEMENT)
        self.assertEqual(len(placement.job.placement), 1)
        self.assertIn("model.embed_tokens.weight", placement.job.placement[0].tensors)
        self.assertEqual(placement.job.state, coordinator_pb2.JOB_STATE_RUNNING)
        steps = [e.job.progress.step for e in events
                 if e.kind == coordinator_pb2.JOB_EVENT_KIND_STEP]
        self.assertTrue(steps, kinds)
        self.assertTrue(all(a < b for a, b in zip(steps, steps[1:])), steps)
        self.assertEqual(steps[-1], 8, steps)
        # The placement comes before the first step.
        self.assertLess(kinds.index("JOB_EVENT_KIND_PLACEMENT"), kinds.index("JOB_EVENT_KIND_STEP"))

        last = events[-1].job
        self.assertEqual(last.state, coordinator_pb2.JOB_STATE_SUCCEEDED,
                         "%s: %s" % (coordinator_pb2.JobState.Name(last.state), last.error))
        progress = last.progress
        self.assertEqual((progress.step, progress.total_steps), (8, 8))
        self.assertTrue(math.isfinite(progress.loss) and 0 < progress.loss < 10, progress)
        self.assertTrue(progress.HasField("val_loss"), progress)
        self.assertTrue(math.isfinite(progress.val_loss), progress)
        self.assertEqual(progress.val_step, 8, progress)
        self.assertGreater(progress.tokens_seen, 0)
        self.assertGreater(last.ended_at, last.started_at)
        self.assertGreater(last.started_at, 0)
        self.assertEqual(last.last_checkpoint, os.path.join(ckpt_dir, "step-00000008"))

        job = self.Get(job_id)
        self.assertEqual(job.state, coordinator_pb2.JOB_STATE_SUCCEEDED)
        self.assertEqual(job.progress.step, 8)
        self.assertEqual(job.progress.loss, progress.loss)
        self.assertEqual(job.progress.val_loss, progress.val_loss)
        self.assertEqual(job.spec, submitted.spec)

        listed = self.jobs.ListJobs(coordinator_pb2.ListJobsRequest(), timeout=RPC_TIMEOUT).jobs
        mine = [j for j in listed if j.job_id == job_id]
        self.assertEqual(len(mine), 1, [j.job_id for j in listed])
        self.assertEqual(mine[0].state, coordinator_pb2.JOB_STATE_SUCCEEDED)
        self.assertEqual(mine[0].name, "python-small")
        self.assertFalse(mine[0].HasField("spec"))  # documented: left out of ListJobs

        self.assertTrue(os.path.isfile(
            os.path.join(ckpt_dir, "step-00000008", "model.safetensors.index.json")),
            os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else "no " + ckpt_dir)

        # A watch of an ended job is its snapshot alone.
        again = list(self.Watch(job_id, RPC_TIMEOUT))
        self.assertEqual([e.kind for e in again], [coordinator_pb2.JOB_EVENT_KIND_SNAPSHOT])
        self.assertEqual(again[0].job.state, coordinator_pb2.JOB_STATE_SUCCEEDED)

    def test_invalid_spec(self):
        spec = TinySpec("python-invalid", 8)
        spec.model.num_experts_per_tok = 9  # more than n_routed_experts = 4
        with self.assertRaises(grpc.RpcError) as caught:
            self.jobs.SubmitJob(coordinator_pb2.SubmitJobRequest(spec=spec), timeout=RPC_TIMEOUT)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("model.num_experts_per_tok", caught.exception.details())

    def test_cancel_running(self):
        job_id = self.Submit(TinySpec("python-long", 1000)).job_id
        with self.CancelledOnError(job_id):
            stream = self.WatchUntilStep(job_id)
            cancelled = self.Cancel(job_id)
            self.assertIn(cancelled.state, (coordinator_pb2.JOB_STATE_RUNNING,
                                            coordinator_pb2.JOB_STATE_CANCELLED))
            rest = list(stream)
        self.assertTrue(rest)
        last = rest[-1].job
        self.assertEqual(last.state, coordinator_pb2.JOB_STATE_CANCELLED,
                         coordinator_pb2.JobState.Name(last.state))
        self.assertLess(last.progress.step, 1000)
        self.assertEqual(self.Get(job_id).state, coordinator_pb2.JOB_STATE_CANCELLED)
        with self.assertRaises(grpc.RpcError) as caught:
            self.Cancel(job_id)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)

    def test_cancel_queued(self):
        first = self.Submit(TinySpec("python-first", 1000)).job_id
        second = self.Submit(TinySpec("python-second", 1000)).job_id
        with self.CancelledOnError(first, second):
            stream = self.WatchUntilStep(first)
            self.assertEqual(self.Get(second).state, coordinator_pb2.JOB_STATE_QUEUED)
            # A queued job is cancelled by the call itself.
            self.assertEqual(self.Cancel(second).state, coordinator_pb2.JOB_STATE_CANCELLED)
            ended = list(self.Watch(second, RPC_TIMEOUT))
            self.assertEqual(len(ended), 1)
            self.assertEqual(ended[0].job.state, coordinator_pb2.JOB_STATE_CANCELLED)
            self.assertEqual(ended[0].job.started_at, 0)
            self.assertEqual(self.Get(first).state, coordinator_pb2.JOB_STATE_RUNNING)
            self.Cancel(first)
            rest = list(stream)
        self.assertEqual(rest[-1].job.state, coordinator_pb2.JOB_STATE_CANCELLED)

    def test_unknown_job(self):
        for call, request in (
                (self.jobs.GetJob, coordinator_pb2.GetJobRequest(job_id="job-999999")),
                (self.jobs.CancelJob, coordinator_pb2.CancelJobRequest(job_id="job-999999"))):
            with self.assertRaises(grpc.RpcError) as caught:
                call(request, timeout=RPC_TIMEOUT)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.NOT_FOUND)
            self.assertIn("job-999999", caught.exception.details())
        with self.assertRaises(grpc.RpcError) as caught:
            list(self.Watch("job-999999", RPC_TIMEOUT))
        self.assertEqual(caught.exception.code(), grpc.StatusCode.NOT_FOUND)


def main():
    global WORK_DIR
    if not SOURCE_DIR or not BINARY:
        print("set MUONPS_SOURCE_DIR (the repository) and MUONPS_BINARY (the built muonps)")
        return 2
    if not PROTOC or not GRPC_PYTHON_PLUGIN:
        print("protoc or grpc_python_plugin not found (install protobuf-compiler and "
              "protobuf-compiler-grpc); skipped")
        return SKIP
    WORK_DIR = tempfile.mkdtemp(prefix="muonps-pyclient-")
    try:
        GenerateStubs(os.path.join(WORK_DIR, "stubs"))
        WriteCorpus(os.path.join(WORK_DIR, "corpus.txt"))
        start = time.monotonic()
        result = unittest.main(argv=sys.argv[:1], exit=False, verbosity=2).result
        print("%.1f s" % (time.monotonic() - start))
        if not result.wasSuccessful():
            for name in ("coordinator", "shard", "worker"):
                path = os.path.join(WORK_DIR, name + ".log")
                if os.path.exists(path):
                    with open(path) as f:
                        print("---- %s.log (last 30 lines)\n%s" %
                              (name, "".join(f.readlines()[-30:])))
        return 0 if result.wasSuccessful() else 1
    finally:
        shutil.rmtree(WORK_DIR, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
