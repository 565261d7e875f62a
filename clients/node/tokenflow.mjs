#!/usr/bin/env node
// A command-line client for TokenFlow's gRPC service, built on @grpc/grpc-js
// with the service loaded at run time from the repository's .proto file.

import { X509Certificate } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const REPOSITORY = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const PROTO_FILE = "tokenflow/v1/tokenflow.proto";
// google/api/annotations.proto, which the contract imports, is copied into
// build/proto-deps by `make proto-deps`.
const INCLUDE_DIRS = [path.join(REPOSITORY, "proto"), path.join(REPOSITORY, "build/proto-deps")];

const DEFAULT_TARGET = "127.0.0.1:50051";
const API_KEY_ENV = "TOKENFLOW_API_KEY";
// gRPC metadata values that are not binary (-bin) must be printable ASCII.
const METADATA_TEXT = /^[ -~]*$/;
const DEFAULT_TIMEOUT_SECONDS = 10;
const RATE_LIMIT_METADATA = [
  "x-ratelimit-limit",
  "x-ratelimit-remaining",
  "x-ratelimit-reset",
  "x-ratelimit-window",
  "retry-after",
];
// Initial metadata that the server sends once a WatchActivity stream is live.
const WATCH_SUBSCRIBED = ["tokenflow-watch", "subscribed"];

const USAGE = `usage: node tokenflow.mjs COMMAND [OPTIONS]

Commands:
  generate PROMPT   Send one prompt; print the response as JSON on stdout and
                    the rate-limit metadata on stderr.
      --model NAME  --temperature T (0 to 2)  --max-tokens N (1 to 8192)  --skip-cache
  stats             Print GetStats as JSON.
      --activity-limit N   latest events to include (default 0: the server's 20)
  watch             Print activity events as JSON lines until Ctrl-C or --count.
      --since-id ID        resume after this event id
      --type TYPE          only this event type, such as ACTIVITY_TYPE_CACHE_HIT; repeatable
      --count N            stop after N events

Every command takes --target HOST:PORT (default ${DEFAULT_TARGET}). generate and
stats take --timeout SECONDS, the call's deadline (default ${DEFAULT_TIMEOUT_SECONDS}).

Every command also takes:
  --api-key KEY        API key sent as \`authorization: Bearer KEY\`. Environment:
                       ${API_KEY_ENV}, which other users cannot read in the
                       process list, unlike this option.
  --ca-cert FILE       PEM CA certificates that sign the server's TLS
                       certificate; set, the client connects over TLS.
  --tls                Connect over TLS, checking the server's certificate
                       against the CA certificates that Node.js trusts by
                       default (implied by --ca-cert and --server-name).
  --server-name NAME   Host name checked in the server's TLS certificate, when
                       it differs from the --target host.

A failed call prints "error: CODE: message" on stderr and exits with status 1.
A wrong option or option value, such as a --ca-cert file that cannot be read,
exits with status 2.`;

const OPTIONS = {
  target: { type: "string", default: DEFAULT_TARGET },
  timeout: { type: "string", default: String(DEFAULT_TIMEOUT_SECONDS) },
  model: { type: "string" },
  temperature: { type: "string" },
  "max-tokens": { type: "string" },
  "skip-cache": { type: "boolean", default: false },
  "activity-limit": { type: "string", default: "0" },
  "since-id": { type: "string", default: "" },
  type: { type: "string", multiple: true, default: [] },
  count: { type: "string", default: "0" },
  "api-key": { type: "string" },
  "ca-cert": { type: "string" },
  tls: { type: "boolean", default: false },
  "server-name": { type: "string" },
  help: { type: "boolean", short: "h", default: false },
};

// A wrong command line: exit status 2.
class UsageError extends Error {}
// A missing file that the client needs before it can call the server: exit status 1.
class SetupError extends Error {}
// An option value that cannot be used, such as an unreadable --ca-cert file:
// exit status 2, as in the Python `tokenflow` command.
class ConfigurationError extends Error {}

// NOTE: grpc-js 1.14.7 sets the TLS server name (SNI) to the --target host even
// when that host is an IP address, and Node.js then prints deprecation warning
// DEP0123 for every TLS connection. Node.js still checks the certificate
// against that address, so the warning gives the user nothing to act on and
// is dropped here. Every other warning is printed as usual.
const emitWarning = process.emitWarning;
process.emitWarning = function (warning, ...rest) {
  const code = typeof rest[0] === "object" ? rest[0]?.code : rest[1];
  if (code === "DEP0123") return;
  emitWarning.call(this, warning, ...rest);
};

