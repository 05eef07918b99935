"""Contains all the data models used in inputs/outputs"""

from .create_job_request import CreateJobRequest
from .create_job_request_labels_type_0 import CreateJobRequestLabelsType0
from .dry_run_result import DryRunResult
from .field_problem import FieldProblem
from .health import Health
from .job import Job
from .job_change import JobChange
from .job_event import JobEvent
from .job_event_list import JobEventList
from .job_labels import JobLabels
from .job_links import JobLinks
from .job_list import JobList
from .job_status import JobStatus
from .job_status_reason import JobStatusReason
from .problem import Problem
from .rule_verdict import RuleVerdict
from .watch_event_kind import WatchEventKind

__all__ = (
    "CreateJobRequest",
    "CreateJobRequestLabelsType0",
    "DryRunResult",
    "FieldProblem",
    "Health",
    "Job",
    "JobChange",
    "JobEvent",
    "JobEventList",
    "JobLabels",
    "JobLinks",
    "JobList",
    "JobStatus",
    "JobStatusReason",
    "Problem",
    "RuleVerdict",
    "WatchEventKind",
)
