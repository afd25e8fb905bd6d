"""An OpAMP agent over WebSocket for opamp-transport/tests/interop.rs, built from
code this project did not write: the `websockets` library (PyPI) for the
WebSocket connection and OpenTelemetry's Python OpAMP client package for every
message (its generated protobuf code and its message builders and decoders).
That client has no WebSocket transport of its own; this script adds only the
OpAMP WebSocket framing (a varint header, 0, before each protobuf) and the loop.

Lines of JSON on stdout, which the test reads:

  {"event": "connected", "instance_uid": HEX}           the upgrade succeeded
  {"event": "rejected", "status": N}                    the upgrade was refused
  {"event": "beat"}                                      a heartbeat was sent
  {"event": "received", "flags": N, "capabilities": N}   any ServerToAgent
  {"event": "config", "hash": HEX, "files": {...}}       a remote config, applied
  {"event": "refused", "hash": HEX, "error": TEXT}       one the package could not decode
  {"event": "error", "type": N, "message": TEXT, "retry_after_ns": N}
  {"event": "new_uid", "uid": HEX}                       the server assigned a new instance_uid
  {"event": "closed", "code": N, "reason": TEXT}         the server closed the socket

It sends AgentDisconnect and closes when its stdin closes.
"""

import argparse
import asyncio
import json
import sys
import uuid

import websockets
from opentelemetry._opamp import messages
from opentelemetry._opamp.client import _DEFAULT_CAPABILITIES
from opentelemetry._opamp.proto import opamp_pb2


def say(**fields):
    print(json.dumps(fields), flush=True)


def frame(message):
    # The WebSocket header is a varint; 0 is its one defined value, one byte.
    return b"\x00" + messages.encode_message(message)


def unframe(data):
    header, shift, at = 0, 0, 0
    while True:
        byte = data[at]
        at += 1
        header |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    if header != 0:
        raise ValueError(f"unexpected WebSocket message header {header}")
    return messages.decode_message(data[at:])


class Agent:
    def __init__(self, args):
        self.uid = uuid.UUID(args.instance_uid).bytes if args.instance_uid else uuid.uuid4().bytes
        self.seq = 0
        self.description = messages.build_agent_description(
            identifying_attributes={
                "service.name": args.service_name,
                "service.instance.id": args.instance_id,
            },
            non_identifying_attributes={"os.type": "linux"},
        )
        self.remote_status = None
        self.effective = None

    def next_seq(self):
        self.seq += 1
        return self.seq

    def full_state(self):
        return messages.build_full_state_message(
            instance_uid=self.uid,
            sequence_num=self.next_seq(),
            agent_description=self.description,
            capabilities=_DEFAULT_CAPABILITIES,
            remote_config_status=self.remote_status,
            effective_config=self.effective,
        )

    def heartbeat(self):
        return messages.build_heartbeat_message(self.uid, self.next_seq(), _DEFAULT_CAPABILITIES)

    def disconnect(self):
        return messages.build_agent_disconnect_message(self.uid, self.next_seq(), _DEFAULT_CAPABILITIES)

    def answer(self, reply):
        """What to send back for one ServerToAgent, if anything."""
        say(event="received", flags=int(reply.flags), capabilities=int(reply.capabilities))
        if reply.HasField("error_response"):
            error = reply.error_response
            say(
                event="error",
                type=int(error.type),
                message=error.error_message,
                retry_after_ns=int(error.retry_info.retry_after_nanoseconds),
            )
            return None
        if reply.HasField("agent_identification") and reply.agent_identification.new_instance_uid:
            self.uid = reply.agent_identification.new_instance_uid
            say(event="new_uid", uid=self.uid.hex())
        if reply.HasField("remote_config"):
            remote = reply.remote_config
            try:
                files = dict(messages.decode_remote_config(remote))
            except Exception as exc:  # the package's own decode errors: report FAILED
                status = opamp_pb2.RemoteConfigStatuses_FAILED
                error_message = str(exc)
                say(event="refused", hash=remote.config_hash.hex(), error=error_message)
            else:
                status = opamp_pb2.RemoteConfigStatuses_APPLIED
                error_message = ""
                self.effective = messages.build_effective_config_message(files, "application/json")
                say(event="config", hash=remote.config_hash.hex(), files=files)
            self.remote_status = messages.build_remote_config_status_message(
                remote.config_hash, status, error_message
            )
            return messages.build_remote_config_status_response_message(
                self.uid, self.next_seq(), _DEFAULT_CAPABILITIES, self.remote_status
            )
        if reply.flags & opamp_pb2.ServerToAgentFlags_ReportFullState:
            return self.full_state()
        return None


async def run(args):
    agent = Agent(args)
    headers = {}
    for header in args.header:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    try:
        socket = await websockets.connect(args.endpoint, additional_headers=headers, max_size=None)
    except websockets.exceptions.InvalidStatus as exc:
        say(event="rejected", status=exc.response.status_code)
        return
    say(event="connected", instance_uid=agent.uid.hex())
    await socket.send(frame(agent.full_state()))

    async def beat():
        while True:
            await asyncio.sleep(args.heartbeat)
            await socket.send(frame(agent.heartbeat()))
            say(event="beat")

    async def stdin_closed():
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    async def receive():
        async for data in socket:
            if isinstance(data, str):
                raise ValueError("the server sent a text message")
            out = agent.answer(unframe(data))
            if out is not None:
                await socket.send(frame(out))

    tasks = [asyncio.create_task(t) for t in (beat(), stdin_closed(), receive())]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    if tasks[1] in done:
        try:
            await socket.send(frame(agent.disconnect()))
            await socket.close()
        except websockets.exceptions.ConnectionClosed:
            pass
    for task in done:
        if task.exception() and not isinstance(task.exception(), websockets.exceptions.ConnectionClosed):
            raise task.exception()
    say(event="closed", code=socket.close_code, reason=socket.close_reason or "")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True, help="ws://host:port/v1/opamp")
    parser.add_argument("--service-name", default="interop-python-ws")
    parser.add_argument("--instance-id", required=True, help="the service.instance.id attribute")
    parser.add_argument("--instance-uid", help="a UUID; random when not given")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--header", action="append", default=[], help="NAME: VALUE, sent with the upgrade")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
