// The product's live notifications (Subscribe), newest first, the latest KEEP of them.
// A stream the service ends (a lagging reader, a shutdown) or that fails is made again
// with resume_after = the last notification shown, so nothing is missed, and the page
// says so.
import type { Notification } from "./gen/restock/v1/restock_pb";
import { describe, isAbort, restock, sleep } from "./client";
import { byTestId, clockTime, setText, showError } from "./dom";

/** Notifications kept on screen. */
const KEEP = 1000;
/** Notifications are put on screen in batches, at most this often. */
const FLUSH_MS = 50;
/** Waits before subscribing again after a failure, doubling up to the last one. */
const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000];

export class Feed {
  private abort?: AbortController;
  private pending: Notification[] = [];
  private flushing = false;
  private received = 0;

  constructor(private readonly seen: (notification: Notification) => void) {}

  follow(product: bigint): void {
    this.abort?.abort();
    const abort = new AbortController();
    this.abort = abort;
    this.pending = [];
    this.received = 0;
    byTestId("feed").replaceChildren();
    this.count();
    void this.loop(product, abort.signal);
  }

  private async loop(product: bigint, signal: AbortSignal): Promise<void> {
    let resumeAfter: string | undefined;
    let failures = 0;
    this.status(`Live notifications of product ${product}.`);
    while (!signal.aborted) {
      try {
        for await (const n of restock.subscribe({ productId: product, resumeAfter }, { signal })) {
          resumeAfter = n.notificationId;
          failures = 0;
          this.push(n);
        }
        if (signal.aborted) return;
        this.status(`The service ended the stream; subscribed again${after(resumeAfter)}.`);
      } catch (e) {
        if (isAbort(e, signal)) return;
        showError("Subscribe", e);
        this.status(`The stream ended with ${describe(e)}; subscribed again${after(resumeAfter)}.`);
        await sleep(BACKOFF_MS[Math.min(failures, BACKOFF_MS.length - 1)], signal);
        failures++;
      }
    }
  }

  private push(n: Notification): void {
    this.received++;
    this.pending.push(n);
    // A hidden tab flushes rarely: never hold more than is shown.
    if (this.pending.length > KEEP) this.pending.splice(0, this.pending.length - KEEP);
    this.seen(n);
    if (!this.flushing) {
      this.flushing = true;
      setTimeout(() => this.flush(), FLUSH_MS);
    }
  }

  private flush(): void {
    this.flushing = false;
    const batch = this.pending;
    this.pending = [];
    const list = byTestId("feed");
    const items = document.createDocumentFragment();
    for (let i = batch.length - 1; i >= 0; i--) items.append(item(batch[i]));
    list.prepend(items);
    while (list.childElementCount > KEEP) list.lastElementChild?.remove();
    this.count();
  }

  private count(): void {
    const shown = byTestId("feed").childElementCount;
    setText("feed-count", this.received ? `${this.received} received, ${shown} shown` : "");
  }

  private status(text: string): void {
    setText("feed-status", text);
  }
}

function after(resumeAfter: string | undefined): string {
  return resumeAfter ? ` with resume_after = ${resumeAfter}` : " (nothing received yet)";
}

function item(n: Notification): HTMLLIElement {
  const li = document.createElement("li");
  li.dataset.testid = "feed-item";
  li.dataset.userId = n.userId.toString();
  li.dataset.notificationId = n.notificationId;
  li.dataset.round = n.restockRound.toString();
  const user = document.createElement("span");
  user.className = "user";
  user.textContent = `user ${n.userId}`;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `round ${n.restockRound} · ${n.notificationId} · ${clockTime(n.sentAt)}`;
  li.append(user, meta);
  return li;
}