// Protobuf's JSON mapping prints Timestamp and Duration as strings
// ("2026-01-01T12:00:00.250Z", "60s"), as the Python client and buf curl do,
// whereas protobufjs, under @grpc/proto-loader, would print {seconds, nanos}.
// protobufjs applies a wrapper to every message of that type it converts.
protobuf.wrappers[".google.protobuf.Timestamp"] = {
  fromObject(object) {
    return this.fromObject(object);
  },
  toObject(message, options) {
    const { seconds, nanos } = this.toObject(message, { ...options, longs: String });
    const whole = new Date(Number(seconds) * 1000).toISOString().slice(0, 19);
    return `${whole}${fraction(nanos)}Z`;
  },
};
protobuf.wrappers[".google.protobuf.Duration"] = {
  fromObject(object) {
    return this.fromObject(object);
  },
  toObject(message, options) {
    const { seconds, nanos } = this.toObject(message, { ...options, longs: String });
    const sign = seconds.startsWith("-") || nanos < 0 ? "-" : "";
    return `${sign}${seconds.replace("-", "")}${fraction(Math.abs(nanos))}s`;
  },
};

// Return a message as one line of JSON. Unset message and optional fields,
// which proto-loader gives as null, are left out, as protobuf's JSON mapping
// and the Python client leave them out.
function toJson(message) {
  return JSON.stringify(message, (key, value) => (value === null ? undefined : value));
}

// Return nanoseconds as ".250", ".250001" or ".250000001" (3, 6 or 9 digits),
// or "" for none.
function fraction(nanos) {
  if (!nanos) return "";
  return `.${String(nanos).padStart(9, "0").replace(/(000)+$/, "")}`;
}

function loadService() {
  const annotations = path.join(INCLUDE_DIRS[1], "google/api/annotations.proto");
  if (!existsSync(annotations)) {
    throw new SetupError(`${annotations} is missing: run \`make proto-deps\` in ${REPOSITORY}`);
  }
  // These options print messages in protobuf's JSON form: lowerCamelCase
  // names, 64-bit integers as strings, enums by name and every field present.
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: INCLUDE_DIRS,
    longs: String,
    enums: String,
    defaults: true,
  });
  const activityTypes = definition["tokenflow.v1.ActivityType"].type.value
    .map((value) => value.name)
    .filter((name) => name !== "ACTIVITY_TYPE_UNSPECIFIED");
  const { TokenFlowService } = grpc.loadPackageDefinition(definition).tokenflow.v1;
  return { TokenFlowService, activityTypes };
}

// Return the metadata that every call sends: the API key from --api-key or,
// when that is unset or empty, from TOKENFLOW_API_KEY.
function callMetadata(options) {
  const metadata = new grpc.Metadata();
  const apiKey = options["api-key"] || process.env[API_KEY_ENV] || undefined;
  if (apiKey === undefined) return metadata;
  // grpc-js would reject such a key with an error that contains it.
  if (!METADATA_TEXT.test(apiKey)) {
    throw new ConfigurationError(
      `the API key from ${options["api-key"] ? "--api-key" : API_KEY_ENV} contains characters ` +
        "other than printable ASCII, which gRPC metadata cannot carry; check the key",
    );
  }
  metadata.set("authorization", `Bearer ${apiKey}`);
  return metadata;
}

function usesTls(options) {
  return Boolean(options["ca-cert"] || options.tls || options["server-name"]);
}

// Return the channel credentials and options: TLS when --ca-cert, --tls or
// --server-name is set, else plaintext.
function channelSecurity(options) {
  const caCert = options["ca-cert"];
  const serverName = options["server-name"];
  if (!usesTls(options)) {
    return { credentials: grpc.credentials.createInsecure(), channelOptions: {} };
  }
  // null makes grpc-js use GRPC_DEFAULT_SSL_ROOTS_FILE_PATH when set, else
  // the CA certificates that Node.js trusts by default.
  const roots = caCert ? readCertificates(caCert, "--ca-cert") : null;
  const credentials = grpc.credentials.createSsl(roots);
  const channelOptions = serverName ? { "grpc.ssl_target_name_override": serverName } : {};
  return { credentials, channelOptions };
}

// Return the contents of a PEM file of certificates. Node.js ignores a CA
// certificate that it cannot parse, after which every TLS handshake fails on
// the server's certificate, so the first certificate is parsed here to report
// a wrong file at once.
function readCertificates(file, option) {
  let data;
  try {
    data = readFileSync(file);
  } catch (error) {
    throw new ConfigurationError(`cannot read ${option} ${file}: ${error.message}`);
  }
  if (!data.includes("-----BEGIN ")) {
    throw new ConfigurationError(`${option} ${file} is not a PEM file (no -----BEGIN line)`);
  }
  try {
    new X509Certificate(data);
  } catch (error) {
    throw new ConfigurationError(
      `the first certificate in ${option} ${file} is missing or invalid: ${error.message}`,
    );
  }
  return data;
}

function parseNumber(name, text, { integer = false, min = -Infinity } = {}) {
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new UsageError(`--${name} must be ${integer ? "an integer" : "a number"}, got "${text}"`);
  }
  if (value < min) {
    throw new UsageError(`--${name} must be at least ${min}, got ${text}`);
  }
  return value;
}

