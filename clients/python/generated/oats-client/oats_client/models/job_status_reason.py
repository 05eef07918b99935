from enum import StrEnum


class JobStatusReason(StrEnum):
    AGENTERROR = "AgentError"
    BACKOFFLIMITEXCEEDED = "BackoffLimitExceeded"
    CANCELLED = "Cancelled"
    CRASHLOOP = "CrashLoop"
    DEADLINEEXCEEDED = "DeadlineExceeded"
    EVICTED = "Evicted"
    IMAGEPULLFAILED = "ImagePullFailed"
    OOMKILLED = "OOMKilled"
    SERVERRESTARTED = "ServerRestarted"
    STARTFAILED = "StartFailed"
    UNSCHEDULABLE = "Unschedulable"

    def __str__(self) -> str:
        return str(self.value)
