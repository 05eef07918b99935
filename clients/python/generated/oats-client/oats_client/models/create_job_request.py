from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.create_job_request_labels_type_0 import CreateJobRequestLabelsType0


T = TypeVar("T", bound="CreateJobRequest")


@_attrs_define
class CreateJobRequest:
    """A request to run an agent.

    Example:
        {'goal': 'Summarise the open issues of the repository and propose a plan', 'max_turns': 5, 'labels': {'team':
            'research'}, 'timeout_seconds': 600, 'model': None, 'profile': None}

    Attributes:
        goal (str): What the agent should achieve: 1 to 16384 bytes of UTF-8 (the server counts bytes; the
            configured limit may be lower), not only whitespace, no NUL characters.
        max_turns (int): The most reasoning turns the agent may take: 1 to 100 (the configured ceiling may be lower).
        labels (CreateJobRequestLabelsType0 | None | Unset): Up to 16 labels for filtering, in Kubernetes label syntax.
            Keys `app` and `oats.dev/*` are
            reserved.
        timeout_seconds (int | None | Unset): Seconds the job may run before it is stopped with reason
            `DeadlineExceeded`: 10 to 86400,
            within the configured maximum (3600 by default). Default: the configured default (600).
        model (None | str | Unset): Model the agent should use, passed to it as `OATS_MODEL`: 1 to 128 characters of
            letters, digits and `-_./:@`.
        profile (None | str | Unset): Resource profile defined by the tenant's policy (e.g. `small`, `medium`, `large`):
            1 to 32
            characters of a-z, 0-9 and `-`. Default: the policy's default profile.
    """

    goal: str
    max_turns: int
    labels: CreateJobRequestLabelsType0 | None | Unset = UNSET
    timeout_seconds: int | None | Unset = UNSET
    model: None | str | Unset = UNSET
    profile: None | str | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        from ..models.create_job_request_labels_type_0 import CreateJobRequestLabelsType0  # noqa: PLC0415

        goal = self.goal

        max_turns = self.max_turns

        labels: dict[str, Any] | None | Unset
        if isinstance(self.labels, Unset):
            labels = UNSET
        elif isinstance(self.labels, CreateJobRequestLabelsType0):
            labels = self.labels.to_dict()
        else:
            labels = self.labels

        timeout_seconds: int | None | Unset
        if isinstance(self.timeout_seconds, Unset):
            timeout_seconds = UNSET
        else:
            timeout_seconds = self.timeout_seconds

        model: None | str | Unset
        if isinstance(self.model, Unset):
            model = UNSET
        else:
            model = self.model

        profile: None | str | Unset
        if isinstance(self.profile, Unset):
            profile = UNSET
        else:
            profile = self.profile

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "goal": goal,
                "max_turns": max_turns,
            }
        )
        if labels is not UNSET:
            field_dict["labels"] = labels
        if timeout_seconds is not UNSET:
            field_dict["timeout_seconds"] = timeout_seconds
        if model is not UNSET:
            field_dict["model"] = model
        if profile is not UNSET:
            field_dict["profile"] = profile

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.create_job_request_labels_type_0 import CreateJobRequestLabelsType0  # noqa: PLC0415

        d = dict(src_dict)
        goal = d.pop("goal")

        max_turns = d.pop("max_turns")

        def _parse_labels(data: object) -> CreateJobRequestLabelsType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                labels_type_0 = CreateJobRequestLabelsType0.from_dict(data)

                return labels_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(CreateJobRequestLabelsType0 | None | Unset, data)

        labels = _parse_labels(d.pop("labels", UNSET))

        def _parse_timeout_seconds(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        timeout_seconds = _parse_timeout_seconds(d.pop("timeout_seconds", UNSET))

        def _parse_model(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        model = _parse_model(d.pop("model", UNSET))

        def _parse_profile(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        profile = _parse_profile(d.pop("profile", UNSET))

        create_job_request = cls(
            goal=goal,
            max_turns=max_turns,
            labels=labels,
            timeout_seconds=timeout_seconds,
            model=model,
            profile=profile,
        )

        return create_job_request
