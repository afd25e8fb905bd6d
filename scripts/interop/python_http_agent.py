"""Drives OpenTelemetry's Python OpAMP client (PyPI opentelemetry-opamp-client)
for opamp-transport/tests/interop.rs, over plain HTTP (the one transport it has).

The client does all the protocol work: the full-state first message, heartbeats,
ReportFullState, RemoteConfigStatus, AgentDisconnect. This script only wires its
callbacks to lines of JSON on stdout, which the test reads:

  {"event": "connected"}                       a request answered 200 (every poll)
  {"event": "config", "hash": HEX, "files": {...}}   a remote config, decoded by the client
  {"event": "refused", "hash": HEX, "error": TEXT}   one the client could not decode
  {"event": "error", "type": N, "message": TEXT}     a ServerErrorResponse
  {"event": "stopped"}                          after AgentDisconnect was sent

It stops (sending AgentDisconnect) when its stdin closes.
"""

import argparse
import json
import sys
import threading

from opentelemetry._opamp.agent import OpAMPAgent
from opentelemetry._opamp.callbacks import OpAMPCallbacks
from opentelemetry._opamp.client import OpAMPClient
from opentelemetry._opamp.proto import opamp_pb2

_print_lock = threading.Lock()


def say(**fields):
    with _print_lock:
        print(json.dumps(fields), flush=True)


class Callbacks(OpAMPCallbacks):
    def on_connect(self, agent, client):
        say(event="connected")

    def on_connect_failed(self, agent, client, error):
        say(event="connect_failed", error=str(error))

    def on_error(self, agent, client, error_response):
        say(event="error", type=int(error_response.type), message=error_response.error_message)

    def on_message(self, agent, client, message):
        remote = message.remote_config
        if remote is None:
            return
        try:
            files = dict(client.decode_remote_config(remote))
        except Exception as exc:  # the client's own decode errors: report them as FAILED
            status = client.update_remote_config_status(
                remote_config_hash=remote.config_hash,
                status=opamp_pb2.RemoteConfigStatuses_FAILED,
                error_message=str(exc),
            )
            say(event="refused", hash=remote.config_hash.hex(), error=str(exc))
        else:
            status = client.update_remote_config_status(
                remote_config_hash=remote.config_hash,
                status=opamp_pb2.RemoteConfigStatuses_APPLIED,
            )
            client.update_effective_config(files, content_type="application/json")
            say(event="config", hash=remote.config_hash.hex(), files=files)
        if status is not None:
            agent.send(payload=client.build_remote_config_status_response_message(status))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--service-name", default="interop-python")
    parser.add_argument("--instance-id", required=True, help="the service.instance.id attribute")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--header", action="append", default=[], help="NAME: VALUE, sent on every request")
    args = parser.parse_args()

    headers = {}
    for header in args.header:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()

    client = OpAMPClient(
        endpoint=args.endpoint,
        headers=headers,
        timeout_millis=5_000,
        agent_identifying_attributes={
            "service.name": args.service_name,
            "service.instance.id": args.instance_id,
        },
        agent_non_identifying_attributes={"os.type": "linux"},
    )
    agent = OpAMPAgent(
        interval=args.heartbeat,
        callbacks=Callbacks(),
        client=client,
        initial_backoff=0.2,
    )
    agent.start()
    say(event="started", instance_uid=client._instance_uid.hex())
    sys.stdin.read()
    agent.stop(timeout=5)
    say(event="stopped")


if __name__ == "__main__":
    main()
