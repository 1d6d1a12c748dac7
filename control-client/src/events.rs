//! Reading the event stream (`GET /v1/exports/{name}/events`, Server-Sent Events) as it comes.

use std::io::{BufRead, BufReader, Read};

use nbdfault_policies::{FaultRecord, PowerRecord};
use serde_json::Value;

use crate::Error;

/// The longest line the reader takes; an event is one JSON line of a few hundred bytes.
const MAX_LINE: u64 = 1 << 20;

/// One event: its type (`event:`), its number in the export's stream (`id:`) and its JSON data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: String,
    pub id: Option<u64>,
    pub data: Value,
}

impl Event {
    /// The request record a `fault` event carries (`None` for a power record).
    pub fn fault(&self) -> Option<FaultRecord> {
        (self.kind == "fault" && self.data.get("event").is_none())
            .then(|| serde_json::from_value(self.data.clone()).ok())
            .flatten()
    }

    /// The power record a `fault` event carries: a power cut through the control API, a power-on.
    pub fn power_record(&self) -> Option<PowerRecord> {
        (self.kind == "fault" && self.data.get("event").is_some())
            .then(|| serde_json::from_value(self.data.clone()).ok())
            .flatten()
    }
}

/// The events of one stream, in the order the server sent them. Blocking: `next` waits for the
/// next event; the iterator ends when the server ends the stream (a `dropped` event says why).
pub struct Events {
    reader: BufReader<Box<dyn Read + Send>>,
    line: String,
}

impl Events {
    pub(crate) fn new(reader: impl Read + Send + 'static) -> Events {
        Events { reader: BufReader::new(Box::new(reader)), line: String::new() }
    }

    /// Events from any reader of a `text/event-stream` body.
    pub fn from_reader(reader: impl Read + Send + 'static) -> Events {
        Events::new(reader)
    }

    fn next_event(&mut self) -> Result<Option<Event>, Error> {
        let (mut kind, mut id, mut data) = (None::<String>, None, String::new());
        loop {
            self.line.clear();
            let read = (&mut self.reader).take(MAX_LINE).read_line(&mut self.line)?;
            if read == 0 {
                return Ok(None);
            }
            let line = self.line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() {
                    (kind, id) = (None, None);
                    continue;
                }
                let value = serde_json::from_str(&data).map_err(|error| Error::Invalid {
                    path: "events".into(),
                    message: format!("an event's data is not JSON ({error}): {data}"),
                })?;
                return Ok(Some(Event { kind: kind.unwrap_or_else(|| "message".into()), id, data: value }));
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => kind = Some(value.to_string()),
                "id" => id = value.parse().ok(),
                "data" => {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value);
                }
                _ => {}
            }
        }
    }
}

impl Iterator for Events {
    type Item = Result<Event, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_on_blank_lines_and_comments_are_skipped() {
        let stream = ": keep-alive\n\nevent: hello\nid: 1\ndata: {\"export\":\"disk\"}\n\n\
                      event: fault\r\nid: 2\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\ndata: {}\n\n";
        let events: Vec<Event> = Events::from_reader(stream.as_bytes()).map(Result::unwrap).collect();
        assert_eq!(events.len(), 3);
        assert_eq!((events[0].kind.as_str(), events[0].id), ("hello", Some(1)));
        assert_eq!(events[0].data["export"], "disk");
        assert_eq!((events[1].kind.as_str(), events[1].data["a"].as_u64()), ("fault", Some(1)));
        assert_eq!((events[2].kind.as_str(), events[2].id), ("message", None));
    }

    #[test]
    fn data_that_is_not_json_is_an_error_naming_it() {
        let mut events = Events::from_reader("data: nope\n\n".as_bytes());
        let error = events.next().unwrap().unwrap_err().to_string();
        assert!(error.contains("nope"), "{error}");
    }
}