function deadline(options) {
  const seconds = parseNumber("timeout", options.timeout);
  if (seconds <= 0) {
    throw new UsageError(`--timeout must be a positive number of seconds, got ${options.timeout}`);
  }
  return { deadline: Date.now() + seconds * 1000 };
}

function expectNoArguments(command, positionals) {
  if (positionals.length) {
    throw new UsageError(`${command} takes no arguments, got "${positionals.join(" ")}"`);
  }
}

function printRateLimit(metadata) {
  for (const key of RATE_LIMIT_METADATA) {
    for (const value of metadata?.get(key) ?? []) {
      console.error(`${key}: ${value}`);
    }
  }
}

function printError(error, options) {
  console.error(`error: ${grpc.status[error.code] ?? error.code}: ${error.details}`);
  // Over plaintext, a port that accepts only TLS fails with "Failed to connect",
  // which does not name TLS.
  if (error.code === grpc.status.UNAVAILABLE && !usesTls(options)) {
    console.error(
      `note: the call used plaintext; if ${options.target} accepts only TLS, ` +
        "add --ca-cert FILE or --tls",
    );
  }
}

function generate(client, metadata, positionals, options) {
  if (positionals.length !== 1) {
    throw new UsageError("generate takes exactly one PROMPT argument");
  }
  const request = { prompt: positionals[0], skipCache: options["skip-cache"] };
  if (options.model !== undefined) request.model = options.model;
  if (options.temperature !== undefined) {
    request.temperature = parseNumber("temperature", options.temperature);
  }
  if (options["max-tokens"] !== undefined) {
    request.maxTokens = parseNumber("max-tokens", options["max-tokens"], { integer: true });
  }

  return new Promise((resolve) => {
    let headers;
    const call = client.Generate(request, metadata, deadline(options), (error, response) => {
      if (error) {
        // A rejected call carries the rate-limit metadata, retry-after
        // included, in its trailers.
        printError(error, options);
        printRateLimit(error.metadata);
        resolve(1);
        return;
      }
      console.log(toJson(response));
      printRateLimit(headers);
      resolve(0);
    });
    call.on("metadata", (metadata) => {
      headers = metadata;
    });
  });
}

function stats(client, metadata, positionals, options) {
  expectNoArguments("stats", positionals);
  const activityLimit = parseNumber("activity-limit", options["activity-limit"], {
    integer: true,
    min: 0,
  });
  return new Promise((resolve) => {
    client.GetStats({ activityLimit }, metadata, deadline(options), (error, response) => {
      if (error) {
        printError(error, options);
        resolve(1);
        return;
      }
      console.log(toJson(response));
      resolve(0);
    });
  });
}

async function watch(client, metadata, positionals, options, activityTypes) {
  expectNoArguments("watch", positionals);
  const count = parseNumber("count", options.count, { integer: true, min: 0 });
  for (const type of options.type) {
    if (!activityTypes.includes(type)) {
      throw new UsageError(`invalid --type ${type}: expected one of ${activityTypes.join(", ")}`);
    }
  }

  const call = client.WatchActivity(
    { sinceId: options["since-id"], types: options.type },
    metadata,
  );
  call.on("metadata", (headers) => {
    if (headers.get(WATCH_SUBSCRIBED[0]).includes(WATCH_SUBSCRIBED[1])) {
      console.error(`subscribed to activity on ${options.target}`);
    }
  });
  let printed = 0;
  try {
    for await (const response of call) {
      console.log(toJson(response));
      printed += 1;
      if (count && printed >= count) {
        call.cancel();
        break;
      }
    }
  } catch (error) {
    printError(error, options);
    return 1;
  }
  return 0;
}

const COMMANDS = { generate, stats, watch };

async function main(argv) {
  const { values: options, positionals } = parseArgs({
    args: argv,
    options: OPTIONS,
    allowPositionals: true,
  });
  const [command, ...rest] = positionals;
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  if (!(command in COMMANDS)) {
    throw new UsageError(command ? `unknown command "${command}"` : "missing COMMAND");
  }

  const metadata = callMetadata(options);
  const { credentials, channelOptions } = channelSecurity(options);
  const { TokenFlowService, activityTypes } = loadService();
  const client = new TokenFlowService(options.target, credentials, channelOptions);
  try {
    return await COMMANDS[command](client, metadata, rest, options, activityTypes);
  } finally {
    client.close();
  }
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (error) {
  if (error instanceof SetupError) {
    console.error(`tokenflow.mjs: ${error.message}`);
    process.exitCode = 1;
  } else if (error instanceof ConfigurationError) {
    console.error(`tokenflow.mjs: ${error.message}`);
    process.exitCode = 2;
  } else if (error instanceof UsageError || error.code?.startsWith("ERR_PARSE_ARGS")) {
    console.error(`tokenflow.mjs: ${error.message}\nRun "node tokenflow.mjs --help" for usage.`);
    process.exitCode = 2;
  } else {
    throw error;
  }
}
