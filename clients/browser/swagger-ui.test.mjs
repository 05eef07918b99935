// Swagger UI in a real browser: Debian's Chromium (headless), driven by playwright-core, against a
// live OATS server (OATS_URL, OATS_TOKEN). Does what a person does: opens /docs, clicks
// Authorize and enters the token, expands POST /api/v1/jobs, clicks "Try it out", fills a body,
// clicks Execute, and waits for the live response to show 201; then reads the job id from the
// response body and checks over plain HTTP that the job exists. Also asserts that the page asked
// no host but 127.0.0.1 for anything (Swagger UI's assets are served by the binary) and threw no
// script error. Saves a screenshot to $OATS_ARTIFACTS_DIR/swagger-ui.png (default
// target/artifacts). Exits non-zero on any failure.
import { mkdir } from "node:fs/promises";
import path from "node:path";
import { chromium } from "playwright-core";

const baseUrl = process.env.OATS_URL;
const token = process.env.OATS_TOKEN;
if (!baseUrl || !token) {
  console.error("swagger-ui.test: set OATS_URL and OATS_TOKEN");
  process.exit(2);
}
const executablePath = process.env.OATS_CHROMIUM || "/usr/bin/chromium";
const artifacts = path.resolve(process.env.OATS_ARTIFACTS_DIR || "target/artifacts");
const screenshot = path.join(artifacts, "swagger-ui.png");
const goal = "from swagger";
const timeout = 30_000;

let steps = 0;
const ok = (what) => console.log(`ok ${++steps} - ${what}`);
function expect(condition, what) {
  if (!condition) throw new Error(`mismatch: ${what}`);
}

const offHost = [];
const pageErrors = [];
const browser = await chromium.launch({ executablePath, headless: true, timeout });
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1000 } });
  // Every request of the page, service workers included, goes through here: anything not for
  // 127.0.0.1 (or an inline data:/blob: URL) is recorded and refused, so it never leaves the machine.
  await context.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if (url.protocol === "data:" || url.protocol === "blob:" || url.hostname === "127.0.0.1") return route.continue();
    offHost.push(route.request().url());
    return route.abort("blockedbyclient");
  });
  context.on("weberror", (error) => pageErrors.push(String(error.error())));
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on("websocket", (ws) => {
    if (new URL(ws.url()).hostname !== "127.0.0.1") offHost.push(ws.url());
  });

  // 1. The page, rendered from the binary.
  const docs = await page.goto(`${baseUrl}/docs`);
  expect(docs?.status() === 200, `GET /docs answered ${docs?.status()}`);
  await page.locator(".swagger-ui .info .title").filter({ hasText: "OATS" }).waitFor();
  ok("GET /docs: Swagger UI rendered the OATS spec");

  // 2. Authorize with the bearer token.
  await page.locator(".scheme-container button.authorize").click();
  const modal = page.locator(".modal-ux");
  await modal.waitFor();
  await modal.locator(".auth-container").filter({ hasText: "BearerToken" }).locator("input").fill(token);
  await modal.locator("button.authorize").click();
  await modal.locator("button", { hasText: "Logout" }).waitFor();
  await modal.locator("button", { hasText: "Close" }).click();
  await modal.waitFor({ state: "detached" });
  ok("Authorize: BearerToken accepted by the dialog");

  // 3. POST /api/v1/jobs: expand, Try it out, body, Execute.
  const op = page.locator("#operations-Jobs-createJob");
  await op.locator(".opblock-summary").first().click();
  await op.locator("button.try-out__btn").click();
  const body = op.locator("textarea.body-param__text");
  await body.fill(JSON.stringify({ goal, max_turns: 2 }, null, 2));
  ok("POST /api/v1/jobs: expanded, Try it out, body filled");
  await op.locator("button.execute").click();

  // 4. The live response: status 201 and a Job body.
  const live = op.locator(".live-responses-table .response").first();
  await live.locator(".response-col_status").waitFor();
  const status = (await live.locator(".response-col_status").innerText()).trim();
  expect(status === "201", `live response status ${JSON.stringify(status)}, expected 201`);
  const text = await live.locator(".response-col_description pre").first().innerText();
  const job = JSON.parse(text);
  expect(/^job-[a-z2-7]{20}$/.test(job.id), `job id in the response body: ${JSON.stringify(job.id)}`);
  expect(job.goal === goal && job.max_turns === 2, `response body echoes the request: ${text}`);
  ok(`Execute: live response 201 with job ${job.id}`);

  // 5. The job exists, seen with the token over plain HTTP.
  const check = await fetch(`${baseUrl}/api/v1/jobs/${job.id}`, { headers: { Authorization: `Bearer ${token}` } });
  expect(check.status === 200, `GET /api/v1/jobs/${job.id} answered ${check.status}`);
  const fetched = await check.json();
  expect(fetched.id === job.id && fetched.goal === goal, `GET returned ${JSON.stringify(fetched)}`);
  ok(`GET /api/v1/jobs/${job.id}: 200, status ${fetched.status}`);

  // 6. Screenshot from the request body to the live response (201 and its body). The curl
  //    command shows the token, so it is masked (the token dies with the server anyway).
  const pageY = (el) => {
    const box = el.getBoundingClientRect();
    return { top: box.top + window.scrollY, bottom: box.bottom + window.scrollY };
  };
  const top = (await op.locator(".opblock-section-request-body").evaluate(pageY)).top - 8;
  const bottom = (await op.locator(".live-responses-table").evaluate(pageY)).bottom + 8;
  await mkdir(artifacts, { recursive: true });
  await page.screenshot({
    path: screenshot,
    fullPage: true,
    clip: { x: 0, y: top, width: 1280, height: bottom - top },
    mask: [op.locator(".curl-command")],
    maskColor: "#3b4151",
  });
  ok(`screenshot: ${screenshot}`);

  // 7. Nothing was asked of another host, and no script failed.
  expect(offHost.length === 0, `the page made requests to other hosts: ${offHost.join(", ")}`);
  ok("every request of the page went to 127.0.0.1");
  expect(pageErrors.length === 0, `script errors on the page: ${pageErrors.join("; ")}`);
  ok("no script errors on the page");
  console.log(`swagger-ui: ${steps} passed, 0 failed`);
} catch (error) {
  failed = true;
  console.error(`swagger-ui.test: FAILED after ${steps} steps: ${error instanceof Error ? error.message : error}`);
  if (offHost.length > 0) console.error(`requests to other hosts: ${offHost.join(", ")}`);
  try {
    await mkdir(artifacts, { recursive: true });
    const page = browser.contexts()[0]?.pages()[0];
    if (page) {
      await page.screenshot({ path: path.join(artifacts, "swagger-ui-failure.png"), fullPage: true });
      console.error(`failure screenshot: ${path.join(artifacts, "swagger-ui-failure.png")}`);
    }
  } catch {
    // the failure itself is what matters
  }
  console.log(`swagger-ui: ${steps} passed, 1 failed`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
