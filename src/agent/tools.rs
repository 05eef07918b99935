//! The agent's tools, declared in one place ([`TOOLS`]) and all confined to the workspace.
//!
//! A path is relative to the workspace; `..`, absolute paths and symlinks that resolve outside are
//! refused. Sizes are bounded. A tool never fails the agent: every problem is a message the model
//! reads and can act on.

use serde_json::{Value, json};
use std::path::{Component, Path, PathBuf};

/// Largest slice of a file `read_file` returns.
pub const MAX_READ_BYTES: usize = 64 * 1024;
/// Largest file `write_file` writes.
pub const MAX_WRITE_BYTES: usize = 256 * 1024;
/// Most entries `list_files` returns, and most matches `search_text` returns.
pub const MAX_ENTRIES: usize = 500;
/// Largest file `search_text` looks into.
const MAX_SEARCH_FILE_BYTES: u64 = 1024 * 1024;

/// Name, description and JSON Schema of each tool, as sent to the model.
pub const TOOLS: &[(&str, &str, &str)] = &[
    (
        "list_files",
        "List files and directories under a directory of the workspace (recursively, at most 500 entries).",
        r#"{"type":"object","properties":{"path":{"type":"string","description":"Directory relative to the workspace; default the workspace itself."}},"additionalProperties":false}"#,
    ),
    (
        "read_file",
        "Read a text file of the workspace, optionally only lines start_line..end_line (1-based, inclusive). At most 64 KiB per call.",
        r#"{"type":"object","properties":{"path":{"type":"string"},"start_line":{"type":"integer","minimum":1},"end_line":{"type":"integer","minimum":1}},"required":["path"],"additionalProperties":false}"#,
    ),
    (
        "write_file",
        "Create or replace a text file of the workspace (at most 256 KiB). Parent directories are created.",
        r#"{"type":"object","properties":{"path":{"type":"string"},"content":{"type":"string"}},"required":["path","content"],"additionalProperties":false}"#,
    ),
    (
        "search_text",
        "Find lines containing a text (case-sensitive) in the workspace's files; returns path:line: text, at most 500 matches.",
        r#"{"type":"object","properties":{"text":{"type":"string"},"path":{"type":"string","description":"Directory to search; default the whole workspace."}},"required":["text"],"additionalProperties":false}"#,
    ),
    (
        "final_answer",
        "Finish the task with the final answer for the user.",
        r#"{"type":"object","properties":{"answer":{"type":"string"}},"required":["answer"],"additionalProperties":false}"#,
    ),
];

/// The `tools` field of a chat completion request.
pub fn declarations() -> Value {
    Value::Array(
        TOOLS
            .iter()
            .map(|(name, description, schema)| {
                let parameters: Value = serde_json::from_str(schema).expect("tool schemas are JSON");
                json!({"type": "function", "function": {"name": name, "description": description, "parameters": parameters}})
            })
            .collect(),
    )
}

/// What running a tool call gave.
#[derive(Debug, PartialEq, Eq)]
pub enum ToolOutcome {
    /// Text for the model (including error messages, which start with `error:`).
    Output(String),
    /// The model's final answer.
    Answer(String),
}

