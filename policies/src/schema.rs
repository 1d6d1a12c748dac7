//! A JSON Schema of the policy language, for editors (YAML language servers read JSON Schema).
//!
//! The schema checks shape, names, enumerations and the syntax of units. Checks that relate
//! several fields (an inverted range, `torn` on a read, a duplicate rule name) are left to
//! `nbdfault policy check`, which also gives the line, column and fix.

use serde_json::{Value, json};

use crate::policy::{count_values, since_values};
use crate::request::{Errno, Op};

const SIZE: &str = r"[0-9][0-9_]*\s*(B|K|KiB|M|MiB|G|GiB|T|TiB|P|PiB|s|sectors)?";
const DURATION: &str = r"[0-9_]*\.?[0-9_]+\s*(ns|us|µs|ms|s|m|min|h)";

fn anchored(pattern: &str) -> String {
    format!(r"^\s*{pattern}\s*$")
}

/// The JSON Schema (draft 2020-12) of a policy file.
pub fn json_schema() -> Value {
    let size_pattern = anchored(SIZE);
    let range_pattern = anchored(&format!(r"({SIZE})?\s*\.\.\s*(\+\s*{SIZE}|{SIZE})?"));
    let duration_pattern = anchored(&format!("(0|{DURATION})"));
    let spread_pattern = anchored(&format!(r"(0|{DURATION})(\s*\.\.\s*(0|{DURATION}))?"));
    let tear_pattern = anchored(&format!(r"{SIZE}(\s*\.\.\s*{SIZE})?"));
    let length_pattern = anchored(&format!(r"((>=|>|<=|<)\s*{SIZE}|({SIZE})?\s*\.\.\s*({SIZE})?|{SIZE})"));
    let ops: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
    let errnos: Vec<&str> = Errno::ALL.iter().map(|errno| errno.name()).collect();
    let one_or_more =
        |item: Value| json!({ "oneOf": [item.clone(), { "type": "array", "items": item, "minItems": 1 }] });
    let name = json!({ "$ref": "#/$defs/name" });
    let mut when_def = json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "op": one_or_more(json!({ "$ref": "#/$defs/op" })),
            "range": one_or_more(json!({ "$ref": "#/$defs/range" })),
            "length": one_or_more(json!({ "oneOf": [
                { "type": "integer", "minimum": 1, "maximum": 4_294_967_295u64 },
                { "type": "string", "pattern": length_pattern }
            ] })),
            "fua": { "type": "boolean" },
            "no_hole": { "type": "boolean" },
            "fast_zero": { "type": "boolean" },
            "df": { "type": "boolean" },
            "req_one": { "type": "boolean" },
            "connection": one_or_more(json!({ "type": "integer", "minimum": 0 })),
            "request": one_or_more(json!({ "type": "integer", "minimum": 0 })),
            "nth": { "oneOf": [
                { "$ref": "#/$defs/count" },
                {
                    "type": "object",
                    "additionalProperties": false,
                    "minProperties": 1,
                    "properties": {
                        "first": { "$ref": "#/$defs/count" },
                        "every": { "$ref": "#/$defs/count" },
                        "after": { "type": "integer", "minimum": 0 }
                    }
                }
            ] },
            "limit": { "$ref": "#/$defs/count" },
            "count": { "enum": count_values() },
            "probability": { "oneOf": [
                { "type": "number", "minimum": 0, "maximum": 1 },
                { "type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*%\s*$" }
            ] },
            "armed_by": { "$ref": "#/$defs/names" },
            "disarmed_by": { "$ref": "#/$defs/names" },
            "from": { "$ref": "#/$defs/duration" },
            "until": { "$ref": "#/$defs/duration" },
            "since": { "enum": since_values() },
            "cycle": {
                "type": "object",
                "additionalProperties": false,
                "required": ["up", "down"],
                "properties": {
                    "up": { "$ref": "#/$defs/duration" },
                    "down": { "$ref": "#/$defs/duration" }
                }
            }
        }
    });
    let mut then_def = json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "error": { "$ref": "#/$defs/errno" },
            "delay": { "$ref": "#/$defs/spread" },
            "stall": { "oneOf": [
                name.clone(),
                {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["until"],
                    "properties": {
                        "until": name,
                        "timeout": { "$ref": "#/$defs/duration" }
                    }
                }
            ] },
            "persist": { "type": "boolean" },
            "drop": { "type": "boolean" },
            "torn": { "oneOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": tear_pattern.clone() },
                {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["persist"],
                    "properties": {
                        "persist": { "oneOf": [
                            { "type": "integer", "minimum": 0 },
                            { "type": "string", "pattern": tear_pattern }
                        ] },
                        "align": { "$ref": "#/$defs/size" }
                    }
                }
            ] },
            "corrupt": { "oneOf": [
                { "type": "integer", "minimum": 1, "maximum": 4_294_967_295u64 },
                { "const": true },
                {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "bytes": { "type": "integer", "minimum": 1, "maximum": 4_294_967_295u64 },
                        "seed": { "type": "integer", "minimum": 0 }
                    }
                }
            ] },
            "sticky": { "type": "boolean" },
            "disconnect": { "type": "boolean" },
            "power_cut": { "oneOf": [
                { "type": "boolean" },
                {
                    "type": "object",
                    "additionalProperties": false,
                    "minProperties": 1,
                    "properties": {
                        "until": name.clone(),
                        "timeout": { "$ref": "#/$defs/duration" }
                    }
                }
            ] },
            "arm": { "$ref": "#/$defs/names" },
            "disarm": { "$ref": "#/$defs/names" }
        }
    });
    describe(&mut when_def, WHEN_DESCRIPTIONS);
    let every_op = ops.join(", ");
    when_def["properties"]["op"]["description"] =
        Value::from(format!("{every_op}, or a list. Default: every operation."));
    describe(&mut then_def, THEN_DESCRIPTIONS);
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/nbdfault/nbdfault/policy.schema.json",
        "title": "nbdfault policy",
        "description": "Which NBD requests of an export fail, how and when. See docs/policy-reference.md.",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "seed": { "type": "integer", "minimum": 0, "description": "Every random choice derives from it." },
            "description": { "type": "string" },
            "volatile_cache": { "type": "boolean", "description": "The device loses writes not yet flushed in a power cut (a rule's or the control API's); the server journals them. Default: whether a rule has power_cut." },
            "bad_sectors": { "type": "array", "items": { "$ref": "#/$defs/bad_sector" } },
            "rules": { "type": "array", "items": { "$ref": "#/$defs/rule" } },
            "schedule": { "type": "array", "items": { "$ref": "#/$defs/schedule_entry" } }
        },
        "anyOf": [
            { "required": ["rules"] },
            { "required": ["schedule"] },
            { "required": ["bad_sectors"] },
            { "required": ["volatile_cache"], "properties": { "volatile_cache": { "const": true } } }
        ],
        "$defs": {
            "name": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$" },
            "names": one_or_more(name.clone()),
            "op": { "enum": ops },
            "errno": { "enum": errnos, "description": "The Linux NBD client turns every one of these into EIO." },
            "size": { "oneOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": size_pattern }
            ] },
            "range": { "type": "string", "pattern": range_pattern, "description": "Half-open: START..END, START..+LENGTH or START.." },
            "duration": { "oneOf": [
                { "const": 0 },
                { "type": "string", "pattern": duration_pattern }
            ] },
            "spread": { "oneOf": [
                { "const": 0 },
                { "type": "string", "pattern": spread_pattern }
            ] },
            "count": { "type": "integer", "minimum": 1 },
            "bad_sector": { "oneOf": [
                { "$ref": "#/$defs/range" },
                {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["range"],
                    "properties": {
                        "range": { "$ref": "#/$defs/range" },
                        "error": { "$ref": "#/$defs/errno" },
                        "write_failures": { "type": "integer", "minimum": 0, "maximum": 4_294_967_295u64 },
                        "name": name
                    }
                }
            ] },
            "rule": {
                "type": "object",
                "additionalProperties": false,
                "required": ["then"],
                "properties": {
                    "name": name,
                    "description": { "type": "string" },
                    "when": { "$ref": "#/$defs/when" },
                    "then": { "$ref": "#/$defs/then" }
                }
            },
            "when": when_def,
            "then": then_def,
            "schedule_entry": {
                "type": "object",
                "additionalProperties": false,
                "required": ["request", "op", "rule", "then"],
                "properties": {
                    "request": { "type": "integer", "minimum": 0 },
                    "op": { "$ref": "#/$defs/op" },
                    "rule": name,
                    "then": { "$ref": "#/$defs/then" },
                    "bad_sector": { "type": "boolean" }
                }
            }
        }
    })
}

