//! JSON as it travels in headers: ASCII only, every non-ASCII character and
//! DEL escaped as `\uXXXX` (surrogate pairs above the BMP), so the text is
//! always a valid header value and never carries CR, LF or NUL raw.

use std::io;

use bytes::Bytes;
use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};
use serde_json::{Map, Value};

struct AsciiFormatter;

impl Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let bytes = fragment.as_bytes();
        let mut start = 0;
        for (i, ch) in fragment.char_indices() {
            if ch.is_ascii() && ch != '\x7f' {
                continue;
            }
            if start < i {
                writer.write_all(&bytes[start..i])?;
            }
            let mut units = [0u16; 2];
            for u in ch.encode_utf16(&mut units) {
                write!(writer, "\\u{:04x}", u)?;
            }
            start = i + ch.len_utf8();
        }
        writer.write_all(&bytes[start..])
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        char_escape: CharEscape,
    ) -> io::Result<()> {
        serde_json::ser::CompactFormatter.write_char_escape(writer, char_escape)
    }
}

/// Serializes any JSON value as ASCII-only compact text.
pub fn to_ascii_vec<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
    v.serialize(&mut ser)
        .expect("serializing a JSON value to memory cannot fail");
    out
}

/// The canonical stored form of session data.
pub fn encode_object(map: &Map<String, Value>) -> Bytes {
    Bytes::from(to_ascii_vec(map))
}

/// Parses stored or received text as a JSON object.
pub fn parse_object(text: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// The value of a `forward` header: visible-ASCII strings as they are,
/// anything else as its (ASCII) JSON encoding.
pub fn forward_value(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) if s.bytes().all(|b| (0x20..0x7f).contains(&b)) => s.as_bytes().to_vec(),
        other => to_ascii_vec(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn non_ascii_is_escaped() {
        let v = json!({"name": "Zoë 😀", "ctl": "a\r\nb\u{0}c\u{7f}"});
        let s = String::from_utf8(to_ascii_vec(&v)).unwrap();
        assert!(s.is_ascii());
        assert!(s.contains("Zo\\u00eb \\ud83d\\ude00"), "{s}");
        assert!(s.contains("a\\r\\nb\\u0000c\\u007f"), "{s}");
        assert!(!s.bytes().any(|b| b < 0x20 || b == 0x7f));
        let back: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn forward_values() {
        assert_eq!(forward_value(&json!("alice smith")), b"alice smith");
        assert_eq!(forward_value(&json!(42)), b"42");
        assert_eq!(forward_value(&json!(true)), b"true");
        assert_eq!(
            forward_value(&json!("évil\r\nX-Admin: 1")),
            br#""\u00e9vil\r\nX-Admin: 1""#
        );
        assert_eq!(forward_value(&json!({"a": [1]})), br#"{"a":[1]}"#);
    }

    #[test]
    fn parse_object_rejects_non_objects() {
        assert!(parse_object(b"[1]").is_none());
        assert!(parse_object(b"{").is_none());
        assert_eq!(parse_object(b"{}").unwrap().len(), 0);
    }
}
