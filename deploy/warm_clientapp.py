"""A long-lived ClientApp process for one site (Flower 1.41.0, SuperNode ``--isolation process``).

Flower 1.41 runs every message in a fresh ``flwr-clientapp`` process: each round re-imports torch
and diffusers and reloads the site's model. Start the SuperNode with ``--isolation process`` and
run this next to it instead of Flower's SuperExec:

    flower-supernode --isolation process --port 9094 ...
    python deploy/warm_clientapp.py --runtime-api-address 127.0.0.1:9094 --parent-pid PID

It acquires the SuperNode's ClientApp tasks from the Runtime API one at a time and runs each
inside this same Python process, exactly as ``flwr-clientapp`` would (pull the message and
context, install the FAB, load the ClientApp, run it, push the reply and the context). Modules
are imported once, so module-level caches (privadapt's ``client.app._PIPELINES``) stay resident
across rounds and across jobs. A task from a different FAB (other code) first drops the modules
of the previous app, so new code is never served by old modules.

Every task prints one JSON line (``"event": "task"``): its seconds, the serving PID, whether the
app's modules were already loaded and how many modules the task imported (0 once warm).

Only Flower and the standard library are imported here: the app's own code comes from the FAB.
It is launched by path, not with ``python -m deploy.warm_clientapp``: ``-m`` needs the repository
root on ``sys.path``, and although Flower's loader puts the FAB's folder first, a module the FAB does
not carry (``evaluation``, ``deploy``, ...) would then be imported from the checkout instead of failing.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger("privadapt.warm_clientapp")


def runtime_client(address: str, certificates: bytes | None, component: str,
                   token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=certificates is None, root_certificates=certificates,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


def pull_task_input(client: RuntimeHttpClient, backoff: float = 0.1, backoff_cap: float = 0.5):
    """Flower's ``pull_task_input`` with a short retry backoff: the SuperNode creates the task before
    it has pulled the message's objects from the SuperLink, and Flower's backoff (1, 2, 4, 8 s)
    costs a ready process up to 15 s per round (a fresh process spends that time importing)."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=backoff, backoff_cap=backoff_cap)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: the id is not in the content
    return message, context, run, fab


def forget_app(app_dir: Path) -> int:
    """Drop every imported module that lives under ``app_dir``; return how many."""
    prefix = str(app_dir.resolve()) + os.sep
    names = [name for name, module in list(sys.modules.items())
             if (getattr(module, "__file__", None) or "").startswith(prefix)]
    for name in names:
        del sys.modules[name]
    while str(app_dir) in sys.path:
        sys.path.remove(str(app_dir))
    gc.collect()
    return len(names)


class WarmExecutor:
    """Runs one SuperNode's ClientApp tasks, one after the other, in this process."""

    def __init__(self, address: str, certificates: bytes | None) -> None:
        self.address = address
        self.certificates = certificates
        self.app_dir: Path | None = None
        self.tasks = 0

    def run_forever(self, poll_interval: float) -> None:
        superexec = runtime_client(self.address, self.certificates, component="SuperExec")
        log.info("serving the ClientApp tasks of %s in pid %d", self.address, os.getpid())
        try:
            while True:
                res = superexec.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
                if res.HasField("task") and res.token:
                    self.serve(res.token, res.task)
                else:
                    time.sleep(poll_interval)
        finally:
            superexec.close()

    def serve(self, token: str, task) -> None:
        # one line when a task is taken and one when it ends: a task without its end is in progress
        print(json.dumps({"event": "acquired", "pid": os.getpid(), "task_id": task.task_id, "run_id": task.run_id}),
              flush=True)
        started, modules = time.time(), len(sys.modules)
        app_loaded = self.app_dir is not None
        status, timings = self.run_in_process(token)
        self.tasks += 1
        print(json.dumps({
            "event": "task", "pid": os.getpid(), "task_index": self.tasks, "task_id": task.task_id,
            "run_id": task.run_id, "status": status, "app_loaded_before": app_loaded,
            "new_modules": len(sys.modules) - modules, "started": round(started, 3),
            "seconds": round(time.time() - started, 3), **timings,
        }), flush=True)

    def run_in_process(self, token: str) -> tuple[str, dict[str, float]]:
        """``flwr-clientapp``'s work for one task, without leaving the process."""
        client = runtime_client(self.address, self.certificates, component="flwr-clientapp", token=token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            timings["pull_seconds"] = round(time.perf_counter() - clock, 3)
            install_from_fab(fab.content, skip_prompt=True)
            app_dir = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
            if self.app_dir is not None and self.app_dir != app_dir:
                log.info("new app %s: dropped %d modules of %s", app_dir.name, forget_app(self.app_dir),
                         self.app_dir.name)
            self.app_dir = app_dir
            client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str)
            clock = time.perf_counter()
            reply = client_app(message=message, context=context)
            timings["app_seconds"] = round(time.perf_counter() - clock, 3)  # the site's own work
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # pylint: disable=broad-exception-caught
            # As flwr-clientapp: the error goes back to the ServerApp as an error reply.
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            details = f"{type(ex)}:<'{ex}'>"
            log.exception("ClientApp raised an exception")
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # pylint: disable=broad-exception-caught
                log.exception("failed to push the reply")
                status = SubStatus.FAILED
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
        return status, timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's Runtime API (its --host:--port)")
    parser.add_argument("--root-certificates", default=None,
                        help="CA certificate of the Runtime API when the SuperNode serves it with TLS "
                             "(its --ssl-certfile); plain HTTP on the site's loopback otherwise")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between task polls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    certificates = Path(args.root_certificates).read_bytes() if args.root_certificates else None
    executor = WarmExecutor(args.runtime_api_address, certificates)
    try:
        executor.run_forever(args.poll_interval)
    except KeyboardInterrupt:
        log.info("stopped after %d task(s)", executor.tasks)


if __name__ == "__main__":
    main()
