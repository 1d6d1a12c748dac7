//! A JSON Schema of the policy language, for editors (YAML language servers read JSON Schema).
//!
//! The schema checks shape, names, enumerations and the syntax of units. Checks that relate
//! several fields (an inverted range, `torn` on a read, a duplicate rule name) are left to
//! `nbdfault policy check`, which also gives the line, column and fix.

use serde_json::{Value, json};

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
    let ops = ["read", "write", "flush", "trim", "write_zeroes", "cache", "block_status"];
    let errnos = ["EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN"];
    let one_or_more =
        |item: Value| json!({ "oneOf": [item.clone(), { "type": "array", "items": item, "minItems": 1 }] });
    let name = json!({ "$ref": "#/$defs/name" });
    let flag = |description: &str| json!({ "type": "boolean", "description": description });
    let when_def = json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "op": one_or_more(json!({ "$ref": "#/$defs/op" })),
            "range": one_or_more(json!({ "$ref": "#/$defs/range" })),
            "fua": flag("Match only requests with (true) or without (false) the FUA flag."),
            "no_hole": flag("NBD_CMD_FLAG_NO_HOLE (write_zeroes)."),
            "fast_zero": flag("NBD_CMD_FLAG_FAST_ZERO (write_zeroes)."),
            "df": flag("NBD_CMD_FLAG_DF (read)."),
            "req_one": flag("NBD_CMD_FLAG_REQ_ONE (block_status)."),
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
            "probability": { "oneOf": [
                { "type": "number", "minimum": 0, "maximum": 1 },
                { "type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*%\s*$" }
            ] },
            "armed_by": { "$ref": "#/$defs/names" },
            "disarmed_by": { "$ref": "#/$defs/names" },
            "from": { "$ref": "#/$defs/duration" },
            "until": { "$ref": "#/$defs/duration" },
            "since": { "enum": ["start", "armed"] },
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
    let then_def = json!({
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
            "power_cut": { "type": "boolean" },
            "arm": { "$ref": "#/$defs/names" },
            "disarm": { "$ref": "#/$defs/names" }
        }
    });
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
            "bad_sectors": { "type": "array", "items": { "$ref": "#/$defs/bad_sector" } },
            "rules": { "type": "array", "items": { "$ref": "#/$defs/rule" } },
            "schedule": { "type": "array", "items": { "$ref": "#/$defs/schedule_entry" } }
        },
        "anyOf": [
            { "required": ["rules"] },
            { "required": ["schedule"] },
            { "required": ["bad_sectors"] }
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