/// The workspace the tools work in.
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self { root: root.canonicalize()? })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Run one tool call; `arguments` is the JSON text the model sent.
    pub fn run(&self, name: &str, arguments: &str) -> ToolOutcome {
        let args: Value = match serde_json::from_str(arguments) {
            Ok(Value::Object(map)) => Value::Object(map),
            Ok(_) | Err(_) => {
                return ToolOutcome::Output(format!(
                    "error: the arguments of {name} must be a JSON object; got {:?}",
                    arguments.chars().take(200).collect::<String>()
                ));
            }
        };
        let text = |key: &str| args.get(key).and_then(Value::as_str);
        let result = match name {
            "list_files" => self.list_files(text("path").unwrap_or(".")),
            "read_file" => match text("path") {
                Some(path) => self.read_file(
                    path,
                    args.get("start_line").and_then(Value::as_u64),
                    args.get("end_line").and_then(Value::as_u64),
                ),
                None => Err("read_file needs `path`".into()),
            },
            "write_file" => match (text("path"), text("content")) {
                (Some(path), Some(content)) => self.write_file(path, content),
                _ => Err("write_file needs `path` and `content` (strings)".into()),
            },
            "search_text" => match text("text") {
                Some(needle) if !needle.is_empty() => self.search_text(needle, text("path").unwrap_or(".")),
                _ => Err("search_text needs a non-empty `text`".into()),
            },
            "final_answer" => {
                return match text("answer") {
                    Some(answer) => ToolOutcome::Answer(answer.to_owned()),
                    None => ToolOutcome::Output("error: final_answer needs `answer` (a string)".into()),
                };
            }
            other => Err(format!("there is no tool {other:?}; the tools are {}", tool_names())),
        };
        ToolOutcome::Output(result.unwrap_or_else(|e| format!("error: {e}")))
    }

    /// The absolute path of `relative`, if it stays inside the workspace (symlinks resolved).
    fn resolve(&self, relative: &str, must_exist: bool) -> Result<PathBuf, String> {
        let path = Path::new(relative);
        if relative.contains('\0') {
            return Err("paths may not contain NUL".into());
        }
        if path.is_absolute() {
            return Err(format!("{relative}: absolute paths are not allowed; use a path inside the workspace"));
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!("{relative}: `..` is not allowed; paths stay inside the workspace"));
        }
        let joined = self.root.join(path);
        // Resolve the deepest existing ancestor, so a symlink anywhere on the way is followed.
        let mut existing = joined.as_path();
        let mut rest = Vec::new();
        while !existing.exists() {
            if must_exist {
                return Err(format!("{relative}: no such file or directory"));
            }
            rest.push(existing.file_name().ok_or_else(|| format!("{relative}: not a valid path"))?.to_owned());
            existing = existing.parent().ok_or_else(|| format!("{relative}: not a valid path"))?;
        }
        let mut resolved = existing.canonicalize().map_err(|e| format!("{relative}: {e}"))?;
        if !resolved.starts_with(&self.root) {
            return Err(format!("{relative}: leads outside the workspace (through a symlink)"));
        }
        for part in rest.into_iter().rev() {
            resolved.push(part);
        }
        Ok(resolved)
    }

    fn shown<'a>(&self, path: &'a Path) -> std::borrow::Cow<'a, str> {
        path.strip_prefix(&self.root).unwrap_or(path).to_string_lossy()
    }

    fn list_files(&self, relative: &str) -> Result<String, String> {
        let dir = self.resolve(relative, true)?;
        let mut entries = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let read = std::fs::read_dir(&dir).map_err(|e| format!("{relative}: {e}"))?;
            for entry in read.flatten() {
                if entries.len() >= MAX_ENTRIES {
                    entries.push(format!("... (stopped at {MAX_ENTRIES} entries)"));
                    return Ok(entries.join("\n"));
                }
                let path = entry.path();
                let kind = entry.file_type().map_err(|e| e.to_string())?;
                if kind.is_dir() {
                    entries.push(format!("{}/", self.shown(&path)));
                    stack.push(path);
                } else {
                    let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    entries.push(format!("{} ({size} bytes)", self.shown(&path)));
                }
            }
        }
        entries.sort();
        Ok(if entries.is_empty() { "(empty)".into() } else { entries.join("\n") })
    }

    fn read_file(&self, relative: &str, start: Option<u64>, end: Option<u64>) -> Result<String, String> {
        let path = self.resolve(relative, true)?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{relative}: {e}"))?;
        let text = String::from_utf8_lossy(&bytes);
        let start = start.unwrap_or(1).max(1) as usize;
        let end = end.map(|e| e as usize).unwrap_or(usize::MAX);
        if end < start {
            return Err(format!("end_line {end} is before start_line {start}"));
        }
        let mut out = String::new();
        for (number, line) in
            text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(n, _)| (start..=end).contains(n))
        {
            if out.len() + line.len() + 1 > MAX_READ_BYTES {
                out.push_str(&format!("... (cut at 64 KiB; read on with start_line={number})"));
                return Ok(out);
            }
            out.push_str(line);
            out.push('\n');
        }
        Ok(out)
    }

    fn write_file(&self, relative: &str, content: &str) -> Result<String, String> {
        if content.len() > MAX_WRITE_BYTES {
            return Err(format!("{relative}: {} bytes is over the limit of {MAX_WRITE_BYTES}", content.len()));
        }
        let path = self.resolve(relative, false)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{relative}: {e}"))?;
        }
        // Written through a fresh file: a symlink planted at the target is replaced, not followed.
        let tmp = path.with_extension("oats-tmp");
        std::fs::write(&tmp, content).map_err(|e| format!("{relative}: {e}"))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{relative}: {e}"))?;
        Ok(format!("wrote {} bytes to {relative}", content.len()))
    }

    fn search_text(&self, needle: &str, relative: &str) -> Result<String, String> {
        let dir = self.resolve(relative, true)?;
        let mut matches = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let Ok(read) = std::fs::read_dir(&dir) else { continue };
            for entry in read.flatten() {
                let path = entry.path();
                let Ok(kind) = entry.file_type() else { continue };
                if kind.is_dir() {
                    stack.push(path);
                    continue;
                }
                if !kind.is_file() || entry.metadata().map(|m| m.len()).unwrap_or(0) > MAX_SEARCH_FILE_BYTES {
                    continue;
                }
                let Ok(bytes) = std::fs::read(&path) else { continue };
                for (number, line) in String::from_utf8_lossy(&bytes).lines().enumerate() {
                    if line.contains(needle) {
                        if matches.len() >= MAX_ENTRIES {
                            matches.push(format!("... (stopped at {MAX_ENTRIES} matches)"));
                            return Ok(matches.join("\n"));
                        }
                        let line: String = line.chars().take(300).collect();
                        matches.push(format!("{}:{}: {line}", self.shown(&path), number + 1));
                    }
                }
            }
        }
        Ok(if matches.is_empty() { "no matches".into() } else { matches.join("\n") })
    }
}

