//! The control API from the guest: the shared client (`nbdfault-control-client`) bound to the
//! export the suite runs on.
//!
//! The suite uses it to put policies on the export, arm and disarm triggers, read the fault log
//! (typed [`FaultRecord`]s: what failed is the record's `reply`, not a guess from strings) and read
//! or seed the bytes the server stores below its fault layer.

use nbdfault_control_client::{Client, Health};
pub use nbdfault_control_client::{Error as ControlError, FaultRecord};

/// A client bound to one export.
pub struct Control {
    client: Client,
    export: String,
}

impl Control {
    /// `url` is the API's base (`http://10.0.2.2:10810`); `export` the export name (`""` for the
    /// default export). The guest speaks plain HTTP only.
    pub fn new(url: &str, export: &str, token: Option<String>) -> Result<Self, ControlError> {
        if !url.starts_with("http://") {
            return Err(ControlError::BadUrl {
                url: url.to_string(),
                message: "the guest reaches the control API over plain http://HOST:PORT".into(),
            });
        }
        Ok(Control { client: Client::new(url, token)?, export: export.to_string() })
    }

    /// The API's base URL.
    pub fn url(&self) -> &str {
        self.client.base()
    }

    /// `GET /v1/health`.
    pub fn health(&self) -> Result<Health, ControlError> {
        self.client.health()
    }

    /// `PUT /v1/exports/{name}/policy`.
    pub fn put_policy(&self, yaml: &str) -> Result<(), ControlError> {
        self.client.set_policy(&self.export, yaml.as_bytes()).map(drop)
    }

    /// `DELETE /v1/exports/{name}/policy`: every request passes through again.
    pub fn delete_policy(&self) -> Result<(), ControlError> {
        self.client.clear_policy(&self.export).map(drop)
    }

    /// `POST /v1/exports/{name}/triggers/{trigger}`.
    pub fn arm(&self, trigger: &str) -> Result<(), ControlError> {
        self.client.arm(&self.export, trigger).map(drop)
    }

    /// `DELETE /v1/exports/{name}/triggers/{trigger}`.
    pub fn disarm(&self, trigger: &str) -> Result<(), ControlError> {
        self.client.disarm(&self.export, trigger).map(drop)
    }

    /// The fault records with `seq > since`.
    pub fn faults_since(&self, since: u64) -> Result<Vec<FaultRecord>, ControlError> {
        Ok(self.client.faults(&self.export, since)?.records)
    }

    /// The highest sequence number in the fault log so far (0 when empty).
    pub fn last_fault_seq(&self) -> Result<u64, ControlError> {
        self.client.last_fault_seq(&self.export)
    }

    /// The bytes stored now, below the fault layer.
    pub fn read_data(&self, offset: u64, length: u64) -> Result<Vec<u8>, ControlError> {
        self.client.read_data(&self.export, offset, length)
    }

    /// Writes below the fault layer.
    pub fn write_data(&self, offset: u64, data: &[u8]) -> Result<(), ControlError> {
        self.client.write_data(&self.export, offset, data)
    }

    /// Back to the pristine contents.
    pub fn reset(&self) -> Result<(), ControlError> {
        self.client.reset(&self.export).map(drop)
    }
}

/// A fault record as the JSON the report shows.
pub fn record_json(record: &FaultRecord) -> serde_json::Value {
    serde_json::to_value(record).unwrap_or_default()
}

/// A fault record of a failed (`EIO`) or passed request, for unit tests.
#[cfg(test)]
pub fn test_record(seq: u64, offset: u64, length: u64, failed: bool) -> FaultRecord {
    let (outcome, reply, errno) = if failed { ("error", "error", r#","errno":"EIO""#) } else { ("pass", "ok", "") };
    let line = format!(
        r#"{{"seq":{seq},"time_ns":{seq},"export":"xfs","connection":1,"cookie":{seq},"request_index":{seq},"op":"write","offset":{offset},"length":{length},"flags":[],"rule":"fail-data","outcome":"{outcome}","action":"skip","reply":"{reply}"{errno},"delay_ns":0,"persisted":0}}"#
    );
    match nbdfault_policies::parse_fault_log(&line).expect("a valid record").remove(0) {
        nbdfault_policies::LogEntry::Request(record) => record,
        other => panic!("not a request record: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_url_must_be_plain_http() {
        assert!(matches!(Control::new("https://x:1", "", None), Err(ControlError::BadUrl { .. })));
        assert_eq!(Control::new("http://10.0.2.2:10810/", "disk", None).unwrap().url(), "http://10.0.2.2:10810");
    }

    #[test]
    fn a_record_fails_when_its_reply_is_an_error() {
        let records = [test_record(7, 4096, 8192, true), test_record(8, 4096, 8192, false)];
        assert!(records[0].failed() && records[0].overlaps(0, 4097) && !records[0].overlaps(0, 4096));
        assert!(!records[1].failed());
        assert_eq!(record_json(&records[0])["errno"], "EIO");
    }
}
