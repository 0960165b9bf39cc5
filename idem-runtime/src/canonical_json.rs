//! JSON in one canonical form (object members sorted by name, no whitespace), so that two encodings of one document
//! fingerprint the same: what `once` hashes its input as, and what a route can fingerprint its body as.

/// `value` written canonically.
pub(crate) fn canonical(value: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

fn write(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            // Sorted here rather than trusting `serde_json::Map`, which keeps insertion order when any crate in the
            // build enables serde_json's `preserve_order`.
            let mut members: Vec<_> = members.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (index, (name, member)) in members.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                scalar(&serde_json::Value::from(name.as_str()), out);
                out.push(b':');
                write(member, out);
            }
            out.push(b'}');
        }
        other => scalar(other, out),
    }
}

fn scalar(value: &serde_json::Value, out: &mut Vec<u8>) {
    // Into memory, a string, number, bool or null cannot fail to serialize.
    serde_json::to_writer(out, value).expect("a JSON scalar serializes into memory");
}

#[cfg(test)]
mod tests {
    use super::canonical;
    use std::collections::HashMap;

    fn canonical_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_value(value).map(|value| canonical(&value))
    }

    #[test]
    fn equal_maps_have_one_canonical_form_whatever_their_order() {
        let forward: HashMap<String, u32> = (0..64).map(|n| (format!("k{n}"), n)).collect();
        let backward: HashMap<String, u32> = (0..64).rev().map(|n| (format!("k{n}"), n)).collect();
        assert_eq!(canonical_json(&forward).unwrap(), canonical_json(&backward).unwrap());
        let nested = serde_json::json!({ "b": [1, { "z": null, "a": "x\"y" }], "a": 1.5 });
        assert_eq!(
            String::from_utf8(canonical_json(&nested).unwrap()).unwrap(),
            r#"{"a":1.5,"b":[1,{"a":"x\"y","z":null}]}"#
        );
        assert_ne!(
            canonical_json(&serde_json::json!({ "a": 1 })).unwrap(),
            canonical_json(&serde_json::json!({ "a": 2 })).unwrap()
        );
    }
}
