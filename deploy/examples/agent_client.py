#!/usr/bin/env python3
"""A small Quilt agent client in Python: run one task on a Quilt worker over
NATS, print its output live, exit with the task's exit code.

    python3 deploy/examples/agent_client.py --image busybox -- echo hello

It speaks the wire protocol described in README.md and schemas/*.json, the
same way `quilt run --image ...` does:

1. Choose the task id (a uuid4, hex) so every subject is known up front.
2. Subscribe (core NATS) to the live output, `quilt.output.<id>.stdout|stderr`.
3. Follow the result through JetStream: an ordered consumer on the stream
   QUILT_RESULTS, filtered on `quilt.results.<id>`, delivering the last
   message of that subject. It yields the stored result if there already is
   one, else the next one published, and never a duplicate.
4. Publish the task to `quilt.tasks` through JetStream with the header
   `Nats-Msg-Id` = the id, so a retried publish is dropped as a duplicate.
5. Print output chunks until the result arrives, then wait briefly for both
   streams' last chunk (`eof`), which is published before the result but
   travels on another subscription.

Also usable as a library:

    import nats
    from agent_client import build_task, run_task

    nc = await nats.connect("nats://127.0.0.1:4222")
    task = build_task("busybox", ["sh", "-c", "echo hi"], limits={"timeout_s": 10})
    result = await run_task(nc, task, on_output=lambda stream, data: print(stream, data))
    print(result["status"], result["exit_code"], result["stdout"])

Needs nats-py (`pip install nats-py`) and Python 3.8+.
"""

import argparse
import asyncio
import json
import os
import re
import sys
import uuid
from typing import Any, Callable, Dict, List, Optional

import nats
from nats.js.api import DeliverPolicy
from nats.js.errors import NoStreamResponseError, NotFoundError

# Subjects and streams (worker/src/broker/subjects.rs).
TASKS_SUBJECT = "quilt.tasks"
RESULTS_STREAM = "QUILT_RESULTS"
SCHEMA_VERSION = 1

# Exit codes, as `quilt run` uses them (README.md "Exit codes").
EXIT_TIMED_OUT = 124
EXIT_OOM_KILLED = 123
EXIT_QUILT_ERROR = 125

# How long to wait, after the result, for output still in flight.
OUTPUT_GRACE_S = 2.0

# A task id is a NATS subject token: 1 to 128 of A-Z a-z 0-9 _ -.
TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

OutputCallback = Callable[[str, str], None]


class QuiltError(Exception):
    """The task could not be submitted or followed (not a failed task: that
    is a result)."""


def build_task(
    image: str,
    command: Optional[List[str]] = None,
    *,
    task_id: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    limits: Optional[Dict[str, Any]] = None,
    **extra: Any,
) -> Dict[str, Any]:
    """A task message (schemas/task.json). `limits` may hold memory_mb, cpus,
    pids, timeout_s, output_bytes; `extra` other fields (workdir, user,
    stdin, network). The worker checks the rest and answers a mistake with
    a `rejected` result naming the field."""
    task_id = task_id or uuid.uuid4().hex
    if not TASK_ID.match(task_id):
        raise ValueError(f"task id {task_id!r}: must be 1 to 128 of A-Z a-z 0-9 _ -")
    task: Dict[str, Any] = {"schema": SCHEMA_VERSION, "id": task_id, "image": image}
    if command:
        task["command"] = list(command)
    if env:
        task["env"] = dict(env)
    if limits:
        task["limits"] = {name: value for name, value in limits.items() if value is not None}
    task.update(extra)
    return task