/// Hover texts for editors, one per field of `when` (`op`'s lists the operations, so it is built).
const WHEN_DESCRIPTIONS: &[(&str, &str)] = &[
    ("range", "Half-open byte range(s) the request must overlap: 1MiB..2MiB, 1MiB..+4KiB, 1GiB.. (flush has none)."),
    (
        "length",
        "The request's length: 64KiB exactly, 4KiB..64KiB (both included), 1MiB.., \">=1MiB\" (quoted), or a list. Flush has none.",
    ),
    ("fua", "Match only requests with (true) or without (false) the FUA flag."),
    ("no_hole", "Match on NBD_CMD_FLAG_NO_HOLE (write_zeroes)."),
    ("fast_zero", "Match on NBD_CMD_FLAG_FAST_ZERO (write_zeroes)."),
    ("df", "Match on NBD_CMD_FLAG_DF (read)."),
    ("req_one", "Match on NBD_CMD_FLAG_REQ_ONE (block_status)."),
    ("connection", "The server's connection number(s), as in the fault log."),
    ("request", "Request index(es) in the export's stream, from 0, as in the fault log."),
    ("nth", "Which occurrences fire: N (exactly the N-th), or { after: N, every: N, first: N }."),
    ("limit", "Decide at most this many requests."),
    ("probability", "Seeded chance of firing per occurrence: 0.25 or 25%."),
    (
        "count",
        "What nth, limit and the probability draws count over: per_arming (restart at each arming of armed_by; the default with armed_by) or lifetime.",
    ),
    ("armed_by", "Active only while all these triggers are armed."),
    ("disarmed_by", "Inactive while any of these triggers is armed."),
    ("from", "Active from this time on (see since)."),
    ("until", "Active before this time (see since)."),
    ("since", "What from, until and cycle count from: start (server start) or armed (arming of armed_by)."),
    ("cycle", "dm-flakey intervals: active only in the down part of each up + down period."),
];

