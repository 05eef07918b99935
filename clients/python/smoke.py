"""Smoke test of the client that openapi-python-client generates from openapi/openapi.json, against
a live OATS server: OATS_URL (e.g. http://127.0.0.1:8000) and OATS_TOKEN (a bearer token with the
submitter or admin role). The generated package `oats_client` must be importable (the test script
puts it on PYTHONPATH). Type-checked with `mypy --strict`; every parsed model must also have
no `additional_properties`, i.e. the server sent no field that the spec (and so the client)
does not declare. Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from typing import Any, TypeVar

from oats_client import AuthenticatedClient
from oats_client.api.jobs import cancel_job, create_job, get_job, get_job_logs, list_jobs
from oats_client.models import (
    CreateJobRequest,
    CreateJobRequestLabelsType0,
    Job,
    JobList,
    JobStatus,
    JobStatusReason,
    Problem,
)
from oats_client.types import UNSET, Response, Unset

JOB_ID = re.compile(r"^job-[a-z2-7]{20}$")
FINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}

T = TypeVar("T")
steps = 0


class Mismatch(Exception):
    pass


def ok(what: str) -> None:
    global steps
    steps += 1
    print(f"ok {steps} - {what}", flush=True)


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Mismatch(what)


def expect_equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise Mismatch(f"{what}: expected {expected!r}, got {actual!r}")


def no_extra_fields(job: Job) -> None:
    """The server sent only fields the spec declares (else the generated model would drop them
    into additional_properties)."""
    expect_equal(job.additional_properties, {}, f"undeclared fields of Job {job.id}")
    expect_equal(job.links.additional_properties, {}, "undeclared fields of JobLinks")


def parsed(response: Response[Any], status: int, kind: type[T], what: str) -> T:
    body = response.parsed
    if response.status_code != status or not isinstance(body, kind):
        raise Mismatch(f"{what}: expected {status} with a {kind.__name__}, got {response.status_code}: {response.content!r}")
    return body


def problem(response: Response[Any], status: int, type_: str, what: str) -> Problem:
    body = response.parsed
    if response.status_code != status or not isinstance(body, Problem):
        raise Mismatch(f"{what}: expected a {status} problem, got {response.status_code}: {response.content!r}")
    expect_equal(response.headers.get("content-type"), "application/problem+json", f"{what}: content type")
    expect_equal(body.additional_properties, {}, f"{what}: undeclared problem fields")
    expect_equal(body.type_, f"https://oats.dev/problems/{type_}", f"{what}: problem type")
    expect_equal(body.status, status, f"{what}: problem status field")
    expect(bool(body.detail) and bool(body.title), f"{what}: detail and title are not empty")
    return body


def main() -> None:
    base_url = os.environ.get("OATS_URL")
    token = os.environ.get("OATS_TOKEN")
    if not base_url or not token:
        print("smoke.py: set OATS_URL and OATS_TOKEN", file=sys.stderr)
        sys.exit(2)
    client = AuthenticatedClient(base_url=base_url, token=token, raise_on_unexpected_status=True)
    stranger = AuthenticatedClient(base_url=base_url, token="not-a-token", raise_on_unexpected_status=True)
    # A label value unique to this run: listings filtered by it see only this run's jobs.
    run = f"py-{secrets.token_hex(6)}"

    def create(goal: str, max_turns: int) -> Job:
        labels = CreateJobRequestLabelsType0()
        labels["run"] = run
        labels["client"] = "python"
        response = create_job.sync_detailed(
            client=client, body=CreateJobRequest(goal=goal, max_turns=max_turns, labels=labels)
        )
        job = parsed(response, 201, Job, "createJob")
        no_extra_fields(job)
        expect(bool(JOB_ID.match(job.id)), f"job id {job.id} has the documented shape")
        expect_equal(response.headers.get("location"), f"/api/v1/jobs/{job.id}", "Location header")
        expect_equal(job.links.self_, f"/api/v1/jobs/{job.id}", "links.self")
        expect_equal(job.goal, goal, "goal")
        expect_equal(job.max_turns, max_turns, "max_turns")
        expect_equal(job.labels["run"], run, "labels.run")
        expect(job.status in {JobStatus.PENDING, JobStatus.RUNNING}, f"new job status {job.status}")
        return job

    def get(job_id: str) -> Job:
        job = parsed(get_job.sync_detailed(job_id, client=client), 200, Job, "getJob")
        no_extra_fields(job)
        expect_equal(job.id, job_id, "getJob id")
        return job

    with client:
        # 1. Create: a long job (100 turns) to cancel, then a one-turn job that finishes.
        long = create("from the Python smoke test (to be cancelled)", 100)
        short = create("from the Python smoke test", 1)
        ok(f"createJob: 201, ids {long.id} and {short.id}, Location matches")

        # 2. Get.
        fetched = get(long.id)
        expect_equal(fetched.goal, long.goal, "getJob goal")
        expect_equal(fetched.created_at, long.created_at, "getJob created_at")
        ok("getJob: 200, same job")

        # 3. List with limit=1 and follow next_page_token: newest first, so [short, long].
        seen: list[str] = []
        page_token: str | Unset = UNSET
        pages = 0
        while True:
            page = parsed(
                list_jobs.sync_detailed(client=client, limit=1, label=f"run={run}", page_token=page_token),
                200,
                JobList,
                "listJobs",
            )
            expect_equal(page.additional_properties, {}, "undeclared JobList fields")
            expect(len(page.items) <= 1, f"limit=1 page has {len(page.items)} items")
            for job in page.items:
                no_extra_fields(job)
                seen.append(job.id)
            page_token = page.next_page_token
            pages += 1
            if pages == 1:
                expect(not isinstance(page_token, Unset), "first page of two jobs has a next_page_token")
            if isinstance(page_token, Unset) or pages >= 5:
                break
        expect(isinstance(page_token, Unset), "paging ends")
        expect_equal(seen, [short.id, long.id], "pages hold the run's jobs, newest first")
        ok(f"listJobs: limit=1 over {pages} pages via next_page_token gave {seen}")

        # 4. Cancel the long job; cancelling again changes nothing.
        cancelled = parsed(cancel_job.sync_detailed(long.id, client=client), 200, Job, "cancelJob")
        no_extra_fields(cancelled)
        expect_equal(cancelled.status, JobStatus.CANCELLED, "cancelled job status")
        expect_equal(cancelled.reason, JobStatusReason.CANCELLED, "cancelled job reason")
        expect_equal(get(long.id).status, JobStatus.CANCELLED, "status after cancel")
        parsed(cancel_job.sync_detailed(long.id, client=client), 200, Job, "second cancelJob")
        ok("cancelJob: 200, status cancelled, reason Cancelled, idempotent")

        # 5. The short job runs to its end and carries a result.
        deadline = time.monotonic() + 60
        job = get(short.id)
        while job.status not in FINAL and time.monotonic() < deadline:
            time.sleep(0.2)
            job = get(short.id)
        expect_equal(job.status, JobStatus.SUCCEEDED, f"final status of {short.id} ({job.message!r})")
        expect(isinstance(job.result, str) and bool(job.result), "a succeeded job has a result")
        expect(
            not isinstance(job.started_at, Unset) and not isinstance(job.finished_at, Unset),
            "started_at and finished_at are set",
        )
        ok(f"getJob: {short.id} succeeded with result {job.result!r}")

        # Its logs: plain UTF-8 text, one line per line the agent wrote.
        logs_response = get_job_logs.sync_detailed(short.id, client=client, tail_lines=100)
        logs = parsed(logs_response, 200, str, "getJobLogs")
        expect_equal(logs_response.headers.get("content-type"), "text/plain; charset=utf-8", "logs content type")
        expect("from the Python smoke test" in logs, f"logs mention the goal: {logs!r}")
        ok(f"getJobLogs: {len(logs.splitlines())} lines of text/plain")

        # 6. Problems: a field rule (422 with `errors`), a schema bound (400), an unknown job (404),
        #    a bad token (401), cancelling a finished job (409).
        bad_labels = CreateJobRequestLabelsType0()
        bad_labels["Bad Key!"] = "x"
        p = problem(
            create_job.sync_detailed(client=client, body=CreateJobRequest(goal="bad label", max_turns=2, labels=bad_labels)),
            422,
            "validation-failed",
            "invalid label",
        )
        expect(not isinstance(p.errors, Unset) and len(p.errors) == 1, "one field problem")
        assert not isinstance(p.errors, Unset)
        expect_equal(p.errors[0].field, "labels.Bad Key!", "errors[0].field")
        ok(f"problem 422: type={p.type_} status={p.status} detail={p.detail!r}")

        p = problem(
            create_job.sync_detailed(client=client, body=CreateJobRequest(goal="zero turns", max_turns=0)),
            400,
            "invalid-body",
            "max_turns 0",
        )
        expect("max_turns" in p.detail, "detail names max_turns")
        ok(f"problem 400: type={p.type_} status={p.status} detail={p.detail!r}")

        p = problem(get_job.sync_detailed("job-aaaaaaaaaaaaaaaaaaaa", client=client), 404, "not-found", "unknown job")
        ok(f"problem 404: type={p.type_}")

        with stranger:
            response = list_jobs.sync_detailed(client=stranger, limit=1)
            p = problem(response, 401, "unauthenticated", "bad token")
            expect(response.headers.get("www-authenticate", "").startswith("Bearer"), "WWW-Authenticate: Bearer")
        ok(f"problem 401: type={p.type_}, WWW-Authenticate present")

        p = problem(cancel_job.sync_detailed(short.id, client=client), 409, "job-finished", "cancel a finished job")
        ok(f"problem 409: type={p.type_}")

    print(f"python: {steps} passed, 0 failed")


if __name__ == "__main__":
    try:
        main()
    except Exception as err:  # noqa: BLE001 - any failure, mismatch or not, fails the smoke test
        print(f"python smoke: FAILED after {steps} steps: {type(err).__name__}: {err}", file=sys.stderr)
        print(f"python: {steps} passed, 1 failed")
        sys.exit(1)
