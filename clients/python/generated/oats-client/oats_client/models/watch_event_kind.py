from enum import StrEnum


class WatchEventKind(StrEnum):
    JOB = "job"
    SHUTDOWN = "shutdown"

    def __str__(self) -> str:
        return str(self.value)