class _OutputFollower:
    """Passes a task's live output chunks (schemas/output.json) to a callback.

    A task may be delivered again (its worker died, say); the chunks of a
    newer delivery (`attempt`) start over, older ones are ignored."""

    def __init__(self, on_output: Optional[OutputCallback], on_restart: Optional[Callable[[int], None]]):
        self.on_output = on_output
        self.on_restart = on_restart
        self.attempt = 0
        self.ended = {"stdout": False, "stderr": False}
        self.changed = asyncio.Event()

    async def handle(self, msg) -> None:
        try:
            chunk = json.loads(msg.data)
            attempt, stream = int(chunk["attempt"]), chunk["stream"]
        except (ValueError, KeyError, TypeError):
            return  # not a chunk this client understands
        if attempt < self.attempt or stream not in self.ended:
            return
        if attempt > self.attempt:
            if self.attempt and self.on_restart:
                self.on_restart(attempt)
            self.attempt = attempt
            self.ended = {"stdout": False, "stderr": False}
        if chunk.get("data") and self.on_output:
            self.on_output(stream, chunk["data"])
        if chunk.get("eof"):
            self.ended[stream] = True
        self.changed.set()

    def all_ended(self, attempt: int) -> bool:
        return self.attempt == attempt and all(self.ended.values())

    async def wait_ended(self, attempt: int, grace: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while not self.all_ended(attempt):
            left = deadline - loop.time()
            if left <= 0:
                return
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return


async def run_task(
    nc,
    task: Dict[str, Any],
    on_output: Optional[OutputCallback] = None,
    *,
    timeout: Optional[float] = None,
    on_restart: Optional[Callable[[int], None]] = None,
) -> Dict[str, Any]:
    """Runs `task` (a dict as from build_task; given an id if it has none)
    on the Quilt connected to `nc` and returns its result (a dict, see
    schemas/result.json). `on_output(stream, data)` is called with each
    piece of live output, stream being "stdout" or "stderr". Waits at most
    `timeout` seconds for the result when given (asyncio.TimeoutError)."""
    task_id = task.setdefault("id", uuid.uuid4().hex)
    if not TASK_ID.match(str(task_id)):
        raise ValueError(f"task id {task_id!r}: must be 1 to 128 of A-Z a-z 0-9 _ -")
    js = nc.jetstream()
    follower = _OutputFollower(on_output, on_restart)
    loop = asyncio.get_running_loop()
    result_future: "asyncio.Future[Dict[str, Any]]" = loop.create_future()

    async def on_result(msg) -> None:
        if result_future.done():
            return
        try:
            result_future.set_result(json.loads(msg.data))
        except ValueError as error:
            result_future.set_exception(QuiltError(f"a result that does not parse: {error}"))

    # 1. Live output, before publishing so nothing is missed. The flush makes
    #    sure the server has the subscription before the task can run.
    output_sub = await nc.subscribe(f"quilt.output.{task_id}.*", cb=follower.handle)
    result_sub = None
    try:
        await nc.flush()
        # 2. The result, through JetStream (see the module's docstring).
        try:
            result_sub = await js.subscribe(
                f"quilt.results.{task_id}",
                stream=RESULTS_STREAM,
                cb=on_result,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            )
        except NotFoundError as error:
            raise QuiltError(
                f"the stream {RESULTS_STREAM} is missing: has a Quilt worker ever started "
                f"against this NATS? ({error})"
            ) from error
        # 3. The task. A duplicate (this id was published before, within the
        #    stream's window) is dropped by the server; its result still comes.
        try:
            ack = await js.publish(
                TASKS_SUBJECT,
                json.dumps(task).encode(),
                headers={"Nats-Msg-Id": task_id},
            )
        except NoStreamResponseError as error:
            raise QuiltError(
                "no stream takes quilt.tasks: start a Quilt worker (`quilt up`) first"
            ) from error
        if ack.duplicate:
            print(
                f"quilt: a task with id {task_id} was already submitted; waiting for its result",
                file=sys.stderr,
            )
        # 4. Output flows through the callback until the result arrives...
        result = await asyncio.wait_for(result_future, timeout)
        # ...and the last chunks, published before it, may still be on their way.
        await follower.wait_ended(int(result.get("attempt", 0)), OUTPUT_GRACE_S)
        return result
    finally:
        for sub in (result_sub, output_sub):
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection may be gone already
                    pass


def exit_code_of(result: Dict[str, Any]) -> int:
    """The exit code standing for a result, as `quilt run` uses them."""
    status = result.get("status")
    if status == "succeeded":
        return 0
    if status == "failed":
        if result.get("exit_code") is not None:
            return int(result["exit_code"]) & 0xFF
        if result.get("signal") is not None:
            return (128 + int(result["signal"])) & 0xFF
        return EXIT_QUILT_ERROR
    if status == "timed_out":
        return EXIT_TIMED_OUT
    if status == "oom_killed":
        return EXIT_OOM_KILLED
    # rejected, error (or a status newer than this client).
    kind = (result.get("error") or {}).get("kind")
    return {"command_not_found": 127, "not_executable": 126}.get(kind, EXIT_QUILT_ERROR)


STATUS_WORDS = {
    "succeeded": "succeeded",
    "failed": "failed",
    "timed_out": "timed out",
    "oom_killed": "was killed: out of memory",
    "rejected": "was rejected",
    "error": "failed to run",
}


def summary_of(result: Dict[str, Any]) -> str:
    """One line about how the task ended."""
    status = result.get("status", "?")
    words = f"task {result.get('id')} {STATUS_WORDS.get(status, status)}"
    if result.get("exit_code") is not None:
        words += f" (exit {result['exit_code']})"
    elif result.get("signal") is not None:
        words += f" (signal {result['signal']})"
    if result.get("error"):
        words += f": {result['error'].get('kind')}: {result['error'].get('message')}"
    timings = result.get("timings") or {}
    words += f" in {timings.get('total_ms', 0):.0f} ms on worker {result.get('worker_id')}"
    if result.get("attempt", 1) > 1:
        words += f", delivery {result['attempt']}"
    truncated = [name for name, cut in (result.get("truncated") or {}).items() if cut]
    if truncated:
        words += f"; {' and '.join(truncated)} cut at the output limit"
    return "quilt: " + words


def print_output(stream: str, data: str) -> None:
    """Writes a chunk of live output to our own stdout or stderr."""
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(data)
    out.flush()


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a task on Quilt over NATS: live output, then the result.",
        usage="%(prog)s [options] --image IMAGE [-- COMMAND [ARG...]]",
    )
    parser.add_argument(
        "--nats",
        default=os.environ.get("QUILT_NATS_URL", "nats://127.0.0.1:4222"),
        help="NATS URL (default: $QUILT_NATS_URL, else nats://127.0.0.1:4222)",
    )
    parser.add_argument("--image", required=True, help="image name or digest, e.g. busybox")
    parser.add_argument("--id", help="task id (default: a random uuid4, hex)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--workdir", help="working directory in the container")
    parser.add_argument("--memory-mb", type=int, help="memory limit, MiB")
    parser.add_argument("--cpus", type=float, help="CPU limit, e.g. 0.5")
    parser.add_argument("--pids", type=int, help="most processes at once")
    parser.add_argument("--timeout", type=float, help="the task's wall-clock limit, seconds")
    parser.add_argument("--output-bytes", type=int, help="bytes kept of each of stdout and stderr")
    parser.add_argument("--wait", type=float, help="give up waiting for the result after this many seconds")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the output")
    parser.add_argument("--apt", action="append", default=[], metavar="PACKAGE",
                        help="a Debian package the command needs (repeatable)")
    parser.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                        help="a Python requirement the command needs, e.g. requests==2.32.3 (repeatable)")
    parser.add_argument("--npm", action="append", default=[], metavar="PACKAGE",
                        help="an npm package the command needs (repeatable)")
    parser.add_argument("command", nargs="*", help="the command (default: the image's)")
    return parser.parse_args(argv)


