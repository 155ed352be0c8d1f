// One product's latest run, live: WatchRestockRun while it is in progress, and then
// the product keeps being followed, so a resumed run, a new round, or the first run of
// a product that had none shows up without pressing Watch again.
import { Code, ConnectError } from "@connectrpc/connect";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { RunStatus, type RestockRun } from "./gen/restock/v1/restock_pb";
import { describe, isAbort, restock, statusName } from "./client";
import { byTestId, setText, showError, time } from "./dom";

/** How often a finished or missing run is looked at again: a change shows within it. */
const POLL_MS = 1000;
/** How long a watch that failed waits before it is made again. */
const RETRY_MS = 2000;
/** The window of the sends-per-second figure. */
const RATE_WINDOW_MS = 10_000;
/** Seconds in the chart. */
const CHART_SECONDS = 60;

interface Sample {
  at: number;
  sent: number;
}

export class RunView {
  private abort?: AbortController;
  private wake?: () => void;
  private current?: RestockRun;
  /** sent_count as seen over the last minute, oldest first. */
  private samples: Sample[] = [];
  /** Sends counted in each second (Unix second -> sends), for the chart. */
  private perSecond = new Map<number, number>();

  constructor() {
    // The chart and the rate move on between updates (and fall to 0 once a run ends).
    setInterval(() => this.tick(), 1000);
  }

  /** The run on screen, if any. */
  get shown(): RestockRun | undefined {
    return this.current;
  }

  follow(product: bigint): void {
    this.abort?.abort();
    const abort = new AbortController();
    this.abort = abort;
    this.current = undefined;
    this.resetRate();
    this.clear(product);
    void this.loop(product, abort.signal);
  }

  /** Looks at the product's latest run now: an action or the feed says it changed. */
  poke(): void {
    this.wake?.();
  }

