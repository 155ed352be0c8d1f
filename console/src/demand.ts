// The demand report: ListProducts with the most users waiting first, the first page,
// read again every few seconds. A product's id follows it, as in the runs table.
import type { Product } from "./gen/restock/v1/restock_pb";
import { ProductOrder } from "./gen/restock/v1/restock_pb";
import { restock } from "./client";
import { byTestId, showError } from "./dom";

const PAGE_SIZE = 20;
const REFRESH_MS = 3000;

export class DemandTable {
  private loading = false;

  constructor(private readonly pick: (product: bigint) => void) {
    byTestId("demand-refresh").addEventListener("click", () => void this.load());
    setInterval(() => void this.load(), REFRESH_MS);
    void this.load();
  }

  async load(): Promise<void> {
    if (this.loading) return;
    this.loading = true;
    try {
      const page = await restock.listProducts({
        orderBy: ProductOrder.WAITING_DESC,
        pageSize: PAGE_SIZE,
      });
      const rows = page.products.map((p) => this.row(p));
      byTestId("demand-table").querySelector("tbody")?.replaceChildren(...rows);
    } catch (e) {
      showError("ListProducts", e);
    } finally {
      this.loading = false;
    }
  }

  private row(product: Product): HTMLTableRowElement {
    const tr = document.createElement("tr");
    tr.dataset.testid = "demand-row";
    tr.dataset.productId = product.productId.toString();
    tr.dataset.waiting = product.waiting.toString();
    const id = document.createElement("button");
    id.type = "button";
    id.className = "link";
    id.textContent = product.productId.toString();
    id.title = `Watch product ${product.productId}`;
    id.addEventListener("click", () => this.pick(product.productId));
    for (const content of [id, product.waiting.toString(), product.stock.toString(), product.restockRound.toString()]) {
      const td = document.createElement("td");
      td.append(content);
      tr.append(td);
    }
    return tr;
  }
}
