from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

T = TypeVar("T", bound="RuleVerdict")


@_attrs_define
class RuleVerdict:
    """One policy rule's verdict on a submission.

    Attributes:
        rule (str): The rule, e.g. `max-concurrent-jobs`; a denial's problem `type` ends with it.
        allowed (bool): Whether the rule lets the submission through.
        detail (str): What the rule saw and what it allows.
    """

    rule: str
    allowed: bool
    detail: str
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rule = self.rule

        allowed = self.allowed

        detail = self.detail

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "rule": rule,
                "allowed": allowed,
                "detail": detail,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        rule = d.pop("rule")

        allowed = d.pop("allowed")

        detail = d.pop("detail")

        rule_verdict = cls(
            rule=rule,
            allowed=allowed,
            detail=detail,
        )

        rule_verdict.additional_properties = d
        return rule_verdict

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
