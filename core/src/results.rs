//! Rich results of a `run_code` cell ([`RichResult`]): what a notebook would display besides
//! the text on stdout. The final expression's value with every representation it has, and each
//! matplotlib figure as a PNG.
//!
//! The guest's interpreter sends them as one JSON record (a list of [`RichResult`]s in their
//! serde form: PNG bytes as standard base64); [`RichResult::decode_list`] reads it with the
//! caps below checked before anything is allocated from it, since a guest is untrusted. It
//! names only the snapshot module's bounded-sequence reader, which names nothing of it.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Most results one cell may give (the guest drivers stop adding at this many).
pub const MAX_RESULTS: usize = 64;
/// Most bytes the encoded results record of one cell may take.
pub const MAX_RECORD_BYTES: usize = 32 << 20;
/// Most bytes of JSON text all the `json` representations of one record may take together
/// (parsed into a tree, JSON text can take many times its length).
pub const MAX_JSON_BYTES: usize = 1 << 20;

/// One rich result of a cell: the representations one object has, each `None` where it has
/// none. The final expression's value has `text` (its `repr`) and whatever `_repr_html_`,
/// `_repr_markdown_`, `_repr_png_`, `_repr_svg_` and `_repr_json_` it defines gave (a pandas
/// DataFrame: text and HTML); a matplotlib figure has `png` only.
///
/// Serialized (the record the guest sends, and `Execution`'s serde form) as a JSON object
/// whose absent representations are left out, `png` as standard base64.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RichResult {
    /// Plain text (`repr` of the value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// An HTML fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Markdown text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub markdown: Option<String>,
    /// A PNG image's bytes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "png_out",
        deserialize_with = "png_in"
    )]
    pub png: Option<Vec<u8>>,
    /// An SVG document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svg: Option<String>,
    /// A JSON value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// True for the value of the cell's final expression (at most one result of a cell).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_main_result: bool,
}

/// Why a results record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultsError {
    /// The record is longer than [`MAX_RECORD_BYTES`].
    #[error("the rich results record is {len} bytes, more than the {MAX_RECORD_BYTES} allowed")]
    TooLarge { len: usize },
    /// The record is not a list of at most [`MAX_RESULTS`] results, its JSON values take more
    /// than [`MAX_JSON_BYTES`], or a PNG is not base64.
    #[error("the rich results record is malformed: {0}")]
    Malformed(String),
}

/// A result as the record holds it: `json` still as text, so its size is checked before it
/// is parsed into a tree.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    html: Option<String>,
    #[serde(default)]
    markdown: Option<String>,
    #[serde(default, deserialize_with = "png_in")]
    png: Option<Vec<u8>>,
    #[serde(default)]
    svg: Option<String>,
    #[serde(default)]
    json: Option<Box<RawValue>>,
    #[serde(default)]
    is_main_result: bool,
}

impl RichResult {
    /// Decodes a results record (a JSON list of results), checking [`MAX_RECORD_BYTES`] before
    /// parsing, [`MAX_RESULTS`] as the list is read and [`MAX_JSON_BYTES`] before any `json`
    /// value is parsed into a tree. Unknown fields are refused.
    pub fn decode_list(record: &[u8]) -> Result<Vec<RichResult>, ResultsError> {
        if record.len() > MAX_RECORD_BYTES {
            return Err(ResultsError::TooLarge { len: record.len() });
        }
        let bad = |e: serde_json::Error| ResultsError::Malformed(e.to_string());
        let mut de = serde_json::Deserializer::from_slice(record);
        let wire: Vec<Wire> =
            crate::snapshot::bounded_vec::<_, _, MAX_RESULTS>(&mut de).map_err(bad)?;
        de.end().map_err(bad)?;
        let json_bytes: usize = wire
            .iter()
            .filter_map(|w| w.json.as_ref())
            .map(|j| j.get().len())
            .sum();
        if json_bytes > MAX_JSON_BYTES {
            return Err(ResultsError::Malformed(format!(
                "its JSON values take {json_bytes} bytes, more than the {MAX_JSON_BYTES} allowed"
            )));
        }
        wire.into_iter()
            .map(|w| {
                let json = match w.json {
                    Some(raw) => Some(serde_json::from_str(raw.get()).map_err(bad)?),
                    None => None,
                };
                Ok(RichResult {
                    text: w.text,
                    html: w.html,
                    markdown: w.markdown,
                    png: w.png,
                    svg: w.svg,
                    json,
                    is_main_result: w.is_main_result,
                })
            })
            .collect()
    }

