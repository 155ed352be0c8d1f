// The console's wiring: one product followed at a time (its latest run, its live
// notifications, the actions), and the runs of every product below. The product
// followed is kept in the address (#product=42), so a link opens it.
import { Actions } from "./actions";
import { AlertLookup } from "./alert";
import { parseId, useApiToken } from "./client";
import { DemandTable } from "./demand";
import { byTestId, showProblem } from "./dom";
import { Feed } from "./feed";
import { RunStatus } from "./gen/restock/v1/restock_pb";
import { RunView } from "./run";
import { RunsTable } from "./runs";

const input = byTestId<HTMLInputElement>("product-id");
const run = new RunView();
let followed: bigint | undefined;

const feed = new Feed((n) => {
  // A notification of a round not on screen, or of a round shown as ended (resumed),
  // means the run changed: look now instead of at the next poll.
  const shown = run.shown;
  if (!shown || n.restockRound > shown.restockRound || shown.status !== RunStatus.IN_PROGRESS) {
    run.poke();
  }
});

function follow(product: bigint): void {
  followed = product;
  input.value = product.toString();
  history.replaceState(null, "", `#product=${product}`);
  run.follow(product);
  feed.follow(product);
}

/** The product typed; following it if it is not followed yet. */
function current(): bigint | undefined {
  const product = parseId(input.value);
  if (product !== undefined && product !== followed) follow(product);
  return product;
}

new Actions(current, () => run.poke());
new RunsTable(follow);
new DemandTable(follow);
new AlertLookup(current);

document.getElementById("follow-form")?.addEventListener("submit", (event) => {
  event.preventDefault();
  const product = parseId(input.value);
  if (product === undefined) return showProblem("Watch: enter a product id, a whole number of 1 or more.");
  follow(product);
});

// The token a call asked for: kept, then the page starts again with it, every view and
// stream included.
document.getElementById("api-token-form")?.addEventListener("submit", (event) => {
  event.preventDefault();
  useApiToken(byTestId<HTMLInputElement>("api-token").value);
  window.location.reload();
});

const linked = /^#product=([0-9]+)$/.exec(window.location.hash);
const start = linked ? parseId(linked[1]) : undefined;
if (start !== undefined) follow(start);
