// Small DOM helpers. Elements are found by their data-testid, the page's contract.
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { describe, isUnauthenticated } from "./client";

export function byTestId<T extends Element = HTMLElement>(id: string, root: ParentNode = document): T {
  const found = root.querySelector<T & Element>(`[data-testid="${id}"]`);
  if (!found) throw new Error(`the page has no data-testid="${id}"`);
  return found;
}

export function setText(id: string, text: string): void {
  byTestId(id).textContent = text;
}

/** Shows a failed call as `Call: CODE: message` in data-testid="error"; a call that
 *  needs credentials also shows where to give a token. */
export function showError(call: string, error: unknown): void {
  const box = byTestId("error");
  box.textContent = `${call}: ${describe(error)}`;
  box.hidden = false;
  if (isUnauthenticated(error)) byTestId("api-token-form").hidden = false;
}

export function showProblem(text: string): void {
  const box = byTestId("error");
  box.textContent = text;
  box.hidden = false;
}

export function time(ts: Timestamp | undefined): string {
  if (!ts) return "-";
  const d = timestampDate(ts);
  return d.toLocaleString(undefined, {
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
}

export function clockTime(ts: Timestamp | undefined): string {
  if (!ts) return "-";
  const d = timestampDate(ts);
  const ms = String(d.getMilliseconds()).padStart(3, "0");
  return `${d.toLocaleTimeString(undefined, { hour12: false })}.${ms}`;
}
