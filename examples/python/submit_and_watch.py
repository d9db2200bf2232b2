#!/usr/bin/env python3
"""Submit a small job to trainmesh's job-service and watch it until it ends.

Uses the client generated from proto/ by examples/python/gen.sh:

    python3 -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
    PYTHON=.venv/bin/python examples/python/gen.sh
    trainctl up &                                   # from the repository root
    .venv/bin/python examples/python/submit_and_watch.py

The job runs `python3 examples/train_ok.py --steps 5`; that path is relative to the
directory the runner starts jobs in (the repository root under `trainctl up`).

Exit status: 0 when the job succeeds; 1 when it fails, is cancelled, the call fails, or
--timeout passes first.
"""

import argparse
import os
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
GEN_DIR = os.path.join(HERE, "gen")
DEFAULT_TOKEN_FILE = os.path.join(".trainmesh", "admin.token")


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Submit a job to trainmesh and stream its events until it ends.",
        epilog="Token lookup: --token, else $TRAINMESH_TOKEN, else ./%s." % DEFAULT_TOKEN_FILE,
    )
    p.add_argument(
        "--endpoint",
        default="localhost:50051",
        help="job-service address, host:port (default localhost:50051)",
    )
    p.add_argument("--token", default=None, help="bearer token (see below for the default)")
    p.add_argument(
        "--cacert",
        default=os.environ.get("TRAINMESH_TLS_CA"),
        help="CA certificate (PEM) to trust: connect with TLS (default $TRAINMESH_TLS_CA; "
        "without it, plaintext)",
    )
    p.add_argument(
        "--cert",
        default=os.environ.get("TRAINMESH_TLS_CLIENT_CERT"),
        help="client certificate (PEM) for mutual TLS (default $TRAINMESH_TLS_CLIENT_CERT)",
    )
    p.add_argument(
        "--key",
        default=os.environ.get("TRAINMESH_TLS_CLIENT_KEY"),
        help="its private key (PEM) (default $TRAINMESH_TLS_CLIENT_KEY)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="overall seconds to wait for a terminal state (default 120)",
    )
    p.add_argument("--steps", type=int, default=5, help="training steps for the job (default 5)")
    p.add_argument("--name", default="python-client-example", help="job name")
    p.add_argument(
        "--correlation-id",
        default=None,
        help="x-correlation-id to send (default: a fresh UUID)",
    )
    p.add_argument(
        "--heartbeats", action="store_true", help="also print the stream's heartbeats"
    )
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    return args


def resolve_token(explicit):
    if explicit:
        return explicit.strip()
    env = os.environ.get("TRAINMESH_TOKEN", "").strip()
    if env:
        return env
    try:
        with open(DEFAULT_TOKEN_FILE, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def import_client():
    """Import grpc and the generated modules, with a useful message when they are missing."""
    sys.path.insert(0, GEN_DIR)
    try:
        import grpc  # noqa: F401
        from trainmesh.job.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
    except ImportError as e:
        sys.exit(
            "cannot import the generated client ({}).\n"
            "pip install -r examples/python/requirements.txt, then run "
            "examples/python/gen.sh".format(e)
        )
    return grpc, job_pb2, job_service_pb2, job_service_pb2_grpc


def open_channel(grpc, args):
    """Plaintext, or TLS trusting --cacert (showing --cert/--key when given)."""
    if not args.cacert:
        return grpc.insecure_channel(args.endpoint)

    def read(path):
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.cacert),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    )
    return grpc.secure_channel(args.endpoint, creds)


def fmt_time(ts):
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime().strftime("%H:%M:%S.%f")[:-3]