/// Hover texts for editors, one per field of `then`.
const THEN_DESCRIPTIONS: &[(&str, &str)] = &[
    ("error", "Reply with this errno; the I/O is not done unless persist is set. Linux turns every errno into EIO."),
    ("delay", "Hold only this request, then act and reply: 50ms, or a seeded choice in 10ms..200ms."),
    ("stall", "Hold this request until the trigger is armed, or the timeout passes."),
    ("persist", "With error or disconnect: do the write anyway (persisted but reported failed)."),
    ("drop", "Report success without doing the write (silent loss)."),
    ("torn", "Write only the first bytes: 4KiB, 8s, or { persist: 0..3584, align: 512 }."),
    ("corrupt", "Return read data with this many bytes damaged, chosen from the seed."),
    ("sticky", "With error on a write: the range keeps failing reads until a write succeeds over it."),
    ("disconnect", "Close the connection without replying."),
    (
        "power_cut",
        "Cut the export's power: drop every connection of the export and undo every write not yet flushed; { until: TRIGGER, timeout: 30s } keeps it off (connections refused) until then.",
    ),
    ("arm", "Arm these triggers after this decision."),
    ("disarm", "Disarm these triggers after this decision."),
];

fn describe(definition: &mut Value, descriptions: &[(&str, &str)]) {
    let Some(properties) = definition.get_mut("properties").and_then(Value::as_object_mut) else { return };
    for (field, text) in descriptions {
        if let Some(Value::Object(property)) = properties.get_mut(*field) {
            property.insert("description".to_string(), Value::from(*text));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::mapping_keys;

    /// Where each mapping of the grammar has its `properties` in the schema.
    const MAPPINGS: &[(&str, &str)] = &[
        ("policy", ""),
        ("bad_sector", "/$defs/bad_sector/oneOf/1"),
        ("rule", "/$defs/rule"),
        ("when", "/$defs/when"),
        ("nth", "/$defs/when/properties/nth/oneOf/1"),
        ("cycle", "/$defs/when/properties/cycle"),
        ("then", "/$defs/then"),
        ("stall", "/$defs/then/properties/stall/oneOf/1"),
        ("torn", "/$defs/then/properties/torn/oneOf/2"),
        ("corrupt", "/$defs/then/properties/corrupt/oneOf/2"),
        ("power_cut", "/$defs/then/properties/power_cut/oneOf/1"),
        ("schedule_entry", "/$defs/schedule_entry"),
    ];

    #[test]
    fn every_mapping_of_the_schema_has_exactly_the_keys_the_parser_reads() {
        let schema = json_schema();
        let keys = mapping_keys();
        assert_eq!(keys.len(), MAPPINGS.len());
        for (mapping, fields) in keys {
            let pointer = MAPPINGS.iter().find(|(name, _)| *name == mapping).map(|(_, pointer)| *pointer);
            let pointer = pointer.unwrap_or_else(|| panic!("no schema location for `{mapping}`"));
            let properties = schema
                .pointer(&format!("{pointer}/properties"))
                .and_then(Value::as_object)
                .unwrap_or_else(|| panic!("no properties at {pointer}"));
            let mut in_schema: Vec<&str> = properties.keys().map(String::as_str).collect();
            let mut read: Vec<&str> = fields.to_vec();
            in_schema.sort_unstable();
            read.sort_unstable();
            assert!(!read.is_empty(), "no fields read for `{mapping}`");
            assert_eq!(in_schema, read, "the schema's `{mapping}` differs from what the parser reads");
        }
    }

    #[test]
    fn the_schema_enumerates_every_operation_errno_and_since_value() {
        let schema = json_schema();
        let ops: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
        assert_eq!(schema["$defs"]["op"]["enum"], json!(ops));
        let errnos: Vec<&str> = Errno::ALL.iter().map(|errno| errno.name()).collect();
        assert_eq!(schema["$defs"]["errno"]["enum"], json!(errnos));
        assert_eq!(schema["$defs"]["when"]["properties"]["since"]["enum"], json!(["start", "armed"]));
        assert_eq!(schema["$defs"]["when"]["properties"]["count"]["enum"], json!(["per_arming", "lifetime"]));
    }

    #[test]
    fn every_field_of_when_and_then_has_a_description_for_editors() {
        let schema = json_schema();
        for definition in ["when", "then"] {
            let properties = schema["$defs"][definition]["properties"].as_object().unwrap();
            for (field, property) in properties {
                assert!(
                    property.get("description").is_some_and(Value::is_string),
                    "{definition}.{field} has no description"
                );
            }
        }
    }
}
