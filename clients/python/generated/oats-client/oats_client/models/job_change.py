from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.watch_event_kind import WatchEventKind

if TYPE_CHECKING:
    from ..models.job import Job


T = TypeVar("T", bound="JobChange")


@_attrs_define
class JobChange:
    """One Server-Sent Event of `watchJob`.

    Attributes:
        event (WatchEventKind): Why a watch event was sent.
        state (str): Names this state of the job (also the SSE `id`): send it as `Last-Event-ID` to resume.
        job (Job): An agent job. Example: {'id': 'job-k5qv3xw7hy2mbnd4rzta', 'status': 'succeeded', 'created_at':
            '2026-11-26T10:00:00+00:00', 'started_at': '2026-11-26T10:00:02+00:00', 'finished_at':
            '2026-11-26T10:00:09+00:00', 'attempts': 1, 'goal': 'Summarise the open issues of the repository and propose a
            plan', 'max_turns': 5, 'timeout_seconds': 600, 'labels': {'team': 'research'}, 'result': 'Plan: triage the 12
            open issues by area, then fix the 3 crashers first.', 'trace_id': '4bf92f3577b34da6a3ce929d0e0e4736', 'links':
            {'self': '/api/v1/jobs/job-k5qv3xw7hy2mbnd4rzta', 'logs': '/api/v1/jobs/job-k5qv3xw7hy2mbnd4rzta/logs',
            'events': '/api/v1/jobs/job-k5qv3xw7hy2mbnd4rzta/events', 'cancel':
            '/api/v1/jobs/job-k5qv3xw7hy2mbnd4rzta/cancel'}}.
    """

    event: WatchEventKind
    state: str
    job: Job
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        event = self.event.value

        state = self.state

        job = self.job.to_dict()

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "event": event,
                "state": state,
                "job": job,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.job import Job  # noqa: PLC0415

        d = dict(src_dict)
        event = WatchEventKind(d.pop("event"))

        state = d.pop("state")

        job = Job.from_dict(d.pop("job"))

        job_change = cls(
            event=event,
            state=state,
            job=job,
        )

        job_change.additional_properties = d
        return job_change

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
