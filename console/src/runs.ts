// The runs table: ListRestockRuns, newest first, filtered by status, a page at a time
// (keyset pages: the service's opaque token marks where a page ended).
import { RunStatus, type RestockRun } from "./gen/restock/v1/restock_pb";
import { restock, statusName } from "./client";
import { byTestId, setText, showError, time } from "./dom";

const PAGE_SIZE = 20;
/** The page on screen is read again this often, so it stays current. */
const REFRESH_MS = 3000;

export class RunsTable {
  /** Tokens of the pages shown so far: the last is the current page's. */
  private tokens: string[] = [""];
  private next = "";
  private loading = false;

  constructor(private readonly pick: (product: bigint) => void) {
    byTestId<HTMLSelectElement>("runs-status").addEventListener("change", () => this.first());
    byTestId("runs-refresh").addEventListener("click", () => void this.load());
    byTestId("runs-first").addEventListener("click", () => this.first());
    byTestId("runs-next").addEventListener("click", () => {
      if (!this.next) return;
      this.tokens.push(this.next);
      void this.load();
    });
    setInterval(() => void this.load(), REFRESH_MS);
    void this.load();
  }

  private first(): void {
    this.tokens = [""];
    void this.load();
  }

  async load(): Promise<void> {
    if (this.loading) return;
    this.loading = true;
    const filter = byTestId<HTMLSelectElement>("runs-status").value;
    const status = filter ? RunStatus[filter as keyof typeof RunStatus] : undefined;
    try {
      const page = await restock.listRestockRuns({
        status,
        pageSize: PAGE_SIZE,
        pageToken: this.tokens[this.tokens.length - 1],
      });
      this.next = page.nextPageToken;
      byTestId("runs-table").querySelector("tbody")?.replaceChildren(...page.runs.map((r) => this.row(r)));
      byTestId<HTMLButtonElement>("runs-next").disabled = !this.next;
      byTestId<HTMLButtonElement>("runs-first").disabled = this.tokens.length === 1;
      setText("runs-page", `page ${this.tokens.length}${page.runs.length ? "" : ", no runs"}`);
    } catch (e) {
      showError("ListRestockRuns", e);
    } finally {
      this.loading = false;
    }
  }

  private row(run: RestockRun): HTMLTableRowElement {
    const status = statusName(run.status);
    const tr = document.createElement("tr");
    tr.dataset.testid = "run-row";
    tr.dataset.productId = run.productId.toString();
    tr.dataset.round = run.restockRound.toString();
    tr.dataset.status = status;
    const product = document.createElement("button");
    product.type = "button";
    product.className = "link";
    product.textContent = run.productId.toString();
    product.title = `Watch product ${run.productId}`;
    product.addEventListener("click", () => this.pick(run.productId));
    const cells: (string | Node)[] = [
      product,
      run.restockRound.toString(),
      status,
      `${run.sentCount} / ${run.queueSize}`,
      time(run.startedAt),
      run.lastError ?? "",
    ];
    for (const content of cells) {
      const td = document.createElement("td");
      td.append(content);
      tr.append(td);
    }
    tr.children[2].className = `status-cell s-${status}`;
    return tr;
  }
}
