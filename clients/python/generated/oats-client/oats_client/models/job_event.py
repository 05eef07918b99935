from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

T = TypeVar("T", bound="JobEvent")


@_attrs_define
class JobEvent:
    """Something that happened to a job or its pods.

    Attributes:
        time (datetime.datetime): When it (last) happened.
        type_ (str): `Normal` or `Warning`.
        reason (str): Short machine-readable cause, e.g. `Scheduled`, `Failed`, `BackOff`.
        message (str): What happened, for humans.
        object_ (str): The object concerned, e.g. `Job/job-…` or `Pod/job-…-x7k2p`.
        count (int): How many times it happened.
    """

    time: datetime.datetime
    type_: str
    reason: str
    message: str
    object_: str
    count: int
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        time = self.time.isoformat()

        type_ = self.type_

        reason = self.reason

        message = self.message

        object_ = self.object_

        count = self.count

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "time": time,
                "type": type_,
                "reason": reason,
                "message": message,
                "object": object_,
                "count": count,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        time = datetime.datetime.fromisoformat(d.pop("time"))

        type_ = d.pop("type")

        reason = d.pop("reason")

        message = d.pop("message")

        object_ = d.pop("object")

        count = d.pop("count")

        job_event = cls(
            time=time,
            type_=type_,
            reason=reason,
            message=message,
            object_=object_,
            count=count,
        )

        job_event.additional_properties = d
        return job_event

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
