//! A minimal Server-Sent Events reader (the fields OATS sends: event, id, data).

/// One dispatched event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Feeds bytes in, takes complete events out.
#[derive(Default)]
pub struct SseParser {
    buffer: String,
    current: SseEvent,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.push_str(&String::from_utf8_lossy(bytes));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.find('\n') {
            let line: String = self.buffer.drain(..=end).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.current.data.is_empty() {
                    events.push(std::mem::take(&mut self.current));
                }
                self.current = SseEvent::default();
                continue;
            }
            if line.starts_with(':') {
                continue; // heartbeat comment
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.current.event = value.to_owned(),
                "id" => self.current.id = Some(value.to_owned()),
                "data" => {
                    if !self.current.data.is_empty() {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                }
                _ => {}
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_heartbeats_are_ignored() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"id: running-1\nevent: jo").is_empty());
        let events = parser.push(b"b\ndata: {\"a\":1}\n\n: ping\n\nid: x\ndata: 2\n\n");
        assert_eq!(
            events,
            vec![
                SseEvent { event: "job".into(), id: Some("running-1".into()), data: "{\"a\":1}".into() },
                SseEvent { event: String::new(), id: Some("x".into()), data: "2".into() },
            ]
        );
    }
}