def main(argv=None):
    args = parse_args(argv)
    grpc, job_pb2, job_service_pb2, job_service_pb2_grpc = import_client()

    token = resolve_token(args.token)
    if not token:
        print(
            "no token: pass --token, set TRAINMESH_TOKEN, or run from the directory where "
            "`trainctl up` wrote {}".format(DEFAULT_TOKEN_FILE),
            file=sys.stderr,
        )
        return 1
    correlation_id = args.correlation_id or str(uuid.uuid4())
    metadata = (
        ("authorization", "Bearer " + token),
        ("x-correlation-id", correlation_id),
    )
    deadline = time.monotonic() + args.timeout

    def remaining():
        return max(deadline - time.monotonic(), 0.001)

    state_name = job_pb2.JobState.Name
    terminal = {
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_FAILED,
        job_pb2.JOB_STATE_CANCELLED,
    }

    spec = job_pb2.JobSpec(
        name=args.name,
        labels={"example": "python-client"},
        image="python:3.11-slim",
        command=["python3", "examples/train_ok.py", "--steps", str(args.steps)],
        env={"PYTHONUNBUFFERED": "1"},
        resources=job_pb2.Resources(gpus=0, cpu=1.0, memory_mib=512, shm_mib=64),
        training=job_pb2.Training(
            algorithm=job_pb2.TRAINING_ALGORITHM_SFT,
            model="tiny-llama-debug",
            hyperparameters={"learning_rate": "0.001"},
        ),
        retry_policy=job_pb2.RetryPolicy(max_attempts=1),
    )

    with open_channel(grpc, args) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        try:
            resp, call = stub.CreateJob.with_call(
                job_service_pb2.CreateJobRequest(
                    spec=spec,
                    # Same key on a retry of this call returns the same job, not a second one.
                    idempotency_key=str(uuid.uuid4()),
                ),
                metadata=metadata,
                timeout=min(remaining(), 30.0),
                wait_for_ready=True,
            )
        except grpc.RpcError as e:
            print("CreateJob failed: {}: {}".format(e.code().name, e.details()), file=sys.stderr)
            return 1
        job = resp.job
        echoed = dict(call.initial_metadata() or ()).get("x-correlation-id", "")
        print(
            "created job {} ({}) state={} correlation_id={}".format(
                job.id, job.spec.name, state_name(job.state), echoed or correlation_id
            ),
            flush=True,
        )

        # WatchJobs is resumable: if the stream breaks, reconnect from the last cursor.
        cursor = ""
        final_state = job.state if job.state in terminal else None
        while final_state is None:
            request = job_service_pb2.WatchJobsRequest(
                job_id=job.id, cursor=cursor, from_start=not cursor
            )
            try:
                for msg in stub.WatchJobs(request, metadata=metadata, timeout=remaining()):
                    kind = msg.WhichOneof("kind")
                    if kind == "heartbeat":
                        if msg.heartbeat.cursor:
                            cursor = msg.heartbeat.cursor
                        if args.heartbeats:
                            print("  heartbeat {}".format(fmt_time(msg.heartbeat.time)), flush=True)
                        continue
                    if kind != "event":
                        continue
                    ev = msg.event
                    if ev.cursor:
                        cursor = ev.cursor
                    line = "{} #{} {:<16} {}".format(
                        fmt_time(ev.time), ev.sequence, ev.type, state_name(ev.state)
                    )
                    if ev.attempt:
                        line += " attempt={}".format(ev.attempt)
                    if ev.message:
                        line += " - " + ev.message
                    print(line, flush=True)
                    if ev.state in terminal:
                        final_state = ev.state
                        break
                else:
                    # The server ended the stream without a terminal event: resume.
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(min(0.2, remaining()))
                    continue
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() >= deadline:
                    break
                if code == grpc.StatusCode.UNAVAILABLE:
                    print("stream interrupted ({}); resuming".format(e.details()), file=sys.stderr)
                    time.sleep(min(1.0, remaining()))
                    continue
                print("WatchJobs failed: {}: {}".format(code.name, e.details()), file=sys.stderr)
                return 1

        if final_state is None:
            print(
                "timed out after {:.0f}s waiting for job {} to finish".format(args.timeout, job.id),
                file=sys.stderr,
            )
            return 1

        print("job {} ended: {}".format(job.id, state_name(final_state)), flush=True)
        if final_state == job_pb2.JOB_STATE_SUCCEEDED:
            return 0
        # Show the structured error the platform recorded.
        try:
            got = stub.GetJob(
                job_service_pb2.GetJobRequest(job_id=job.id),
                metadata=metadata,
                timeout=min(remaining(), 10.0),
            ).job
            if got.HasField("error"):
                err = got.error
                print(
                    "error: {}: {} (exit code {}, category {})".format(
                        err.type, err.message, err.exit_code, err.category or "-"
                    ),
                    file=sys.stderr,
                )
                if err.hint:
                    print("hint: " + err.hint, file=sys.stderr)
            if got.state_reason:
                print("reason: " + got.state_reason, file=sys.stderr)
        except grpc.RpcError:
            pass
        return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
