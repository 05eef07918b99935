#!/usr/bin/env python3
"""A small OATS agent on the official OpenAI Python SDK.

It follows docs/agent-contract.md: the job comes in through the environment (OATS_GOAL,
OATS_MAX_TURNS, OATS_WORKSPACE, ...), the model is reached through OATS's OpenAI-compatible
gateway (the SDK reads OPENAI_BASE_URL and OPENAI_API_KEY by itself), and the answer goes to
OATS_RESULT_FILE. The model gets four tools that only ever touch files inside the workspace.

Exit codes: 0 answered, 1 failed, 3 budget exhausted, 4 call cap reached, 143 stopped by SIGTERM.
Whatever happens, a result file is written: the answer, or why it stopped and what it had so far.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path, PurePosixPath

import openai

EXIT_ANSWERED = 0
EXIT_FAILED = 1
EXIT_BUDGET_EXHAUSTED = 10
EXIT_CALL_CAP = 11
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process ended by SIGTERM

MAX_READ_BYTES = 64 * 1024  # largest read_file answer the model gets
MAX_WRITE_BYTES = 256 * 1024  # largest file write_file accepts
MAX_LIST_ENTRIES = 500  # most entries list_files returns
MAX_RESULT_BYTES = 4096  # OATS keeps at most this much of the result file

SYSTEM_PROMPT = """You are an agent working on a task inside a workspace directory.
Use the tools to inspect and change files; every path is relative to the workspace and must stay
inside it. When the task is done, call final_answer with the answer (or reply without any tool
call). Keep the answer short: at most about 3,000 characters are kept."""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "list_files",
            "description": "List the files under a directory of the workspace (recursively).",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Directory relative to the workspace; default '.'"},
                },
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": f"Read a text file of the workspace, optionally only lines start_line..end_line "
            f"(1-based, inclusive). At most {MAX_READ_BYTES // 1024} KiB are returned per call.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "start_line": {"type": "integer", "minimum": 1},
                    "end_line": {"type": "integer", "minimum": 1},
                },
                "required": ["path"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": f"Create or replace a text file of the workspace (at most {MAX_WRITE_BYTES // 1024} KiB). "
            "Missing parent directories are created.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                "required": ["path", "content"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "final_answer",
            "description": "Finish the task with this answer.",
            "parameters": {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
                "additionalProperties": False,
            },
        },
    },
]


class ToolError(Exception):
    """A tool call the agent refuses or cannot do; its message goes back to the model."""


class Terminated(BaseException):
    """Raised by the SIGTERM handler. A BaseException, so that no `except Exception` (ours or the
    SDK's retry logic) swallows it while a request is in flight."""


# --------------------------------------------------------------------------------------------
# Tools: everything stays inside the workspace
# --------------------------------------------------------------------------------------------


class Workspace:
    def __init__(self, root: str) -> None:
        self.root = Path(root).resolve(strict=True)

    def resolve(self, path: object) -> Path:
        """The real path of `path`, refusing anything that would leave the workspace."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path must be a non-empty string, relative to the workspace")
        relative = PurePosixPath(path)
        if relative.is_absolute():
            raise ToolError(f"{path}: absolute paths are not allowed; use a path relative to the workspace")
        if ".." in relative.parts:
            raise ToolError(f"{path}: '..' is not allowed; paths must stay inside the workspace")
        # resolve() follows symlinks, so a link pointing outside is caught here too.
        real = (self.root / relative).resolve()
        if real != self.root and self.root not in real.parents:
            raise ToolError(f"{path}: resolves outside the workspace (through a symlink)")
        return real

    def display(self, real: Path) -> str:
        return real.relative_to(self.root).as_posix() or "."

    def list_files(self, path: str = ".") -> str:
        top = self.resolve(path)
        if not top.is_dir():
            raise ToolError(f"{path}: not a directory")
        entries: list[str] = []
        for directory, subdirs, files in os.walk(top):  # does not descend into symlinked directories
            subdirs.sort()
            links = [name for name in subdirs if Path(directory, name).is_symlink()]
            for name in sorted(files + links):
                entry = Path(directory, name)
                kind = "symlink" if entry.is_symlink() else f"{entry.stat().st_size} bytes"
                entries.append(f"{self.display(entry)} ({kind})")
                if len(entries) >= MAX_LIST_ENTRIES:
                    return "\n".join(entries) + f"\n[stopped after {MAX_LIST_ENTRIES} entries]"
        return "\n".join(entries) if entries else f"{path}: no files"

    def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        file = self.resolve(path)
        if not file.is_file():
            raise ToolError(f"{path}: no such file")
        start = 1 if start_line is None else start_line
        if not isinstance(start, int) or start < 1:
            raise ToolError("start_line must be an integer >= 1")
        if end_line is not None and (not isinstance(end_line, int) or end_line < start):
            raise ToolError("end_line must be an integer >= start_line")

        parts: list[str] = []
        size = 0
        with file.open("r", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if number < start:
                    continue
                if end_line is not None and number > end_line:
                    break
                line_bytes = len(line.encode("utf-8"))
                if size + line_bytes > MAX_READ_BYTES:
                    if not parts:  # a single line longer than the limit: give its beginning
                        parts.append(line.encode("utf-8")[:MAX_READ_BYTES].decode("utf-8", errors="ignore"))
                        number += 1
                    parts.append(f"\n[truncated at {MAX_READ_BYTES} bytes; read on with start_line={number}]")
                    break
                parts.append(line)
                size += line_bytes
        return "".join(parts) if parts else "[no lines in that range]"

    def write_file(self, path: str, content: str) -> str:
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        data = content.encode("utf-8")
        if len(data) > MAX_WRITE_BYTES:
            raise ToolError(f"content is {len(data)} bytes; at most {MAX_WRITE_BYTES} bytes may be written")
        file = self.resolve(path)
        if file.is_dir():
            raise ToolError(f"{path}: is a directory")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
        return f"wrote {len(data)} bytes to {self.display(file)}"


def run_tool(workspace: Workspace, name: str, raw_arguments: str) -> str:
    """Run one tool call; every problem becomes an error message for the model, never a crash."""
    tools = {"list_files": workspace.list_files, "read_file": workspace.read_file, "write_file": workspace.write_file}
    if name not in tools:
        return f"error: unknown tool {name!r}; the tools are {', '.join(list(tools) + ['final_answer'])}"
    try:
        arguments = json.loads(raw_arguments or "{}")
    except json.JSONDecodeError as e:
        return f"error: the arguments are not valid JSON ({e}); send a JSON object"
    if not isinstance(arguments, dict):
        return "error: the arguments must be a JSON object"
    try:
        return tools[name](**arguments)
    except TypeError as e:  # missing or unknown argument
        return f"error: bad arguments for {name}: {e}"
    except ToolError as e:
        return f"error: {e}"
    except (OSError, ValueError) as e:  # permission denied, disk full, NUL in a path, ...
        return f"error: {name} failed: {e}"


# --------------------------------------------------------------------------------------------
# Result file and exit
# --------------------------------------------------------------------------------------------


def write_result(path: str, text: str) -> None:
    """Write the result, cut to what OATS keeps (cut here, so the cut is marked and UTF-8 stays valid)."""
    data = text.encode("utf-8")
    if len(data) > MAX_RESULT_BYTES:
        marker = b"\n[result truncated]"
        data = data[: MAX_RESULT_BYTES - len(marker)].decode("utf-8", errors="ignore").encode("utf-8") + marker
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        print(f"agent: cannot write the result file {path}: {e}", file=sys.stderr)


class Progress:
    """What the agent has done so far, for a partial result when it has to stop early."""

    def __init__(self) -> None:
        self.calls = 0
        self.files_written: list[str] = []
        self.last_text = ""

    def summary(self, why: str) -> str:
        lines = [f"Stopped before finishing: {why}", f"Model calls made: {self.calls}."]
        if self.files_written:
            lines.append("Files written in the workspace: " + ", ".join(dict.fromkeys(self.files_written)) + ".")
        if self.last_text:
            lines.append("Last message from the model:\n" + self.last_text)
        return "\n".join(lines)


def finish(result_file: str, code: int, text: str) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a late SIGTERM must not interrupt the result
    write_result(result_file, text)
    print(f"agent: exit {code}", file=sys.stderr, flush=True)
    return code


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def first_model(client: openai.OpenAI, headers: dict[str, str]) -> str:
    """OATS_MODEL is optional: without it, use the first model the gateway offers."""
    models = client.models.list(extra_headers=headers).data
    if not models:
        raise RuntimeError("OATS_MODEL is not set and GET /v1/models lists no model")
    return models[0].id


def run() -> int:
    result_file = os.environ.get("OATS_RESULT_FILE", "/dev/termination-log")
    progress = Progress()
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)  # Ctrl-C when run by hand: the same clean stop
    try:
        goal = os.environ["OATS_GOAL"]
        max_turns = int(os.environ.get("OATS_MAX_TURNS", "10"))
        timeout = float(os.environ.get("OATS_TIMEOUT_SECONDS", "600"))
        workspace = Workspace(os.environ.get("OATS_WORKSPACE", "."))
        os.chdir(workspace.root)
    except (KeyError, ValueError, OSError) as e:
        return finish(result_file, EXIT_FAILED, f"Failed: bad job environment: {e!r}")
    except Terminated:
        return finish(result_file, EXIT_TERMINATED, progress.summary("SIGTERM before the agent started."))

    try:
        # The job's trace context on every model call: the gateway's spans join the job's trace.
        trace_headers = {
            header: os.environ[variable]
            for header, variable in (("traceparent", "TRACEPARENT"), ("tracestate", "TRACESTATE"))
            if os.environ.get(variable)
        }
        # OPENAI_BASE_URL and OPENAI_API_KEY come from the environment. No request outlives the job.
        client = openai.OpenAI(timeout=timeout)
        model = os.environ.get("OATS_MODEL") or first_model(client, trace_headers)

        messages: list[dict] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": goal},
        ]
        for turn in range(1, max_turns + 1):
            response = client.chat.completions.create(
                model=model, messages=messages, tools=TOOLS, extra_headers=trace_headers
            )
            progress.calls = turn
            message = response.choices[0].message
            calls = [call for call in message.tool_calls or [] if call.type == "function"]
            usage = response.usage
            tokens = f"{usage.prompt_tokens}/{usage.completion_tokens}" if usage else "?/?"
            print(f"turn {turn}: tools=[{', '.join(c.function.name for c in calls)}] tokens={tokens}", flush=True)

            if message.content:
                progress.last_text = message.content
            if not calls:  # a plain answer ends the job
                return finish(result_file, EXIT_ANSWERED, message.content or "")

            messages.append(
                {
                    "role": "assistant",
                    "content": message.content,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments},
                        }
                        for c in calls
                    ],
                }
            )
            for call in calls:
                name, arguments = call.function.name, call.function.arguments
                if name == "final_answer":
                    try:
                        answer = json.loads(arguments or "{}")["answer"]
                        if isinstance(answer, str):
                            return finish(result_file, EXIT_ANSWERED, answer)
                    except (json.JSONDecodeError, KeyError, TypeError):
                        pass
                    output = 'error: final_answer takes a JSON object {"answer": "<text>"}'
                else:
                    output = run_tool(workspace, name, arguments)
                    if name == "write_file" and output.startswith("wrote "):
                        progress.files_written.append(output.rsplit(" to ", 1)[1])
                messages.append({"role": "tool", "tool_call_id": call.id, "content": output})

        return finish(result_file, EXIT_CALL_CAP, progress.summary(f"the cap of {max_turns} model calls was reached."))

    except Terminated:
        return finish(
            result_file, EXIT_TERMINATED, progress.summary("SIGTERM (the job was cancelled or hit its deadline).")
        )
    except openai.RateLimitError as e:
        # The gateway's refusals: HTTP 429, OpenAI's error body, code insufficient_quota or max_calls_reached.
        why = e.body.get("message") if isinstance(e.body, dict) else None
        why = why or str(e)
        if e.code == "insufficient_quota":
            return finish(result_file, EXIT_BUDGET_EXHAUSTED, progress.summary(f"the budget is exhausted ({why})."))
        if e.code == "max_calls_reached":
            return finish(result_file, EXIT_CALL_CAP, progress.summary(f"the gateway's call cap was reached ({why})."))
        return finish(result_file, EXIT_FAILED, progress.summary(f"rate limited by the model API ({why})."))
    except openai.APIError as e:
        return finish(result_file, EXIT_FAILED, progress.summary(f"model API error: {type(e).__name__}: {e}"))
    except Exception as e:  # a bug or an unexpected answer: still leave a result behind
        return finish(result_file, EXIT_FAILED, progress.summary(f"unexpected error: {type(e).__name__}: {e}"))


if __name__ == "__main__":
    sys.exit(run())
