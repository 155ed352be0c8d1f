// What an operator does to the product: set its stock, trigger a restock (optionally in
// waves), resume a failed run with the admin token. The token is kept in this tab's
// sessionStorage only: gone when the tab closes, never sent anywhere but the service.
import type { RestockRun } from "./gen/restock/v1/restock_pb";
import { admin, restock, statusName } from "./client";
import { byTestId, setText, showError, showProblem } from "./dom";

const TOKEN_KEY = "restock.adminToken";

export class Actions {
  constructor(
    /** The product the actions apply to (the one typed and followed), if valid. */
    private readonly product: () => bigint | undefined,
    /** Called after an action changed the product's run. */
    private readonly changed: () => void,
  ) {
    const token = byTestId<HTMLInputElement>("admin-token");
    token.value = sessionStorage.getItem(TOKEN_KEY) ?? "";
    token.addEventListener("input", () => sessionStorage.setItem(TOKEN_KEY, token.value));
    submit("stock-form", () => this.setStock());
    submit("trigger-form", () => this.trigger());
    submit("resume-form", () => this.resume());
  }

  private async setStock(): Promise<void> {
    const product = this.product();
    const raw = byTestId<HTMLInputElement>("stock").value.trim();
    if (product === undefined || !/^[0-9]{1,18}$/.test(raw)) {
      return showProblem("Set stock: enter a product id (1 or more) and a stock (0 or more).");
    }
    try {
      const p = await restock.setStock({ productId: product, stock: BigInt(raw) });
      done(`Product ${p.productId}: stock ${p.stock} (round ${p.restockRound}).`);
      this.changed();
    } catch (e) {
      showError("SetStock", e);
    }
  }

  private async trigger(): Promise<void> {
    const product = this.product();
    if (product === undefined) return showProblem("Trigger: enter a product id (1 or more).");
    const perUnit = byTestId<HTMLInputElement>("wave-per-unit").value.trim();
    const interval = byTestId<HTMLInputElement>("wave-interval").value.trim();
    if ((perUnit === "") !== (interval === "")) {
      return showProblem("Trigger: waves need both users per unit and an interval (or neither).");
    }
    const wave =
      perUnit === ""
        ? undefined
        : { perUnit: Number(perUnit), interval: { seconds: BigInt(Math.trunc(Number(interval))) } };
    try {
      const run = await restock.triggerRestock({ productId: product, wave });
      done(`Triggered: ${describeRun(run)}.`);
      this.changed();
    } catch (e) {
      showError("TriggerRestock", e);
    }
  }

  private async resume(): Promise<void> {
    const product = this.product();
    if (product === undefined) return showProblem("Resume: enter a product id (1 or more).");
    // The admin token if one is typed; otherwise the API token, if the caller it names
    // has the admin role.
    const token = byTestId<HTMLInputElement>("admin-token").value;
    const headers = token ? { authorization: `Bearer ${token}` } : undefined;
    try {
      const run = await admin.manualRestock({ productId: product }, { headers });
      done(`Resumed: ${describeRun(run)}.`);
      this.changed();
    } catch (e) {
      showError("ManualRestock", e);
    }
  }
}

function describeRun(run: RestockRun): string {
  return `product ${run.productId}, round ${run.restockRound}, ${statusName(run.status)}`;
}

/** Shows an action's outcome; the last error, now dealt with, goes away. */
function done(text: string): void {
  setText("action-result", text);
  byTestId("error").hidden = true;
}

function submit(form: string, action: () => Promise<void>): void {
  const element = document.getElementById(form) as HTMLFormElement;
  element.addEventListener("submit", (event) => {
    event.preventDefault();
    void action();
  });
}
