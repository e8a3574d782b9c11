//! Splits a multi-document YAML file into documents and parses each on its own, so that
//! a syntax error in one document does not hide the others (as `kubectl apply -f` does).

use serde_yaml_ng::Value;

/// One document of a YAML file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Document<'a> {
    /// 0-based position among the file's documents.
    pub index: usize,
    /// 1-based line where the document starts (its `---`, if any).
    pub line: usize,
    /// The document's text.
    pub text: &'a str,
}

/// Whether a line is a document separator: `---` alone or followed by whitespace.
fn is_separator(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// Whether text holds anything but blank lines, comments and directives.
fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        !(l.is_empty() || l.starts_with('#') || l.starts_with('%'))
    })
}

/// Splits `text` at `---` lines. Text before the first separator is a document only if it
/// holds more than comments, as in the YAML spec, so numbering matches what users count.
pub fn split(text: &str) -> Vec<Document<'_>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut starts = vec![(0usize, 1usize)];
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if i > 0 && is_separator(line) {
            starts.push((offset, i + 1));
        }
        offset += line.len();
    }
    let leading_separator = text.split_inclusive('\n').next().is_some_and(is_separator);
    let mut docs = Vec::with_capacity(starts.len());
    for (n, &(start, line)) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(text.len(), |&(next, _)| next);
        let chunk = &text[start..end];
        if n == 0 && !leading_separator && starts.len() > 1 && !has_content(chunk) {
            continue;
        }
        docs.push(Document {
            index: docs.len(),
            line,
            text: chunk,
        });
    }
    docs
}

/// Parses one document. Error messages carry line numbers of the whole file.
pub fn parse(doc: &Document<'_>) -> Result<Value, String> {
    // The document is parsed alone and the line of an error moved by the lines before
    // it. (Padding the document with those lines instead made reading a file quadratic:
    // 2,000 documents in a 34,000-line file were 80 MB of YAML to scan at every reload.)
    let mut value: Value = serde_yaml_ng::from_str(doc.text).map_err(|e| in_file(&e, doc.line))?;
    // Kubernetes accepts YAML merge keys (`<<: *base`), so we do too.
    value
        .apply_merge()
        .map_err(|e| format!("cannot apply a YAML merge key: {e}"))?;
    Ok(value)
}

/// `error`'s message with every `at line N` in it (the error's, and the context's
/// such as "while parsing a flow sequence at line N") counted from the file's line 1,
/// for a document that starts at line `first`.
fn in_file(error: &serde_yaml_ng::Error, first: usize) -> String {
    const AT: &str = "at line ";
    let message = error.to_string();
    let offset = first.saturating_sub(1);
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message.as_str();
    while let Some(found) = rest.find(AT) {
        let (before, after) = rest.split_at(found + AT.len());
        out.push_str(before);
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match after[..digits].parse::<usize>() {
            Ok(line) => out.push_str(&(line + offset).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_separator_lines_and_counts_like_yaml() {
        let text = "# header\na: 1\n---\nb: 2\n--- # third\nc: 3\n";
        let docs = split(text);
        assert_eq!(docs.len(), 3);
        assert_eq!((docs[0].index, docs[0].line), (0, 1));
        assert_eq!((docs[1].index, docs[1].line), (1, 3));
        assert_eq!((docs[2].index, docs[2].line), (2, 5));
        assert_eq!(parse(&docs[2]).unwrap()["c"], Value::from(3));

        // A leading `---` or a comment-only preamble is not a document of its own.
        let docs = split("# only comments\n---\na: 1\n---\nb: 2\n");
        assert_eq!(docs.len(), 2);
        assert_eq!(parse(&docs[0]).unwrap()["a"], Value::from(1));
        let docs = split("---\na: 1\n");
        assert_eq!(docs.len(), 1);
        assert_eq!(parse(&docs[0]).unwrap()["a"], Value::from(1));
    }

    #[test]
    fn separators_need_a_line_of_their_own() {
        let docs = split("a: |\n  ---\n  text\nb: ---x\n----\n");
        assert_eq!(docs.len(), 1, "indented --- and ---- are not separators");
        let docs = split("a: 1\r\n---\r\nb: 2\r\n");
        assert_eq!(docs.len(), 2, "CRLF files split too");
    }

    #[test]
    fn a_syntax_error_stays_in_its_document_and_names_the_file_line() {
        let text = "a: 1\n---\nb: [unclosed\n---\nc: 3\n";
        let docs = split(text);
        assert_eq!(docs.len(), 3);
        assert!(parse(&docs[0]).is_ok());
        let err = parse(&docs[1]).unwrap_err();
        assert!(err.contains("line 4") || err.contains("line 3"), "{err}");
        assert_eq!(
            err,
            "did not find expected ',' or ']' at line 4 column 1, \
             while parsing a flow sequence at line 3 column 4",
            "both places counted in the file"
        );
        assert_eq!(parse(&docs[2]).unwrap()["c"], Value::from(3));
    }

    #[test]
    fn empty_documents_parse_to_null_and_merge_keys_apply() {
        let docs = split("a: 1\n---\n# nothing\n---\nbase: &b {x: 1}\nderived: {<<: *b, y: 2}\n");
        assert_eq!(parse(&docs[1]).unwrap(), Value::Null);
        let merged = parse(&docs[2]).unwrap();
        assert_eq!(merged["derived"]["x"], Value::from(1));
    }
}
