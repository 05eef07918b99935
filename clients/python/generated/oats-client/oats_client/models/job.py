from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.job_status import JobStatus
from ..models.job_status_reason import JobStatusReason
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.job_labels import JobLabels
    from ..models.job_links import JobLinks


T = TypeVar("T", bound="Job")


@_attrs_define
class Job:
    """An agent job.

    Example:
        {'id': 'job-k5qv3xw7hy2mbnd4rzta', 'status': 'succeeded', 'created_at': '2026-11-26T10:00:00+00:00',
            'started_at': '2026-11-26T10:00:02+00:00', 'finished_at': '2026-11-26T10:00:09+00:00', 'attempts': 1, 'goal':
            'Summarise the open issues of the repository and propose a plan', 'max_turns': 5, 'timeout_seconds': 600,
            'labels': {'team': 'research'}, 'result': 'Plan: triage the 12 open issues by area, then fix the 3 crashers
            first.', 'trace_id': '4bf92f3577b34da6a3ce929d0e0e4736', 'links': {'self':
            '/api/v1/jobs/job-k5qv3xw7hy2mbnd4rzta', 'logs': '/api/v1/jobs/job-k5qv3xw7hy2mbnd4rzta/logs', 'events':
            '/api/v1/jobs/job-k5qv3xw7hy2mbnd4rzta/events', 'cancel': '/api/v1/jobs/job-k5qv3xw7hy2mbnd4rzta/cancel'}}

    Attributes:
        id (str): Server-assigned id: `job-` and 20 characters of a-z, 2-7. Also the Kubernetes Job name.
        status (JobStatus): Where a job is in its life. `succeeded`, `failed` and `cancelled` are final.
        created_at (datetime.datetime): When the job was accepted.
        attempts (int): How many times the agent was started.
        goal (str): What the agent was asked to achieve.
        max_turns (int): The most turns the agent may take.
        timeout_seconds (int): The timeout in force, in seconds.
        labels (JobLabels): The job's labels.
        links (JobLinks): Links to a job's related resources.
        reason (JobStatusReason | Unset): Why a job is in its status. Stable: values are only ever added.
        message (str | Unset): Human-readable explanation of the status.
        started_at (datetime.datetime | Unset): When the agent first started running.
        finished_at (datetime.datetime | Unset): When the job reached a final status.
        model (str | Unset): The model the agent was asked to use, if any.
        profile (str | Unset): The resource profile the job asked for, if any.
        result (str | Unset): The agent's final answer (at most 4096 bytes), once it succeeded.
        trace_id (str | Unset): Id of the distributed trace that created the job (and that the agent continues), when
            tracing is on: look it up in the trace backend.
    """

    id: str
    status: JobStatus
    created_at: datetime.datetime
    attempts: int
    goal: str
    max_turns: int
    timeout_seconds: int
    labels: JobLabels
    links: JobLinks
    reason: JobStatusReason | Unset = UNSET
    message: str | Unset = UNSET
    started_at: datetime.datetime | Unset = UNSET
    finished_at: datetime.datetime | Unset = UNSET
    model: str | Unset = UNSET
    profile: str | Unset = UNSET
    result: str | Unset = UNSET
    trace_id: str | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        id = self.id

        status = self.status.value

        created_at = self.created_at.isoformat()

        attempts = self.attempts

        goal = self.goal

        max_turns = self.max_turns

        timeout_seconds = self.timeout_seconds

        labels = self.labels.to_dict()

        links = self.links.to_dict()

        reason: str | Unset = UNSET
        if not isinstance(self.reason, Unset):
            reason = self.reason.value

        message = self.message

        started_at: str | Unset = UNSET
        if not isinstance(self.started_at, Unset):
            started_at = self.started_at.isoformat()

        finished_at: str | Unset = UNSET
        if not isinstance(self.finished_at, Unset):
            finished_at = self.finished_at.isoformat()

        model = self.model

        profile = self.profile

        result = self.result

        trace_id = self.trace_id

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "id": id,
                "status": status,
                "created_at": created_at,
                "attempts": attempts,
                "goal": goal,
                "max_turns": max_turns,
                "timeout_seconds": timeout_seconds,
                "labels": labels,
                "links": links,
            }
        )
        if reason is not UNSET:
            field_dict["reason"] = reason
        if message is not UNSET:
            field_dict["message"] = message
        if started_at is not UNSET:
            field_dict["started_at"] = started_at
        if finished_at is not UNSET:
            field_dict["finished_at"] = finished_at
        if model is not UNSET:
            field_dict["model"] = model
        if profile is not UNSET:
            field_dict["profile"] = profile
        if result is not UNSET:
            field_dict["result"] = result
        if trace_id is not UNSET:
            field_dict["trace_id"] = trace_id

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.job_labels import JobLabels  # noqa: PLC0415
        from ..models.job_links import JobLinks  # noqa: PLC0415

        d = dict(src_dict)
        id = d.pop("id")

        status = JobStatus(d.pop("status"))

        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))

        attempts = d.pop("attempts")

        goal = d.pop("goal")

        max_turns = d.pop("max_turns")

        timeout_seconds = d.pop("timeout_seconds")

        labels = JobLabels.from_dict(d.pop("labels"))

        links = JobLinks.from_dict(d.pop("links"))

        _reason = d.pop("reason", UNSET)
        reason: JobStatusReason | Unset
        if isinstance(_reason, Unset):
            reason = UNSET
        else:
            reason = JobStatusReason(_reason)

        message = d.pop("message", UNSET)

        _started_at = d.pop("started_at", UNSET)
        started_at: datetime.datetime | Unset
        if isinstance(_started_at, Unset):
            started_at = UNSET
        else:
            started_at = datetime.datetime.fromisoformat(_started_at)

        _finished_at = d.pop("finished_at", UNSET)
        finished_at: datetime.datetime | Unset
        if isinstance(_finished_at, Unset):
            finished_at = UNSET
        else:
            finished_at = datetime.datetime.fromisoformat(_finished_at)

        model = d.pop("model", UNSET)

        profile = d.pop("profile", UNSET)

        result = d.pop("result", UNSET)

        trace_id = d.pop("trace_id", UNSET)

        job = cls(
            id=id,
            status=status,
            created_at=created_at,
            attempts=attempts,
            goal=goal,
            max_turns=max_turns,
            timeout_seconds=timeout_seconds,
            labels=labels,
            links=links,
            reason=reason,
            message=message,
            started_at=started_at,
            finished_at=finished_at,
            model=model,
            profile=profile,
            result=result,
            trace_id=trace_id,
        )

        job.additional_properties = d
        return job

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
