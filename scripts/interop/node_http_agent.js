// Drives Elastic's Node.js OpAMP client (npm @elastic/opamp-client-node) for
// opamp-transport/tests/interop.rs, over plain HTTP (the one transport it has).
//
// The client does the protocol work: full state first, heartbeats, ReportFullState,
// RemoteConfigStatus, 429/503 Retry-After and ServerErrorResponse back-off. This
// script wires its callbacks and diagnostics channels to lines of JSON on stdout:
//
//   {"event": "sent", "uid": HEX, "seq": N, "server_capabilities": N, "flags": N}   a request answered
//   {"event": "send_failed", "error": TEXT, "retry_after_ms": N|null}   one that was not
//   {"event": "config", "hash": HEX, "files": {...}}   a remote config it applied
//   {"event": "refused", "hash": HEX, "error": TEXT}   one whose JSON did not parse
//   {"event": "stopped"}
//
// It shuts the client down when its stdin closes (this client sends no AgentDisconnect).
'use strict';

const diagnostics = require('node:diagnostics_channel');
const {parseArgs} = require('node:util');
const {
    createOpAMPClient,
    AgentCapabilities,
    RemoteConfigStatuses,
    DIAG_CH_SEND_SUCCESS,
    DIAG_CH_SEND_FAIL,
} = require('@elastic/opamp-client-node');

const {values: args} = parseArgs({
    options: {
        endpoint: {type: 'string'},
        'instance-uid': {type: 'string'},
        'service-name': {type: 'string', default: 'interop-node'},
        heartbeat: {type: 'string', default: '1'},
        header: {type: 'string', multiple: true, default: []},
    },
});
if (!args.endpoint || !args['instance-uid']) {
    console.error('usage: node_http_agent.js --endpoint URL --instance-uid UUID [--heartbeat S] [--header "N: V"]');
    process.exit(2);
}

function say(fields) {
    process.stdout.write(JSON.stringify(fields) + '\n');
}

const hex = (bytes) => Buffer.from(bytes).toString('hex');
const headers = {};
for (const header of args.header) {
    const at = header.indexOf(':');
    headers[header.slice(0, at).trim()] = header.slice(at + 1).trim();
}

diagnostics.subscribe(DIAG_CH_SEND_SUCCESS, (msg) => {
    say({
        event: 'sent',
        uid: hex(msg.a2s.instanceUid),
        seq: Number(msg.a2s.sequenceNum),
        server_capabilities: Number(msg.s2a.capabilities),
        flags: Number(msg.s2a.flags),
    });
});
diagnostics.subscribe(DIAG_CH_SEND_FAIL, (msg) => {
    say({event: 'send_failed', error: String(msg.err), retry_after_ms: msg.retryAfterMs ?? null});
});

const client = createOpAMPClient({
    endpoint: args.endpoint,
    headers,
    instanceUid: args['instance-uid'],
    heartbeatIntervalSeconds: Number(args.heartbeat),
    capabilities:
        AgentCapabilities.AgentCapabilities_AcceptsRemoteConfig |
        AgentCapabilities.AgentCapabilities_ReportsRemoteConfig,
    diagEnabled: true,
    onMessage: ({remoteConfig}) => {
        if (!remoteConfig) {
            return;
        }
        const files = {};
        let error = null;
        for (const [name, file] of Object.entries(remoteConfig.config?.configMap ?? {})) {
            try {
                files[name] = JSON.parse(Buffer.from(file.body).toString('utf8'));
            } catch (err) {
                error = `${name}: ${err.message}`;
            }
        }
        if (error) {
            say({event: 'refused', hash: hex(remoteConfig.configHash), error});
            client.setRemoteConfigStatus({
                status: RemoteConfigStatuses.RemoteConfigStatuses_FAILED,
                lastRemoteConfigHash: remoteConfig.configHash,
                errorMessage: error,
            });
        } else {
            say({event: 'config', hash: hex(remoteConfig.configHash), files});
            client.setRemoteConfigStatus({
                status: RemoteConfigStatuses.RemoteConfigStatuses_APPLIED,
                lastRemoteConfigHash: remoteConfig.configHash,
                errorMessage: '',
            });
        }
    },
});
client.setAgentDescription({
    identifyingAttributes: {'service.name': args['service-name']},
    nonIdentifyingAttributes: {'os.type': 'linux'},
});
client.start();
say({event: 'started'});

process.stdin.resume();
process.stdin.on('end', async () => {
    await client.shutdown();
    say({event: 'stopped'});
    process.exit(0);
});