fn tool_names() -> String {
    TOOLS.iter().map(|(name, _, _)| *name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> (tempfile::TempDir, Workspace) {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::new(&dir.path().join("ws")).unwrap();
        (dir, ws)
    }

    fn output(outcome: ToolOutcome) -> String {
        match outcome {
            ToolOutcome::Output(text) => text,
            ToolOutcome::Answer(answer) => panic!("unexpected answer {answer}"),
        }
    }

    #[test]
    fn files_are_written_read_listed_and_searched() {
        let (_dir, ws) = workspace();
        assert_eq!(
            output(ws.run("write_file", r#"{"path":"notes/a.txt","content":"one\ntwo\nthree\n"}"#)),
            "wrote 14 bytes to notes/a.txt"
        );
        assert_eq!(
            output(ws.run("read_file", r#"{"path":"notes/a.txt","start_line":2,"end_line":3}"#)),
            "two\nthree\n"
        );
        assert!(output(ws.run("list_files", "{}")).contains("notes/a.txt (14 bytes)"));
        assert_eq!(output(ws.run("search_text", r#"{"text":"thr"}"#)), "notes/a.txt:3: three");
        assert_eq!(ws.run("final_answer", r#"{"answer":"done"}"#), ToolOutcome::Answer("done".into()));
    }

    #[test]
    fn no_path_leaves_the_workspace() {
        let (dir, ws) = workspace();
        std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), ws.root().join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), ws.root().join("out")).unwrap();
        for (tool, args) in [
            ("read_file", r#"{"path":"../../etc/passwd"}"#),
            ("read_file", r#"{"path":"/etc/passwd"}"#),
            ("read_file", r#"{"path":"link"}"#),
            ("write_file", r#"{"path":"out/planted","content":"x"}"#),
            ("list_files", r#"{"path":"out"}"#),
            ("search_text", r#"{"text":"s3cret","path":"out"}"#),
        ] {
            let text = output(ws.run(tool, args));
            assert!(text.starts_with("error:"), "{tool} {args}: {text}");
            assert!(!text.contains("s3cret") && !text.contains("root:"), "{text}");
        }
        assert!(!dir.path().join("planted").exists());
    }

    #[test]
    fn bad_calls_are_errors_the_model_reads() {
        let (_dir, ws) = workspace();
        for (tool, args) in [
            ("read_file", "{not json"),
            ("read_file", "[1]"),
            ("write_file", r#"{"path":"a"}"#),
            ("no_such_tool", "{}"),
            ("read_file", r#"{"path":"missing"}"#),
            ("final_answer", r#"{"answer":5}"#),
        ] {
            assert!(output(ws.run(tool, args)).starts_with("error:"), "{tool} {args}");
        }
        let big = format!(r#"{{"path":"big","content":"{}"}}"#, "x".repeat(MAX_WRITE_BYTES + 1));
        assert!(output(ws.run("write_file", &big)).contains("over the limit"));
    }

    #[test]
    fn every_declared_tool_has_a_valid_schema() {
        let declared = declarations();
        assert_eq!(declared.as_array().unwrap().len(), TOOLS.len());
    }
}
