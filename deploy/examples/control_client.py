#!/usr/bin/env python3
"""Quilt's control API from Python: plain NATS requests to the `quilt` micro
service that every worker runs (README.md "The control API",
schemas/api/*.json). Nothing here is Quilt-specific beyond subjects and JSON.

    python3 deploy/examples/control_client.py list
    python3 deploy/examples/control_client.py exec db -- sh -c 'echo hi'
    python3 deploy/examples/control_client.py logs db --tail 20
    python3 deploy/examples/control_client.py stop db
    python3 deploy/examples/control_client.py rm db

Requests on `quilt.api.any.<verb>` are answered by one worker of the fleet,
which relays a request about a long-running container to the worker that
owns it. Every reply is `{"ok": ...}` or `{"error": {"kind", "message"}}`.
`list` first finds every worker with the service discovery
(`$SRV.PING.quilt`) and asks each on `quilt.api.<worker_id>.containers.list`.

The NATS server is $QUILT_NATS_URL, else nats://127.0.0.1:4222. Needs nats-py.
"""

import argparse
import asyncio
import json
import os
import sys
from typing import Any, Dict, List

import nats

API_ANY = "quilt.api.any"
PING = "$SRV.PING.quilt"


class ApiError(Exception):
    """An `{"error": ...}` reply: `kind` is stable, `message` is for people."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


async def request(nc, subject: str, body: Any, timeout: float = 30.0) -> Any:
    """One control API request; the `ok` value, or ApiError."""
    payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    reply = await nc.request(subject, payload, timeout=timeout)
    answer = json.loads(reply.data)
    if "error" in answer:
        raise ApiError(answer["error"]["kind"], answer["error"]["message"])
    return answer["ok"]


async def workers(nc, wait: float = 0.5) -> List[str]:
    """Ids of the workers whose control API answers a discovery ping."""
    found = set()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(PING, b"", reply=inbox)
    try:
        while True:
            message = await sub.next_msg(timeout=wait)
            worker = json.loads(message.data).get("metadata", {}).get("worker_id")
            if worker:
                found.add(worker)
    except nats.errors.TimeoutError:
        pass
    await sub.unsubscribe()
    return sorted(found)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="every worker's containers")
    exec_ = verbs.add_parser("exec", help="run a command inside a long-running container")
    exec_.add_argument("name")
    exec_.add_argument("--timeout", type=float, help="seconds")
    exec_.add_argument("command", nargs=argparse.REMAINDER)
    logs = verbs.add_parser("logs", help="a long-running container's log")
    logs.add_argument("name")
    logs.add_argument("--tail", type=int)
    for verb in ("stop", "rm"):
        sub = verbs.add_parser(verb, help=f"{verb} a long-running container")
        sub.add_argument("name")
        sub.add_argument("--grace", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL")
    args = parser.parse_args()

    nc = await nats.connect(os.environ.get("QUILT_NATS_URL", "nats://127.0.0.1:4222"))
    try:
        if args.verb == "list":
            for worker in await workers(nc):
                for container in await request(nc, f"quilt.api.{worker}.containers.list", ""):
                    print(json.dumps(container, sort_keys=True))
            return 0
        if args.verb == "exec":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            body: Dict[str, Any] = {"name": args.name, "command": command}
            if args.timeout:
                body["timeout_s"] = args.timeout
            result = await request(nc, f"{API_ANY}.containers.exec", body, timeout=(args.timeout or 3600) + 30)
            sys.stdout.write(result["stdout"])
            sys.stderr.write(result["stderr"])
            if result.get("error"):
                print(f"quilt: {result['status']}: {result['error']['message']}", file=sys.stderr)
                return 125
            return result["exit_code"] if result["exit_code"] is not None else 128 + (result["signal"] or 0)
        if args.verb == "logs":
            body = {"name": args.name, "tail": args.tail} if args.tail else {"name": args.name}
            sys.stdout.write((await request(nc, f"{API_ANY}.containers.logs", body))["data"])
            return 0
        verb = {"stop": "containers.stop", "rm": "containers.remove"}[args.verb]
        answer = await request(nc, f"{API_ANY}.{verb}", {"name": args.name, "grace_s": args.grace},
                               timeout=args.grace + 30)
        print(json.dumps(answer, sort_keys=True))
        return 0
    except ApiError as error:
        print(f"quilt: {error}", file=sys.stderr)
        return 1
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
