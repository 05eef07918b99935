// Smoke test of the generated TypeScript client (openapi-typescript types + openapi-fetch) against
// a live OATS server: OATS_URL (e.g. http://127.0.0.1:8000) and OATS_TOKEN (a bearer token with
// the submitter or admin role). Type-checked with `tsc --noEmit` (strict), so every field read
// below exists in the generated types; every body is also checked at run time against the spec's
// schema (spec-check.ts). Exits non-zero on the first mismatch.
import { randomBytes } from "node:crypto";
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";
import { assertFits } from "./spec-check.js";

type Job = components["schemas"]["Job"];
type Problem = components["schemas"]["Problem"];
type JobStatus = components["schemas"]["JobStatus"];

const baseUrl = process.env["OATS_URL"];
const token = process.env["OATS_TOKEN"];
if (!baseUrl || !token) {
  console.error("smoke.ts: set OATS_URL and OATS_TOKEN");
  process.exit(2);
}

const client = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });
const anonymous = createClient<paths>({ baseUrl });

let steps = 0;
function ok(what: string): void {
  steps += 1;
  console.log(`ok ${steps} - ${what}`);
}
function expect(condition: boolean, what: string): asserts condition {
  if (!condition) throw new Error(`mismatch: ${what}`);
}
function expectEqual<T>(actual: T, expected: T, what: string): void {
  if (actual !== expected) throw new Error(`mismatch: ${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
}
function expectProblem(error: Problem | undefined, response: Response, status: number, type: string): Problem {
  expect(error !== undefined, `an error body for HTTP ${status}`);
  expectEqual(response.status, status, "HTTP status");
  expectEqual(response.headers.get("content-type"), "application/problem+json", "problem content type");
  assertFits("Problem", error);
  expectEqual(error.type, `https://oats.dev/problems/${type}`, "problem type");
  expectEqual(error.status, status, "problem status field");
  expect(error.detail.length > 0, "problem detail is not empty");
  expect(error.title.length > 0, "problem title is not empty");
  return error;
}

const JOB_ID = /^job-[a-z2-7]{20}$/;
const FINAL: readonly JobStatus[] = ["succeeded", "failed", "cancelled"];
// A label value unique to this run: listings filtered by it see only this run's jobs.
const run = `ts-${randomBytes(6).toString("hex")}`;

async function create(goal: string, maxTurns: number): Promise<Job> {
  const { data, error, response } = await client.POST("/api/v1/jobs", {
    body: { goal, max_turns: maxTurns, labels: { run, client: "typescript" } },
  });
  expect(error === undefined && data !== undefined, `createJob answered ${response.status}: ${JSON.stringify(error)}`);
  expectEqual(response.status, 201, "createJob status");
  // 200, 201 and 202 share one response type (Job | DryRunResult): a 201 is a Job.
  expect("id" in data, "createJob 201 body is a Job");
  assertFits("Job", data);
  expect(JOB_ID.test(data.id), `job id ${data.id} has the documented shape`);
  expectEqual(response.headers.get("location"), `/api/v1/jobs/${data.id}`, "Location header");
  expectEqual(data.links.self, `/api/v1/jobs/${data.id}`, "links.self");
  expectEqual(data.goal, goal, "goal");
  expectEqual(data.max_turns, maxTurns, "max_turns");
  expectEqual(data.labels["run"], run, "labels.run");
  expect(data.status === "pending" || data.status === "running", `new job status ${data.status}`);
  return data;
}

async function get(id: string): Promise<Job> {
  const { data, error, response } = await client.GET("/api/v1/jobs/{id}", { params: { path: { id } } });
  expect(data !== undefined, `getJob answered ${response.status}: ${JSON.stringify(error)}`);
  expectEqual(response.status, 200, "getJob status");
  assertFits("Job", data);
  expectEqual(data.id, id, "getJob id");
  return data;
}

async function main(): Promise<void> {
  // 1. Create: a long job (100 turns) to cancel, then a one-turn job that finishes.
  const long = await create("from the TypeScript smoke test (to be cancelled)", 100);
  const short = await create("from the TypeScript smoke test", 1);
  ok(`createJob: 201, ids ${long.id} and ${short.id}, Location matches`);

  // 2. Get.
  const fetched = await get(long.id);
  expectEqual(fetched.goal, long.goal, "getJob goal");
  expectEqual(fetched.created_at, long.created_at, "getJob created_at");
  ok("getJob: 200, same job");

  // 3. List with limit=1 and follow next_page_token: newest first, so [short, long].
  const seen: string[] = [];
  let pageToken: string | undefined;
  let pages = 0;
  do {
    const { data, error, response } = await client.GET("/api/v1/jobs", {
      params: { query: { limit: 1, label: `run=${run}`, ...(pageToken === undefined ? {} : { page_token: pageToken }) } },
    });
    expect(data !== undefined, `listJobs answered ${response.status}: ${JSON.stringify(error)}`);
    assertFits("JobList", data);
    expect(data.items.length <= 1, `limit=1 page has ${data.items.length} items`);
    seen.push(...data.items.map((job) => job.id));
    pageToken = data.next_page_token;
    pages += 1;
    if (pages === 1) expect(pageToken !== undefined, "first page of two jobs has a next_page_token");
  } while (pageToken !== undefined && pages < 5);
  expectEqual(pageToken, undefined, "paging ends");
  expectEqual(JSON.stringify(seen), JSON.stringify([short.id, long.id]), "pages hold the run's jobs, newest first");
  ok(`listJobs: limit=1 over ${pages} pages via next_page_token gave [${seen.join(", ")}]`);

  // 4. Cancel the long job; cancelling again changes nothing.
  {
    const { data, error, response } = await client.POST("/api/v1/jobs/{id}/cancel", { params: { path: { id: long.id } } });
    expect(data !== undefined, `cancelJob answered ${response.status}: ${JSON.stringify(error)}`);
    expectEqual(response.status, 200, "cancelJob status");
    assertFits("Job", data);
    expectEqual(data.status, "cancelled", "cancelled job status");
    expectEqual(data.reason, "Cancelled", "cancelled job reason");
    expectEqual((await get(long.id)).status, "cancelled", "status after cancel");
    const again = await client.POST("/api/v1/jobs/{id}/cancel", { params: { path: { id: long.id } } });
    expectEqual(again.response.status, 200, "second cancel status");
    ok("cancelJob: 200, status cancelled, reason Cancelled, idempotent");
  }

  // 5. The short job runs to its end and carries a result.
  {
    const deadline = Date.now() + 60_000;
    let job = await get(short.id);
    while (!FINAL.includes(job.status) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 200));
      job = await get(short.id);
    }
    expectEqual(job.status, "succeeded", `final status of ${short.id} (${job.message ?? ""})`);
    expect(typeof job.result === "string" && job.result.length > 0, "a succeeded job has a result");
    expect(job.started_at !== undefined && job.finished_at !== undefined, "started_at and finished_at are set");
    ok(`getJob: ${short.id} succeeded with result ${JSON.stringify(job.result)}`);

    // Its logs: plain UTF-8 text, one line per line the agent wrote.
    const logs = await client.GET("/api/v1/jobs/{id}/logs", {
      params: { path: { id: short.id }, query: { tail_lines: 100 } },
      parseAs: "text",
    });
    expect(logs.data !== undefined, `getJobLogs answered ${logs.response.status}: ${JSON.stringify(logs.error)}`);
    expectEqual(logs.response.status, 200, "getJobLogs status");
    expectEqual(logs.response.headers.get("content-type"), "text/plain; charset=utf-8", "logs content type");
    const text: string = logs.data;
    expect(text.includes("from the TypeScript smoke test"), `logs mention the goal: ${JSON.stringify(text)}`);
    ok(`getJobLogs: ${text.trimEnd().split("\n").length} lines of text/plain`);
  }

  // 6. Problems: a field rule (422 with `errors`), a schema bound (400), an unknown job (404),
  //    no credentials (401), cancelling a finished job (409).
  {
    const { error, response } = await client.POST("/api/v1/jobs", {
      body: { goal: "bad label", max_turns: 2, labels: { "Bad Key!": "x" } },
    });
    const problem = expectProblem(error, response, 422, "validation-failed");
    expect(problem.errors !== undefined && problem.errors.length === 1, "one field problem");
    expectEqual(problem.errors[0]?.field, "labels.Bad Key!", "errors[0].field");
    ok(`problem 422: type=${problem.type} status=${problem.status} detail=${JSON.stringify(problem.detail)}`);
  }
  {
    const { error, response } = await client.POST("/api/v1/jobs", { body: { goal: "zero turns", max_turns: 0 } });
    const problem = expectProblem(error, response, 400, "invalid-body");
    expect(problem.detail.includes("max_turns"), "detail names max_turns");
    ok(`problem 400: type=${problem.type} status=${problem.status} detail=${JSON.stringify(problem.detail)}`);
  }
  {
    const { error, response } = await client.GET("/api/v1/jobs/{id}", { params: { path: { id: "job-aaaaaaaaaaaaaaaaaaaa" } } });
    const problem = expectProblem(error, response, 404, "not-found");
    ok(`problem 404: type=${problem.type}`);
  }
  {
    const { error, response } = await anonymous.GET("/api/v1/jobs", { params: { query: { limit: 1 } } });
    const problem = expectProblem(error, response, 401, "unauthenticated");
    expect((response.headers.get("www-authenticate") ?? "").startsWith("Bearer"), "WWW-Authenticate: Bearer");
    ok(`problem 401: type=${problem.type}, WWW-Authenticate present`);
  }
  {
    const { error, response } = await client.POST("/api/v1/jobs/{id}/cancel", { params: { path: { id: short.id } } });
    const problem = expectProblem(error, response, 409, "job-finished");
    ok(`problem 409: type=${problem.type}`);
  }

  console.log(`typescript: ${steps} passed, 0 failed`);
}

main().catch((err: unknown) => {
  console.error(`typescript smoke: FAILED after ${steps} steps: ${err instanceof Error ? err.message : String(err)}`);
  console.log(`typescript: ${steps} passed, 1 failed`);
  process.exit(1);
});