async def main(argv: List[str]) -> int:
    args = parse_args(argv)
    env = {}
    for entry in args.env:
        name, sep, value = entry.partition("=")
        if not sep:
            print(f"quilt: invalid --env {entry!r}: use NAME=VALUE", file=sys.stderr)
            return EXIT_QUILT_ERROR
        env[name] = value
    limits = {
        "memory_mb": args.memory_mb,
        "cpus": args.cpus,
        "pids": args.pids,
        "timeout_s": args.timeout,
        "output_bytes": args.output_bytes,
    }
    extra: Dict[str, Any] = {"workdir": args.workdir} if args.workdir else {}
    # Packages: built once by the worker into an environment layer, then cached.
    environment = {name: packages for name, packages in (("apt", args.apt), ("pip", args.pip), ("npm", args.npm))
                   if packages}
    if environment:
        extra["environment"] = environment
    try:
        task = build_task(args.image, args.command, task_id=args.id, env=env, limits=limits, **extra)
    except ValueError as error:
        print(f"quilt: {error}", file=sys.stderr)
        return EXIT_QUILT_ERROR

    async def quiet(_error: Exception) -> None:
        pass  # connection trouble is reported by what fails because of it

    try:
        nc = await nats.connect(
            args.nats,
            name="quilt-example-agent",
            connect_timeout=5,
            # Fail fast when nobody answers; ride out a short outage later.
            max_reconnect_attempts=3,
            reconnect_time_wait=0.5,
            error_cb=quiet,
        )
    except Exception as error:
        print(
            f"quilt: cannot connect to NATS at {args.nats} ({error!r}); is `quilt up` running?",
            file=sys.stderr,
        )
        return EXIT_QUILT_ERROR
    try:
        result = await run_task(
            nc,
            task,
            None if args.json else print_output,
            timeout=args.wait,
            on_restart=lambda attempt: print(
                f"quilt: the task is running again (delivery {attempt})", file=sys.stderr
            ),
        )
    except asyncio.TimeoutError:
        print(
            f"quilt: no result for task {task['id']} within {args.wait} s; "
            f"it may still run: `quilt result {task['id']}`",
            file=sys.stderr,
        )
        return EXIT_QUILT_ERROR
    except (QuiltError, nats.errors.Error) as error:
        print(f"quilt: task {task['id']}: {error}", file=sys.stderr)
        return EXIT_QUILT_ERROR
    finally:
        await nc.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(summary_of(result), file=sys.stderr)
    return exit_code_of(result)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(sys.argv[1:])))
    except KeyboardInterrupt:
        print("quilt: interrupted; the task keeps running on its worker", file=sys.stderr)
        sys.exit(130)
