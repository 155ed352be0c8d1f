// The one transport of the page: gRPC-web to the service that served it (same origin,
// so no CORS), and the clients of its two services. With a caller policy, every call
// carries the caller's token, asked for when a call answers UNAUTHENTICATED and kept
// in this tab's sessionStorage only.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { RestockAdminService, RestockService, RunStatus } from "./gen/restock/v1/restock_pb";

const API_TOKEN_KEY = "restock.apiToken";

/** Sends the API token, if one was given, on every call that names no other. */
const withApiToken: Interceptor = (next) => (request) => {
  const token = sessionStorage.getItem(API_TOKEN_KEY);
  if (token && !request.header.has("authorization")) {
    request.header.set("authorization", `Bearer ${token}`);
  }
  return next(request);
};

const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  interceptors: [withApiToken],
});

/** Keeps `token` for every later call of this tab. */
export function useApiToken(token: string): void {
  sessionStorage.setItem(API_TOKEN_KEY, token.trim());
}

/** Whether a failure says the call needs credentials the page did not send. */
export function isUnauthenticated(error: unknown): boolean {
  return ConnectError.from(error).code === Code.Unauthenticated;
}

export const restock = createClient(RestockService, transport);
export const admin = createClient(RestockAdminService, transport);

// The gRPC names of the status codes, as grpcurl and the service's docs write them
// (connect-web's own names are CamelCase).
const CODE_NAMES = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
];

export function codeName(code: Code): string {
  return CODE_NAMES[code] ?? `CODE_${code}`;
}

/** `CODE: message` of any failure of a call. */
export function describe(error: unknown): string {
  const e = ConnectError.from(error);
  return `${codeName(e.code)}: ${e.rawMessage}`;
}

/** Whether a failure is the page's own abort of a call (a view moved on). */
export function isAbort(error: unknown, signal: AbortSignal): boolean {
  return signal.aborted || ConnectError.from(error).code === Code.Canceled;
}

/** `IN_PROGRESS`, `COMPLETED`, ...: the status without its enum prefix. */
export function statusName(status: RunStatus): string {
  return RunStatus[status] ?? `STATUS_${status}`;
}

/** Parses a positive id typed by the operator. */
export function parseId(raw: string): bigint | undefined {
  const text = raw.trim();
  if (!/^[0-9]{1,19}$/.test(text)) return undefined;
  const id = BigInt(text);
  return id > 0n && id <= 9223372036854775807n ? id : undefined;
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done);
  });
}
