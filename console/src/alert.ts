// The alert lookup, support's "why wasn't I told?": GetAlert for a user of the product
// followed, its place in the queue and what the latest round did with it, in words.
import { AlertOutcome, type AlertStatus } from "./gen/restock/v1/restock_pb";
import { parseId, restock } from "./client";
import { byTestId, setText, showError, showProblem, time } from "./dom";

/** What each outcome means, for the operator reading it. */
const WORDS: Record<AlertOutcome, string> = {
  [AlertOutcome.UNSPECIFIED]: "unknown",
  [AlertOutcome.NOTIFIED]: "notified in this round",
  [AlertOutcome.PENDING]: "waiting: the round has not reached this user yet",
  [AlertOutcome.NOT_REACHED]: "not reached: the round ended (sold out or failed) before this user",
  [AlertOutcome.REGISTERED_AFTER]: "registered after the round started: waits for the next round",
  [AlertOutcome.INACTIVE]: "alert cancelled before the round reached it",
};

export class AlertLookup {
  constructor(private readonly product: () => bigint | undefined) {
    document.getElementById("alert-form")?.addEventListener("submit", (event) => {
      event.preventDefault();
      void this.lookUp();
    });
  }

  private async lookUp(): Promise<void> {
    const product = this.product();
    const user = parseId(byTestId<HTMLInputElement>("alert-user-id").value);
    if (product === undefined || user === undefined) {
      return showProblem("Look up: enter a product id and a user id (1 or more).");
    }
    try {
      this.show(await restock.getAlert({ productId: product, userId: user }));
    } catch (e) {
      showError("GetAlert", e);
    }
  }

  private show(status: AlertStatus): void {
    setText("alert-position", status.position.toString());
    setText("alert-ahead", status.usersAhead.toString());
    const last = status.lastNotifiedRound;
    setText("alert-last", last === undefined ? "never" : `round ${last}, ${time(status.lastNotifiedAt)}`);
    const outcome = byTestId("alert-outcome");
    const latest = status.latestRound;
    const value = latest ? latest.outcome : AlertOutcome.UNSPECIFIED;
    outcome.dataset.outcome = `ALERT_OUTCOME_${AlertOutcome[value]}`;
    outcome.textContent = latest ? `Round ${latest.restockRound}: ${WORDS[value]}` : "No round yet";
  }
}