  private async loop(product: bigint, signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      try {
        for await (const run of restock.watchRestockRun({ productId: product }, { signal })) {
          this.render(run);
        }
        // The stream ends OK once the run is final; follow the product on.
        await this.untilChanged(product, signal);
      } catch (e) {
        if (isAbort(e, signal)) return;
        if (ConnectError.from(e).code === Code.NotFound) {
          this.note("No run of this product yet: its first run shows here when it starts.");
          await this.untilChanged(product, signal);
        } else {
          showError("WatchRestockRun", e);
          this.note(`The watch ended with ${describe(e)}; watching again.`);
          await this.pause(RETRY_MS, signal);
        }
      }
    }
  }

  /** Waits until the product's latest run is not the one shown: a new round, this round
   *  resumed, or a first run. */
  private async untilChanged(product: bigint, signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      await this.pause(POLL_MS, signal);
      if (signal.aborted) return;
      try {
        const run = await restock.getRestockRun({ productId: product }, { signal });
        const shown = this.current;
        if (!shown || run.restockRound !== shown.restockRound || run.status !== shown.status) {
          return;
        }
      } catch (e) {
        if (isAbort(e, signal)) return;
        if (ConnectError.from(e).code !== Code.NotFound) showError("GetRestockRun", e);
      }
    }
  }

  private pause(ms: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(finish, ms);
      signal.addEventListener("abort", finish);
      this.wake = finish;
      function finish() {
        clearTimeout(timer);
        signal.removeEventListener("abort", finish);
        resolve();
      }
    });
  }

  private render(run: RestockRun): void {
    if (!this.current || this.current.restockRound !== run.restockRound) this.resetRate();
    this.current = run;
    const status = statusName(run.status);
    const sent = Number(run.sentCount);
    const queue = Number(run.queueSize);
    const final = run.status !== RunStatus.IN_PROGRESS;
    const statusBox = byTestId("run-status");
    statusBox.textContent = status;
    statusBox.dataset.status = status;
    setText("run-title", `product ${run.productId}, round ${run.restockRound}`);
    setText("run-round", run.restockRound.toString());
    setText("run-sent", String(sent));
    setText("run-queue-size", String(queue));
    // Registrations made during the run are notified too: the bar never overflows.
    const max = Math.max(queue, sent);
    const bar = byTestId("run-progress");
    bar.setAttribute("aria-valuenow", String(sent));
    bar.setAttribute("aria-valuemax", String(max));
    bar.dataset.status = status;
    const fill = bar.firstElementChild as HTMLElement;
    fill.style.width = max > 0 ? `${((100 * sent) / max).toFixed(2)}%` : final ? "100%" : "0%";
    setText("run-started", time(run.startedAt));
    setText("run-updated", time(run.updatedAt));
    setText(
      "run-wave",
      run.wave
        ? `${run.wave.perUnit} per unit in stock, every ${Number(run.wave.interval?.seconds ?? 0n)} s`
        : "no",
    );
    this.showNextWave();
    setText("run-last-error", run.lastError ?? "-");
    this.note(
      final
        ? `Round ${run.restockRound} ended ${status}. Still following the product: a resumed run or a new round shows here.`
        : `Following round ${run.restockRound} live.`,
    );
    this.sample(sent);
    this.drawRate();
  }

  private showNextWave(): void {
    const at = this.current?.nextWaveAt;
    if (!at || this.current?.status !== RunStatus.IN_PROGRESS) {
      setText("run-next-wave", "-");
      return;
    }
    const seconds = Math.max(0, Math.round((timestampDate(at).getTime() - Date.now()) / 1000));
    setText("run-next-wave", `${time(at)} (in ${seconds} s)`);
  }

  private clear(product: bigint): void {
    const statusBox = byTestId("run-status");
    statusBox.textContent = "-";
    delete statusBox.dataset.status;
    setText("run-title", `product ${product}`);
    for (const id of ["run-round", "run-started", "run-updated", "run-wave", "run-next-wave", "run-last-error"]) {
      setText(id, "-");
    }
    setText("run-sent", "0");
    setText("run-queue-size", "0");
    const bar = byTestId("run-progress");
    bar.setAttribute("aria-valuenow", "0");
    bar.setAttribute("aria-valuemax", "0");
    (bar.firstElementChild as HTMLElement).style.width = "0%";
    this.note(`Looking for the latest run of product ${product}...`);
    this.drawRate();
  }

  private note(text: string): void {
    setText("run-note", text);
  }

  private resetRate(): void {
    this.samples = [];
    this.perSecond.clear();
  }

  private tick(): void {
    if (!this.current) return;
    this.sample(Number(this.current.sentCount));
    this.drawRate();
    this.showNextWave();
  }

  private sample(sent: number): void {
    const at = Date.now();
    const last = this.samples[this.samples.length - 1];
    if (last && sent > last.sent) this.spread(sent - last.sent, last.at, at);
    this.samples.push({ at, sent });
    const oldest = at - CHART_SECONDS * 1000;
    while (this.samples.length > 2 && this.samples[0].at < oldest) this.samples.shift();
    const first = Math.floor(oldest / 1000);
    for (const second of this.perSecond.keys()) if (second < first) this.perSecond.delete(second);
  }

  /** Counts `sends` made between two updates in the seconds they span, evenly: the
   *  updates come about once a second, not on the second. */
  private spread(sends: number, from: number, to: number): void {
    let at = from;
    while (at < to) {
      const second = Math.floor(at / 1000);
      const end = Math.min(to, (second + 1) * 1000);
      const share = (sends * (end - at)) / (to - from);
      this.perSecond.set(second, (this.perSecond.get(second) ?? 0) + share);
      at = end;
    }
  }

  /** Sends per second over the last RATE_WINDOW_MS, and the chart of the last minute. */
  private drawRate(): void {
    const last = this.samples[this.samples.length - 1];
    const from = last && this.samples.find((s) => s.at >= last.at - RATE_WINDOW_MS);
    const rate =
      last && from && last.at > from.at ? ((last.sent - from.sent) * 1000) / (last.at - from.at) : 0;
    setText("run-rate", rate.toFixed(rate >= 100 ? 0 : 1));

    const svg = byTestId<SVGSVGElement>("run-chart");
    const now = Math.floor(Date.now() / 1000);
    const counts: number[] = [];
    for (let s = now - CHART_SECONDS + 1; s <= now; s++) counts.push(this.perSecond.get(s) ?? 0);
    const top = Math.max(1, ...counts);
    const width = 600 / CHART_SECONDS;
    const ns = "http://www.w3.org/2000/svg";
    const bars = counts.map((count, i) => {
      const height = (58 * count) / top;
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", (i * width + 1).toFixed(1));
      rect.setAttribute("y", (60 - height).toFixed(1));
      rect.setAttribute("width", (width - 2).toFixed(1));
      rect.setAttribute("height", height.toFixed(1));
      return rect;
    });
    svg.replaceChildren(...bars);
    setText("run-chart-peak", `peak ${Math.round(top)}/s`);
  }
}
