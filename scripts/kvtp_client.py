#!/usr/bin/python3
"""A kvtp client written outside the project's C++: Python stubs generated from proto/kvtp.proto
with Debian's python3-grpcio (protoc + grpc_python_plugin, at start-up into a temporary folder),
then submit a perplexity job, watch its progress and print its result.

usage: scripts/kvtp_client.py --coordinator HOST:PORT --token-file FILE [--tls-ca PEM]
                              submit FIELD=VALUE...   (PplRequest fields, e.g. model=models/kvtp-llama-2m)
       scripts/kvtp_client.py ... jobs
Prints progress lines on stderr and the job's result (the `kvtp ppl --json` object) on stdout;
exits 1 if the job did not succeed.
"""
import argparse
import importlib
import pathlib
import subprocess
import sys
import tempfile

import grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_stubs():
    """kvtp_pb2 and kvtp_pb2_grpc, generated from the repository's proto."""
    out = tempfile.mkdtemp(prefix="kvtp-stubs-")
    subprocess.run(["protoc", "-I", str(ROOT / "proto"), f"--python_out={out}", f"--grpc_out={out}",
                    "--plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin", str(ROOT / "proto" / "kvtp.proto")],
                   check=True)
    sys.path.insert(0, out)
    return importlib.import_module("kvtp_pb2"), importlib.import_module("kvtp_pb2_grpc")


def request_from(pb, pairs):
    """A PplRequest from FIELD=VALUE words, each value converted to its field's type."""
    req = pb.PplRequest()
    for pair in pairs:
        name, _, value = pair.partition("=")
        field = req.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            raise SystemExit(f"kvtp_client: PplRequest has no field '{name}'")
        if field.type == field.TYPE_BOOL:
            setattr(req, name, value.lower() in ("1", "true", "yes"))
        elif field.type == field.TYPE_STRING:
            setattr(req, name, value)
        else:
            setattr(req, name, int(value))
    return req


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--tls-ca")
    ap.add_argument("command", choices=["submit", "jobs"])
    ap.add_argument("fields", nargs="*")
    args = ap.parse_args()
    pb, rpc = load_stubs()
    token = pathlib.Path(args.token_file).read_text().strip()
    metadata = [("authorization", f"Bearer {token}")]
    if args.tls_ca:
        channel = grpc.secure_channel(args.coordinator, grpc.ssl_channel_credentials(pathlib.Path(args.tls_ca).read_bytes()))
    else:
        channel = grpc.insecure_channel(args.coordinator)
    stub = rpc.CoordinatorStub(channel)
    if args.command == "jobs":
        for job in stub.ListJobs(pb.ListJobsRequest(), metadata=metadata, timeout=30).jobs:
            print(job.id, pb.JobState.Name(job.state), job.owner, f"{job.ppl:.4f}" if job.ppl else "")
        return 0
    job = stub.SubmitJob(pb.SubmitJobRequest(ppl=request_from(pb, args.fields)), metadata=metadata, timeout=30)
    print(f"submitted {job.id}", file=sys.stderr)
    final = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
    for job in stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=metadata):
        p = job.progress
        print(f"{job.id} {pb.JobState.Name(job.state)} windows {p.windows_done}/{p.windows_total} "
              f"tokens {p.tokens_done}/{p.tokens_total} running ppl {p.running_ppl:.3f}", file=sys.stderr)
        if job.state in final:
            break
    if job.state != pb.SUCCEEDED:
        print(f"{job.id} {pb.JobState.Name(job.state)}: {job.error}", file=sys.stderr)
        return 1
    print(job.result_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
