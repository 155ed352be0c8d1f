// Browser tests of the console: headless Chromium (Debian's, driven by playwright-core)
// against the real service. The Rust test `tests/console/browser.rs` starts the
// binary, prepares the data and runs one scenario:
//
//   cd console && node tests/console.mjs <scenario> <url> '<json parameters>'
//
// Elements are found by data-testid only. Exits 0 when every check passed; otherwise
// prints what failed (with a screenshot of the page then) and exits 1.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [scenario, url, rawParams] = process.argv.slice(2);
const params = JSON.parse(rawParams ?? "{}");
const shots = params.screenshots;
if (shots) mkdirSync(shots, { recursive: true });

/** How long one expectation may take to come true. */
const PATIENCE_MS = Number(process.env.CONSOLE_TEST_PATIENCE_MS ?? 60_000);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
// A service over TLS has a certificate from the test's own CA, which Chromium does not
// know; what these tests check is the page and its calls over TLS, not the CA.
const contextOptions = {
  viewport: { width: 1280, height: 900 },
  ignoreHTTPSErrors: url.startsWith("https:"),
};
const context = await browser.newContext(contextOptions);
// Room for every request of a scenario in the page's resource timings (250 by default).
await context.addInitScript(() => performance.setResourceTimingBufferSize(100_000));
const page = await context.newPage();
const pageErrors = [];
// Uncaught exceptions of the page's own code. (Not console messages: Chromium logs
// every 404 there, the one the page with the console off is expected to get.)
page.on("pageerror", (e) => pageErrors.push(String(e)));

const id = (testId) => page.getByTestId(testId);

function fail(message) {
  throw new Error(message);
}

/** Waits until `check` returns a truthy value (polling the page), and returns it. */
async function until(what, check) {
  const deadline = Date.now() + PATIENCE_MS;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) fail(`timed out waiting for ${what} (last: ${last})`);
    await page.waitForTimeout(100);
  }
}

const text = async (testId) => ((await id(testId).textContent()) ?? "").trim();

async function progress() {
  const bar = id("run-progress");
  return {
    now: Number(await bar.getAttribute("aria-valuenow")),
    max: Number(await bar.getAttribute("aria-valuemax")),
  };
}

async function shot(name, options = {}) {
  if (!shots) return;
  await page.screenshot({ path: join(shots, `${name}.png`), ...options });
  console.log(`screenshot ${join(shots, `${name}.png`)}`);
}

async function watch(product) {
  await id("product-id").fill(String(product));
  await id("watch").click();
}

/** Every data-user-id in the feed, top (newest) first. */
async function feedUsers() {
  return id("feed-item").evaluateAll((items) => items.map((li) => Number(li.dataset.userId)));
}

async function waitForStatus(status) {
  await until(`run-status ${status}`, async () => (await text("run-status")) === status);
}

/** Asks the test driving this script to do `what` (a restart), and waits until it is
 *  done: one line out on stdout, one line back on stdin. */
async function handOff(what) {
  console.log(`HANDOFF ${what}`);
  const line = await new Promise((resolve) => {
    process.stdin.once("data", (data) => resolve(String(data).trim()));
  });
  if (line !== "done") fail(`the test answered ${line} to ${what}`);
}

function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

