from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

if TYPE_CHECKING:
    from ..models.rule_verdict import RuleVerdict


T = TypeVar("T", bound="DryRunResult")


@_attrs_define
class DryRunResult:
    """The outcome of a dry run: nothing was created.

    Attributes:
        allowed (bool): Whether the submission would be accepted.
        verdicts (list[RuleVerdict]): Every rule's verdict, in the order they are checked.
        job (Any): What would be submitted: the Kubernetes Job manifest, or the local command and environment.
    """

    allowed: bool
    verdicts: list[RuleVerdict]
    job: Any
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        allowed = self.allowed

        verdicts = []
        for verdicts_item_data in self.verdicts:
            verdicts_item = verdicts_item_data.to_dict()
            verdicts.append(verdicts_item)

        job = self.job

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "allowed": allowed,
                "verdicts": verdicts,
                "job": job,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.rule_verdict import RuleVerdict  # noqa: PLC0415

        d = dict(src_dict)
        allowed = d.pop("allowed")

        verdicts = []
        _verdicts = d.pop("verdicts")
        for verdicts_item_data in _verdicts:
            verdicts_item = RuleVerdict.from_dict(verdicts_item_data)

            verdicts.append(verdicts_item)

        job = d.pop("job")

        dry_run_result = cls(
            allowed=allowed,
            verdicts=verdicts,
            job=job,
        )

        dry_run_result.additional_properties = d
        return dry_run_result

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