    /// Encodes `results` as a record [`decode_list`](Self::decode_list) reads back.
    pub fn encode_list(results: &[RichResult]) -> String {
        serde_json::to_string(results).expect("results serialize")
    }
}

fn png_out<S: Serializer>(png: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match png {
        Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
        None => s.serialize_none(),
    }
}

fn png_in<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("png is not base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<RichResult> {
        vec![
            RichResult {
                png: Some(b"\x89PNG\r\n\x1a\n...".to_vec()),
                ..Default::default()
            },
            RichResult {
                text: Some("   a\n0  1".into()),
                html: Some("<table><th>a</th></table>".into()),
                json: Some(serde_json::json!({"a": [1, 2.5, null]})),
                is_main_result: true,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn records_round_trip_and_leave_out_what_is_absent() {
        let rec = RichResult::encode_list(&sample());
        assert!(rec.starts_with("[{\"png\":\"iVBORw0KGgo"), "{rec}");
        assert!(!rec.contains("null,") && !rec.contains("\"svg\""), "{rec}");
        assert_eq!(RichResult::decode_list(rec.as_bytes()).unwrap(), sample());
        assert_eq!(RichResult::decode_list(b"[]").unwrap(), vec![]);
    }

    #[test]
    fn oversized_records_are_refused_before_parsing() {
        let one = RichResult::encode_list(&sample()[..1]);
        let item = &one[1..one.len() - 1];
        let too_many = format!("[{}]", vec![item; MAX_RESULTS + 1].join(","));
        assert!(matches!(
            RichResult::decode_list(too_many.as_bytes()),
            Err(ResultsError::Malformed(m)) if m.contains("at most 64 elements")
        ));
        let just = format!("[{}]", vec![item; MAX_RESULTS].join(","));
        assert_eq!(RichResult::decode_list(just.as_bytes()).unwrap().len(), 64);
        let huge = vec![b' '; MAX_RECORD_BYTES + 1];
        assert_eq!(
            RichResult::decode_list(&huge),
            Err(ResultsError::TooLarge { len: huge.len() })
        );
        let big_json = format!("[{{\"json\":[{}0]}}]", "0,".repeat(MAX_JSON_BYTES / 2));
        assert!(matches!(
            RichResult::decode_list(big_json.as_bytes()),
            Err(ResultsError::Malformed(m)) if m.contains("JSON values")
        ));
        for bad in [
            &b"{}"[..],
            b"[{\"png\":\"not base64!\"}]",
            b"[{\"text\":1}]",
            b"[{\"other\":\"x\"}]",
            b"[] []",
        ] {
            assert!(
                matches!(
                    RichResult::decode_list(bad),
                    Err(ResultsError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        /// Any results encode to a record that decodes to the same results.
        #[test]
        fn any_results_round_trip(
            items in proptest::collection::vec(
                (
                    proptest::option::of(".*"),
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                    proptest::option::of(any::<i64>()),
                    any::<bool>(),
                ),
                0..8,
            ),
        ) {
            let results: Vec<RichResult> = items
                .into_iter()
                .map(|(text, png, n, main)| RichResult {
                    svg: text.clone(),
                    text,
                    png,
                    json: n.map(serde_json::Value::from),
                    is_main_result: main,
                    ..Default::default()
                })
                .collect();
            let rec = RichResult::encode_list(&results);
            prop_assert_eq!(RichResult::decode_list(rec.as_bytes()).unwrap(), results);
        }

        /// Random byte edits of a valid record decode or are refused with a typed error,
        /// never a panic.
        #[test]
        fn hostile_records_decode_or_are_refused(
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut rec = RichResult::encode_list(&sample()).into_bytes();
            for (at, b) in edits {
                let i = at.index(rec.len());
                rec[i] = b;
            }
            match RichResult::decode_list(&rec) {
                Ok(r) => prop_assert!(r.len() <= MAX_RESULTS),
                Err(e) => prop_assert!(matches!(e, ResultsError::Malformed(_)), "{:?}", e),
            }
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = RichResult::decode_list(&bytes);
        }
    }
}