const scenarios = {
  // A product with users and no run yet: watched before anything happens, then stock
  // set and a restock triggered from the page; its first run shows up by itself, goes
  // to COMPLETED with the bar at queue_size, and the feed shows every notification.
  // Then a run that fails is resumed with the admin token (a wrong one first), a wave
  // run shows its next wave, and the runs table lists and filters them.
  async operate({ product, users, failing, failingUsers, waves, waveUsers, token }) {
    const response = await page.goto(url);
    if (response?.status() !== 200) fail(`GET / answered ${response?.status()}`);

    await watch(product);
    await until("the note that no run exists yet", async () => (await text("run-note")).includes("No run"));

    await id("stock").fill("5");
    await id("set-stock").click();
    await until("SetStock's result", async () => (await text("action-result")).includes("stock 5"));
    await id("trigger").click();

    // The first run of a product that had none, shown without pressing Watch again.
    await waitForStatus("IN_PROGRESS");
    await until("sends under way", async () => Number(await text("run-sent")) >= users.length / 3);
    await shot("run-in-progress");
    await waitForStatus("COMPLETED");
    const done = await progress();
    if (done.now !== users.length || done.max !== users.length) {
      fail(`the bar of a completed run is ${done.now}/${done.max}, expected ${users.length}/${users.length}`);
    }
    if (Number(await text("run-queue-size")) !== users.length) fail("run-queue-size is not the queue");
    if (Number(await text("run-sent")) !== users.length) fail("run-sent is not every user");

    // Newest first: the reverse of registration order (G1), every user once.
    const expected = [...users].reverse();
    await until("every notification in the feed", async () => (await id("feed-item").count()) === users.length);
    const shown = await feedUsers();
    if (!same(shown, expected)) fail(`the feed shows ${shown.slice(0, 10)}..., expected ${expected.slice(0, 10)}...`);
    await shot("run-completed", { fullPage: true });

    // A run that fails (the database refuses one user) and is resumed.
    await watch(failing);
    await until("the note that no run exists yet", async () => (await text("run-note")).includes("No run"));
    await id("trigger").click();
    await waitForStatus("CANCELED_BY_ERROR");
    if ((await text("run-last-error")) === "-") fail("a failed run shows no last_error");
    const stopped = await progress();
    if (stopped.now >= failingUsers || stopped.max !== failingUsers) {
      fail(`the bar of the failed run is ${stopped.now}/${stopped.max} of ${failingUsers}`);
    }
    await id("admin-token").fill("not-the-token");
    await id("manual-restock").click();
    await until("UNAUTHENTICATED in the error box", async () => (await text("error")).includes("UNAUTHENTICATED"));
    await shot("failed-run-wrong-token");
    await id("admin-token").fill(token);
    await id("manual-restock").click();
    // The resumed run shows up without pressing Watch, and finishes.
    await waitForStatus("COMPLETED");
    const resumed = await progress();
    if (resumed.now !== failingUsers || resumed.max !== failingUsers) {
      fail(`the resumed run ended at ${resumed.now}/${resumed.max}, expected ${failingUsers}`);
    }
    const stored = await page.evaluate(() => sessionStorage.getItem("restock.adminToken"));
    if (stored !== token) fail("the admin token is not kept in sessionStorage");
    const kept = await page.evaluate(() => localStorage.length);
    if (kept !== 0) fail("the page wrote to localStorage");

    // Waves: stock 1 and 2 users per unit notify 2 users, then wait for the next wave.
    await watch(waves);
    await id("stock").fill("1");
    await id("set-stock").click();
    await until("SetStock's result", async () => (await text("action-result")).includes("stock 1"));
    await id("wave-per-unit").fill("2");
    await id("wave-interval").fill("3600");
    await id("trigger").click();
    await until("the first wave sent, and the next one due", async () => {
      return (await text("run-next-wave")) !== "-" && Number(await text("run-sent")) === 2;
    });
    if ((await text("run-status")) !== "IN_PROGRESS") fail("a waiting wave run is not IN_PROGRESS");
    if (Number(await text("run-queue-size")) !== waveUsers) fail("the wave run's queue_size is wrong");

    // The runs table: all three runs, then only the completed ones.
    await id("runs-refresh").click();
    const row = (p) => page.locator(`[data-testid="run-row"][data-product-id="${p}"][data-round="1"]`);
    await until("the completed runs listed", async () => {
      return (
        (await row(product).getAttribute("data-status")) === "COMPLETED" &&
        (await row(failing).getAttribute("data-status")) === "COMPLETED" &&
        (await row(waves).getAttribute("data-status")) === "IN_PROGRESS"
      );
    });
    await id("runs-status").selectOption("COMPLETED");
    await until("only completed runs listed", async () => {
      const statuses = await id("run-row").evaluateAll((rows) => rows.map((r) => r.dataset.status));
      return statuses.length === 2 && statuses.every((s) => s === "COMPLETED");
    });
    await shot("runs", { fullPage: true });

    // A phone's screen: one column, nothing wider than the screen.
    await page.setViewportSize({ width: 390, height: 844 });
    await watch(product);
    await waitForStatus("COMPLETED");
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (overflow > 0) fail(`on a phone the page is ${overflow}px wider than the screen`);
    await shot("phone", { fullPage: true });
  },

  // The feed and the run across a restart of the service: the service ends the
  // stream (UNAVAILABLE, shutting down), the page subscribes again with resume_after
  // and says so, and ends up with every notification exactly once, in order; the run,
  // continued by the restarted service, is followed to COMPLETED without a click.
  async resume({ product, users }) {
    await page.goto(url);
    await watch(product);
    await until("the note that no run exists yet", async () => (await text("run-note")).includes("No run"));
    await id("trigger").click();
    await until("some notifications", async () => (await id("feed-item").count()) >= 10);
    await handOff("restart");
    await until("the feed saying it resumed", async () => (await text("feed-status")).includes("resume_after"));
    await waitForStatus("COMPLETED");
    await until("every notification in the feed", async () => (await id("feed-item").count()) >= users.length);
    const shown = await feedUsers();
    const expected = [...users].reverse();
    if (!same(shown, expected)) fail(`after the restart the feed shows ${shown.slice(0, 10)}..., expected ${expected.slice(0, 10)}...`);
    console.log(`feed status: ${await text("feed-status")}`);
    if (url.startsWith("https:")) {
      // Over TLS the browser speaks HTTP/2: the page and every call used it.
      const protocols = await page.evaluate(() =>
        [...performance.getEntriesByType("navigation"), ...performance.getEntriesByType("resource")].map(
          (e) => `${e.nextHopProtocol} ${e.name}`,
        ),
      );
      const other = protocols.filter((p) => !p.startsWith("h2 "));
      if (protocols.length === 0 || other.length) fail(`over TLS, not HTTP/2: ${other.join(", ")}`);
      console.log(`over TLS: ${protocols.length} requests, all HTTP/2`);
    }
    await shot("resumed-feed");
  },

  // Not a check: how long the page takes to load and to show the service's data
  // (its first ListRestockRuns answered; with `product`, that product's run), in a
  // fresh browser context (nothing cached), best of `times`. Prints one JSON line.
  async timing({ product, times = 5 }) {
    const runs = [];
    for (let i = 0; i < times; i++) {
      const fresh = await browser.newContext(contextOptions);
      const tab = await fresh.newPage();
      const started = Date.now();
      await tab.goto(product ? `${url}#product=${product}` : url);
      await tab.getByTestId("runs-page").filter({ hasText: "page" }).waitFor();
      if (product) await tab.locator('[data-testid="run-status"][data-status]').waitFor();
      const shown = Date.now() - started;
      const nav = await tab.evaluate(() => {
        const [entry] = performance.getEntriesByType("navigation");
        return { domContentLoaded: entry.domContentLoadedEventEnd, load: entry.loadEventEnd };
      });
      runs.push({ ...nav, dataShown: shown });
      await fresh.close();
    }
    const best = (key) => Math.min(...runs.map((r) => r[key]));
    console.log(
      JSON.stringify({
        domContentLoadedMs: best("domContentLoaded"),
        loadMs: best("load"),
        dataShownMs: best("dataShown"),
        runs,
      }),
    );
  },

  // A service with a caller policy: the page's first calls answer UNAUTHENTICATED and
  // the token field shows; with a reader's token the page works, the feed included,
  // and setting the stock is refused PERMISSION_DENIED, naming the role it needs.
  async token({ product, reader }) {
    const response = await page.goto(`${url}#product=${product}`);
    if (response?.status() !== 200) fail(`GET / answered ${response?.status()}`);
    await until("the token field", async () => await id("api-token").isVisible());
    await until("UNAUTHENTICATED shown", async () => (await text("error")).includes("UNAUTHENTICATED"));
    await shot("token-asked");

    await id("api-token").fill(reader);
    await id("api-token-use").click();
    await until("the run shown with the token", async () => (await text("run-status")) === "COMPLETED");
    await until("the feed subscribed", async () => !(await text("feed-status")).includes("Not subscribed"));
    if (await id("error").isVisible()) fail(`an error with the token: ${await text("error")}`);
    if (await id("api-token").isVisible()) fail("the token field still shows");

    await id("stock").fill("3");
    await id("set-stock").click();
    await until("PERMISSION_DENIED naming the role", async () => {
      const error = await text("error");
      return error.includes("PERMISSION_DENIED") && error.includes("write");
    });
    await shot("token-denied");
  },

  // The demand report lists the products with the most users waiting first, and the
  // alert lookup says, in words and as the enum value, what the latest round did with
  // a user, and where the user stands.
  async demand({ product, expected, notified, after }) {
    const response = await page.goto(`${url}#product=${product}`);
    if (response?.status() !== 200) fail(`GET / answered ${response?.status()}`);
    await until("the demand report, most waiting first", async () => {
      const rows = await id("demand-row").evaluateAll((trs) =>
        trs.map((tr) => [Number(tr.dataset.productId), Number(tr.dataset.waiting)]),
      );
      return same(rows, expected);
    });
    await shot("demand");

    const lookUp = async (user, outcome, position) => {
      await id("alert-user-id").fill(String(user));
      await id("alert-lookup").click();
      await until(`user ${user}: ${outcome}`, async () => {
        const shown = await id("alert-outcome").getAttribute("data-outcome");
        return shown === outcome && (await text("alert-position")) === String(position);
      });
      const words = await text("alert-outcome");
      if (!words.startsWith("Round ")) fail(`the outcome is not in words: ${words}`);
    };
    await lookUp(notified, "ALERT_OUTCOME_NOTIFIED", 1);
    await lookUp(after.user, "ALERT_OUTCOME_REGISTERED_AFTER", after.position);
    await shot("alert-lookup");
  },

  // The service started with RESTOCK_CONSOLE=off serves no page.
  async off() {
    const response = await page.goto(url);
    if (response?.status() !== 404) fail(`GET / answered ${response?.status()} with the console off`);
    if ((await id("product-id").count()) !== 0) fail("a page was served with the console off");
  },
};

const run = scenarios[scenario];
let failed = false;
try {
  if (!run) fail(`no scenario ${scenario}; one of ${Object.keys(scenarios).join(", ")}`);
  const started = Date.now();
  await run(params);
  if (pageErrors.length) fail(`the page logged errors: ${pageErrors.join(" | ")}`);
  console.log(`scenario ${scenario} passed in ${Date.now() - started} ms`);
} catch (e) {
  failed = true;
  console.error(`scenario ${scenario} failed: ${e?.stack ?? e}`);
  if (pageErrors.length) console.error(`page errors: ${pageErrors.join(" | ")}`);
  try {
    console.error(`error box: ${await text("error")}`);
    console.error(`run: ${await text("run-status")} ${await text("run-sent")}/${await text("run-queue-size")}`);
    if (shots) await page.screenshot({ path: join(shots, `failure-${scenario}.png`), fullPage: true });
  } catch {
    // The page itself may be what failed.
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
