"""Run jobs one after the other and time each: ``driver.py PLAN.json OUT.json``.

Runs inside the policed cgroup (and the test's private mount namespace); PLAN is a list of
{"id", "argv", "timeout"}; OUT gets {"id": {"rc", "wall", "out", "err", "timeout"}}. A job that
outlives its timeout is killed (its whole process group) and recorded with "timeout": true.
"""
import json
import os
import signal
import subprocess
import sys
import time


def main(plan_path: str, out_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    out = {}
    for job in plan:
        t0 = time.monotonic()
        p = subprocess.Popen(job["argv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env=dict(os.environ, **job.get("env", {})))
        timed_out = False
        try:
            so, se = p.communicate(timeout=job["timeout"])
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, signal.SIGKILL)
            so, se = p.communicate()
        out[job["id"]] = {"rc": p.returncode, "wall": round(time.monotonic() - t0, 3), "out": so[-2000:],
                          "err": se[-2000:], "timeout": timed_out}
        if job.get("sleep_after"):
            time.sleep(job["sleep_after"])
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
