#!/usr/bin/python3
"""The control plane as the gRPC ecosystem sees it, with real processes on 127.0.0.1: the Python
example client (scripts/kvtp_client.py, stubs generated from proto/kvtp.proto) submits, watches
and gets the same result as `kvtp ppl`; grpc.health.v1 answers SERVING, then NOT_SERVING while
the coordinator drains after SIGTERM; server reflection lists both services. Health and
reflection are called as raw bytes, as a probe that knows only their public protos would; the
metrics endpoint is read as Prometheus would.

usage: tests/grpc_conventions_test.py KVTP_BINARY   (from the repository root)
"""
import json
import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

import grpc

KVTP = sys.argv[1] if len(sys.argv) > 1 else "build/kvtp"
ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"  # Debian's, with python3-grpcio
JOB = ["model=models/kvtp-llama-2m", "data=data/c4/c4-heldout-200.json.gz", "seq_len=128", "max_windows=3"]

# grpc.health.v1.HealthCheckRequest{service: ""} is empty; the response's field 1 (status) is
# SERVING = 1 or NOT_SERVING = 2.
SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"
# grpc.reflection.v1alpha.ServerReflectionRequest{list_services: ""}: field 7, length 0.
LIST_SERVICES = b"\x3a\x00"


def health(channel):
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    return check(b"", timeout=5)


def reflected_services(channel):
    info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    return b"".join(info(iter([LIST_SERVICES]), timeout=5))


class Cluster:
    """A coordinator with a client and a worker credential, and one worker group of one rank."""

    def __init__(self, work):
        self.work = work
        (work / "client-token").write_text(secrets.token_hex(16))
        (work / "worker-token").write_text(secrets.token_hex(16))
        (work / "client-tokens").write_text(f"python {(work / 'client-token').read_text()} submit\n")
        self.coordinator = subprocess.Popen(
            [KVTP, "coordinator", "--listen", "127.0.0.1:0", "--db", str(work / "jobs.db"), "--client-tokens",
             str(work / "client-tokens"), "--worker-token-file", str(work / "worker-token"), "--data-root", str(ROOT),
             "--drain-ms", "4000", "--metrics-listen", "127.0.0.1:0"], stderr=open(work / "coordinator.log", "w"))
        self.address = "127.0.0.1:" + self._port(r"listening on .* \(port (\d+)\)")
        self.metrics = "http://127.0.0.1:" + self._port(r"metrics on .* \(port (\d+)\)") + "/metrics"
        root = ["--allow-run-as-root"] if os.getuid() == 0 else []
        self.workers = subprocess.Popen(
            ["mpirun", *root, "--oversubscribe", "-np", "1", KVTP, "worker", "--coordinator", self.address,
             "--token-file", str(work / "worker-token")], stderr=open(work / "worker.log", "w"),
            start_new_session=True)

    def _port(self, pattern):
        for _ in range(100):
            m = re.search(pattern, (self.work / "coordinator.log").read_text())
            if m:
                return m.group(1)
            time.sleep(0.1)
        raise RuntimeError("the coordinator did not start: " + (self.work / "coordinator.log").read_text())

    def close(self):
        for p in (self.workers, self.coordinator):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL) if p is self.workers else p.kill()
            p.wait()


def test_example_client_gets_what_kvtp_ppl_gets(cluster):
    run = subprocess.run([PYTHON, str(ROOT / "scripts" / "kvtp_client.py"), "--coordinator", cluster.address,
                          "--token-file", str(cluster.work / "client-token"), "submit", *JOB],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "SUCCEEDED" in run.stderr and "windows 3/3" in run.stderr, run.stderr  # watched to the end
    remote = json.loads(run.stdout)
    local = json.loads(subprocess.run([KVTP, "ppl", "--quiet", "--json", "--model", "models/kvtp-llama-2m", "--data",
                                       "data/c4/c4-heldout-200.json.gz", "--seq-len", "128", "--max-windows", "3"],
                                      capture_output=True, text=True, check=True).stdout)
    assert remote["tokens"] == local["tokens"], (remote["tokens"], local["tokens"])
    assert abs(remote["ppl"] - local["ppl"]) <= 1e-6 * local["ppl"], (remote["ppl"], local["ppl"])
    listed = subprocess.run([PYTHON, str(ROOT / "scripts" / "kvtp_client.py"), "--coordinator", cluster.address,
                             "--token-file", str(cluster.work / "client-token"), "jobs"],
                            capture_output=True, text=True, check=True).stdout
    assert re.search(r"job-1 SUCCEEDED python \d", listed), listed


def test_health_and_reflection_without_a_token(cluster):
    channel = grpc.insecure_channel(cluster.address)
    assert health(channel) == SERVING
    services = reflected_services(channel)
    for name in (b"kvtp.v1.Coordinator", b"kvtp.v1.WorkerApi", b"grpc.health.v1.Health"):
        assert name in services, services


def test_metrics_in_the_prometheus_text_format(cluster):
    text = urllib.request.urlopen(cluster.metrics, timeout=10).read().decode()
    value = lambda name: float(re.search("^" + re.escape(name) + r" (\S+)$", text, re.M).group(1))
    assert value('kvtp_jobs{state="SUCCEEDED"}') == 1, text  # the example client's job
    assert value('kvtp_jobs{state="QUEUED"}') == 0, text
    assert value("kvtp_worker_groups") == 1, text
    assert value("kvtp_job_seconds_count") == 1 and value("kvtp_job_seconds_sum") > 0, text
    assert "# TYPE kvtp_tokens_per_second gauge" in text, text


def test_health_turns_not_serving_while_draining(cluster):
    channel = grpc.insecure_channel(cluster.address)
    assert health(channel) == SERVING
    cluster.coordinator.send_signal(signal.SIGTERM)
    deadline, seen = time.time() + 3, None
    while time.time() < deadline and seen != NOT_SERVING:
        seen = health(channel)
        time.sleep(0.1)
    assert seen == NOT_SERVING, seen
    assert cluster.coordinator.wait(timeout=20) == 0
    assert "coordinator: stopped" in (cluster.work / "coordinator.log").read_text()


def main():
    os.chdir(ROOT)
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(pathlib.Path(tmp))
        try:
            for test in (test_example_client_gets_what_kvtp_ppl_gets, test_metrics_in_the_prometheus_text_format,
                         test_health_and_reflection_without_a_token, test_health_turns_not_serving_while_draining):  # the drain last: it stops the coordinator
                try:
                    test(cluster)
                    passed += 1
                    print(f"[ OK ] {test.__name__}")
                except Exception:
                    failed += 1
                    print(f"[FAIL] {test.__name__}\n{traceback.format_exc()}")
        finally:
            cluster.close()
            if failed:
                print((pathlib.Path(tmp) / "coordinator.log").read_text(), (pathlib.Path(tmp) / "worker.log").read_text())
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
