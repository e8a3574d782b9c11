//! Reads what the agent wrote back to an HTTP/1 client as the client would: a sequence
//! of responses, each framed by its length, its chunks, or the connection's end.

/// Headers a response may carry.
const MAX_HEADERS: usize = 100;

/// The statuses of the responses `answer` is made of, in order; an error says where it
/// stops being a response.
pub(super) fn statuses(answer: &[u8]) -> Result<Vec<u16>, String> {
    let mut statuses = Vec::new();
    let mut at = 0;
    while at < answer.len() {
        let rest = &answer[at..];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut rsp = httparse::Response::new(&mut headers);
        let head = match rsp.parse(rest) {
            Ok(httparse::Status::Complete(head)) => head,
            other => {
                return Err(format!(
                    "at byte {at}, no response head ({other:?}): {}",
                    shown(rest)
                ));
            }
        };
        let status = rsp.code.unwrap_or(0);
        if !(100..=599).contains(&status) {
            return Err(format!("at byte {at}, status {status}"));
        }
        statuses.push(status);
        at += head;
        let header = |name: &str| {
            rsp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        if status == 101 {
            // The connection no longer speaks HTTP.
            break;
        }
        if (100..200).contains(&status) || status == 204 || status == 304 {
            continue;
        }
        if header("transfer-encoding").is_some() {
            at += chunked(&answer[at..]).map_err(|e| format!("at byte {at}: {e}"))?;
            continue;
        }
        let Some(length) = header("content-length") else {
            // The body runs to the connection's end (or a tunnel follows).
            break;
        };
        let length: usize = std::str::from_utf8(length)
            .ok()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| format!("at byte {at}, content-length {}", shown(length)))?;
        let next = |from: usize| {
            answer
                .get(from..)
                .is_some_and(|r| r.is_empty() || r.starts_with(b"HTTP/1."))
        };
        if next(at + length) {
            at += length;
        } else if !next(at) {
            // (A response to HEAD carries the length of a body it leaves out.)
            return Err(format!(
                "at byte {at}, a body of {length} bytes is not followed by a response or the end: {}",
                shown(&answer[at..])
            ));
        }
    }
    Ok(statuses)
}

/// The length of a chunked body at the start of `body`, trailers included.
fn chunked(body: &[u8]) -> Result<usize, String> {
    let mut at = 0;
    loop {
        let line = line(body, at).ok_or("a chunk size line is cut short")?;
        let size = std::str::from_utf8(&body[at..line])
            .ok()
            .map(|l| l.split(';').next().unwrap_or_default().trim())
            .and_then(|hex| usize::from_str_radix(hex, 16).ok())
            .ok_or_else(|| format!("chunk size {}", shown(&body[at..line])))?;
        at = line + 2;
        if size == 0 {
            break;
        }
        if body.get(at + size..at + size + 2) != Some(b"\r\n") {
            return Err(format!("a chunk of {size} bytes is not ended by CRLF"));
        }
        at += size + 2;
    }
    // Trailer lines, up to an empty one.
    loop {
        let end = line(body, at).ok_or("the trailers are cut short")?;
        let empty = end == at;
        at = end + 2;
        if empty {
            return Ok(at);
        }
    }
}

/// Where the CRLF of the line starting at `from` is.
fn line(bytes: &[u8], from: usize) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn shown(bytes: &[u8]) -> String {
    format!(
        "{:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(120)])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_responses_framed_by_length_chunks_or_the_end() {
        let two = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhiHTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n2;x=1\r\nno\r\n0\r\nx-t: 1\r\n\r\nHTTP/1.0 200 OK\r\n\r\nto the end";
        assert_eq!(statuses(two), Ok(vec![100, 200, 404, 200]));
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(statuses(head), Ok(vec![200, 400]), "a response to HEAD");
    }

    #[test]
    fn a_body_cut_or_followed_by_garbage_is_not_a_response() {
        assert!(statuses(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhi").is_err());
        assert!(statuses(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhix").is_err());
        assert!(statuses(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhi").is_err());
        assert!(statuses(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(statuses(b"garbage").is_err());
    }
}
