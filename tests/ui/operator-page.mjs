// Drives the operator page in headless Debian Chromium: sign in, see a real held escalation
// (with agent-supplied <script> shown as text), approve it, browse records, check the chain
// status; then a viewer sees no approve button and the API refuses the approval.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";

const { ADMIN_URL, APPROVER_KEY, VIEWER_KEY, SCREENSHOT } = process.env;
let passed = 0;
const check = (cond, msg) => { assert.ok(cond, msg); passed += 1; };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});

async function signIn(key) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("dialog", async (d) => { await d.dismiss(); throw new Error("a dialog fired: injected script ran: " + d.message()); });
  const resp = await page.goto(ADMIN_URL + "/");
  const csp = resp.headers()["content-security-policy"] || "";
  check(csp.includes("default-src 'none'") && csp.includes("script-src 'self'"), "strict CSP on the page: " + csp);
  await page.fill("#key", key);
  await page.click("#signin-form button[type=submit]");
  await page.waitForSelector("#app:not([hidden])", { timeout: 10000 });
  const cookies = await page.evaluate(() => document.cookie);
  check(!cookies.includes("uapk_session"), "the session cookie is HttpOnly (invisible to scripts)");
  const stored = await page.evaluate(() => JSON.stringify(localStorage) + JSON.stringify(sessionStorage));
  check(!stored.includes(key), "the admin key is not kept in browser storage");
  return { context, page };
}

// --- approver
{
  const { context, page } = await signIn(APPROVER_KEY);
  const row = page.locator("#approvals-table tbody tr", { hasText: "amount=60" });
  await row.waitFor({ timeout: 15000 });
  const text = await row.innerText();
  check(text.includes("ui-agent") && text.includes("payment.refund"), "the pending approval shows agent and action: " + text);
  check(text.includes("amount_requires_approval"), "the approval shows its reasons");
  check(/POST https?:\/\/[^ ]+\/v1\/refunds/.test(text), "the approval shows the method and URL: " + text);
  check(text.includes("stripe-account: acct_ui"), "the approval shows the headers it is bound to: " + text);
  check(/body: \d+ bytes, sha256 [0-9a-f]{64}/.test(text), "the approval shows the body's length and hash: " + text);
  check(text.includes("<script>alert(1)</script>"), "agent-supplied markup is shown as text: " + text);
  const injected = await page.locator("#approvals-table script").count();
  check(injected === 0, "no script element was created from agent data");
  await row.locator("button.approve").click();
  await page.waitForFunction(() => document.getElementById("action-result").textContent.includes("approved"), null, { timeout: 10000 });
  check(true, "approved from the page");
  // Records: newest first; open one and see its canonical entry.
  await page.waitForSelector("#records-table tbody tr", { timeout: 10000 });
  const rows = await page.locator("#records-table tbody tr").count();
  check(rows > 0, "the record browser lists records");
  await page.selectOption("#f-decision", "escalate");
  await page.click("#filter button[type=submit]");
  await page.waitForFunction(() => [...document.querySelectorAll("#records-table tbody tr")].every((r) => r.innerText.includes("escalate")), null, { timeout: 10000 });
  check(true, "filtering by decision works");
  await page.locator("#records-table tbody tr").first().click();
  await page.waitForSelector("#record-detail:not([hidden])");
  const entry = await page.locator("#detail-entry").innerText();
  check(entry.startsWith("{") && entry.includes("\"kind\":\"decision\""), "a record opens as its canonical entry");
  const proof = await page.locator("#detail-proof").innerText();
  check(proof.includes("uapk-gateway proof v1"), "the record shows its inclusion proof");
  const size = Number(await page.locator("#tree-size").innerText());
  check(size > 0, "chain status shows the tree size");
  check((await page.locator("#checkpoint").innerText()).includes("\u2014 "), "chain status shows the signed checkpoint");
  check((await page.locator("#key-id").innerText()).length >= 8, "chain status shows the key id");
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  await context.close();
}

// --- viewer
{
  const { context, page } = await signIn(VIEWER_KEY);
  const row = page.locator("#approvals-table tbody tr", { hasText: "amount=70" });
  await row.waitFor({ timeout: 15000 });
  check((await page.locator("button.approve").count()) === 0, "a viewer sees no approve button");
  const id = await row.getAttribute("data-id");
  const status = await page.evaluate(async (id) => {
    const s = await (await fetch("/v1/session")).json();
    const r = await fetch(`/v1/approvals/${id}/approve`, { method: "POST", headers: { "x-uapk-csrf": s.csrf, "content-type": "application/json" }, body: "{}" });
    return r.status;
  }, id);
  check(status === 403, "the API refuses a viewer's approval: " + status);
  const noCsrf = await page.evaluate(async (id) => (await fetch(`/v1/approvals/${id}/deny`, { method: "POST", body: "{}" })).status, id);
  check(noCsrf === 403, "a cookie-authenticated change without the CSRF token is refused: " + noCsrf);
  await context.close();
}

await browser.close();
console.log(`operator page: ${passed} checks passed`);
