"""A keel worker in plain Python (standard library only, no SDK).

It claims tasks of one agent, works through them in steps, saves a checkpoint
after every step, and completes them. If it crashes, keel notices the lease
was not renewed, puts the task back in the queue, and the next worker that
claims it gets the last checkpoint and carries on from there.

    python examples/worker.py --server http://127.0.0.1:8420 --agent demo --worker w1

Flags for trying the crash path by hand:
    --create N        first create N tasks for the agent
    --crash-after K   kill this process (SIGKILL, no clean-up) after K checkpoints
    --idle-exit S     exit after S seconds with nothing to claim (default: run forever)
    --ack-log FILE    append one JSON line per call keel acknowledged (used by keel's tests)
    --key KEY         the agent's key when keel requires agent keys (or $KEEL_AGENT_KEY)
"""

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from urllib.parse import quote

STEPS = 3  # each task is three steps of "work"


class Keel:
    def __init__(self, server, ack_log=None, key=None):
        self.server = server.rstrip("/")
        self.key = key
        self.ack_log = open(ack_log, "a", buffering=1) if ack_log else None

    def call(self, method, path, body=None, idempotency_key=None):
        """One call; retried while keel is unreachable (it may be restarting).

        Mutating calls carry an Idempotency-Key, so a retry after a lost answer
        returns the first answer instead of doing the work twice.
        """
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"}
        if self.key:
            headers["authorization"] = f"Bearer {self.key}"
        if idempotency_key:
            headers["idempotency-key"] = idempotency_key
        delay = 0.05
        while True:
            req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    raw = r.read()
                    answer = json.loads(raw) if raw else None
                    if self.ack_log and method == "POST":
                        self.ack_log.write(json.dumps({"path": path, "status": r.status, "body": answer}) + "\n")
                    return r.status, answer
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read() or b"null")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


def work_on(keel, task, crash_after, checkpoints_saved):
    tid, token = task["id"], task["lease_token"]
    checkpoint = task.get("checkpoint")
    done = checkpoint["state"]["done_steps"] if checkpoint else 0
    resumed_from = done
    print(f"claimed {tid} (attempt {task['attempts']}), resuming at step {done}", flush=True)
    while done < STEPS:
        status, answer = keel.call("POST", f"/v1/tasks/{quote(tid, safe='')}/steps",
                                   {"lease_token": token, "kind": "work", "summary": f"step {done + 1}",
                                    "progress": (done + 1) / STEPS},
                                   idempotency_key=f"{tid}-{token}-step-{done}")
        if status != 200 or answer["directive"] != "continue":
            print(f"  stop {tid}: {status} {answer}", flush=True)
            return checkpoints_saved
        done += 1
        status, answer = keel.call("POST", f"/v1/tasks/{quote(tid, safe='')}/checkpoints",
                                   {"lease_token": token, "label": f"after step {done}", "state": {"done_steps": done}},
                                   idempotency_key=f"{tid}-{token}-ckpt-{done}")
        if status != 200:
            print(f"  checkpoint refused for {tid}: {status} {answer}", flush=True)
            return checkpoints_saved
        checkpoints_saved += 1
        if crash_after is not None and checkpoints_saved >= crash_after:
            print(f"  crashing now, in the middle of {tid}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    status, answer = keel.call("POST", f"/v1/tasks/{quote(tid, safe='')}/complete",
                               {"lease_token": token, "output": {"steps": done, "resumed_from": resumed_from}},
                               idempotency_key=f"{tid}-{token}-complete")
    print(f"  completed {tid}: {status} {answer.get('state') if isinstance(answer, dict) else answer}", flush=True)
    return checkpoints_saved


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", default="http://127.0.0.1:8420")
    p.add_argument("--agent", default="demo")
    p.add_argument("--worker", default=f"worker-{os.getpid()}")
    p.add_argument("--lease", default="2s")
    p.add_argument("--create", type=int, default=0)
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--idle-exit", type=float, default=None)
    p.add_argument("--ack-log", default=None)
    p.add_argument("--key", default=os.environ.get("KEEL_AGENT_KEY"),
                   help="the agent's key, when keel's [agents.*] set keys_env (default: $KEEL_AGENT_KEY)")
    a = p.parse_args()
    keel = Keel(a.server, a.ack_log, a.key)
    for i in range(a.create):
        status, task = keel.call("POST", "/v1/tasks", {"agent": a.agent, "input": {"n": i}},
                                 idempotency_key=f"create-{uuid.uuid4()}")
        if status != 201:
            print(f"create failed: {status} {task}", file=sys.stderr, flush=True)
            return 1
        print(f"created {task['id']}", flush=True)
    idle_since = time.monotonic()
    saved = 0
    claims = 0
    while True:
        # A claim whose answer was lost (keel restarting) is retried with the same key
        # and gets the same task and lease back.
        status, task = keel.call("POST", "/v1/tasks/claim", {"agent": a.agent, "worker": a.worker, "lease": a.lease},
                                 idempotency_key=f"claim-{a.worker}-{os.getpid()}-{claims}")
        if status == 200:
            claims += 1
            saved = work_on(keel, task, a.crash_after, saved)
            idle_since = time.monotonic()
        elif status == 204:
            if a.idle_exit is not None and time.monotonic() - idle_since > a.idle_exit:
                return 0
            time.sleep(0.05)
        else:
            print(f"claim failed: {status} {task}", file=sys.stderr, flush=True)
            return 1


if __name__ == "__main__":
    sys.exit(main())
