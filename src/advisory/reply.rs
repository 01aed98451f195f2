//! Replies of the simple protocol, read as text: what every kind's statements are decoded
//! from (each kind's decoders sit with its SQL).

use postgres::{Client, SimpleQueryMessage};

use crate::error::Failure;

/// One row of a reply, every column as text (`None` for NULL or a missing column).
pub(crate) type Row = Vec<Option<String>>;
/// Runs a simple-protocol batch and returns its rows as text.
pub(crate) fn simple(client: &mut Client, sql: &str) -> Result<Vec<Row>, postgres::Error> {
    Ok(rows(client.simple_query(sql)?))
}

pub(crate) fn rows(messages: Vec<SimpleQueryMessage>) -> Vec<Row> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.try_get(i).ok().flatten().map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The last row of a reply (empty if none).
pub(crate) fn last(mut rows: Vec<Row>) -> Row {
    rows.pop().unwrap_or_default()
}

/// Column `i` of a row; `None` for NULL or a missing column. Never panics.
pub(crate) fn col(row: &Row, i: usize) -> Option<&str> {
    row.get(i).and_then(|c| c.as_deref())
}

/// A boolean as the simple protocol (`t`) or a text cast (`true`) prints it.
pub(crate) fn truthy(value: Option<&str>) -> bool {
    matches!(value, Some("t" | "true"))
}

/// Classifies an error, also looking at the client: a session ended by the server is
/// first reported as a FATAL error on a client that does not know yet that it is closed.
pub(crate) fn failure_of(client: &Client, e: &postgres::Error) -> Failure {
    if client.is_closed() {
        Failure::Closed
    } else {
        Failure::of(e)
    }
}

/// Runs a cleanup batch; runs it once more if a cancel request cancelled it (a cancel
/// request can arrive after the statement it was meant for).
pub(crate) fn run_retrying(client: &mut Client, sql: &str) -> Result<Vec<Row>, postgres::Error> {
    match simple(client, sql) {
        Err(e) if failure_of(client, &e) == Failure::Canceled => simple(client, sql),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_without_panicking() {
        let row: Row = vec![Some("t".into()), None];
        assert!(truthy(col(&row, 0)));
        assert_eq!(col(&row, 1), None);
        assert_eq!(col(&row, 7), None);
        assert!(!truthy(Some("false")));
        assert!(last(Vec::new()).is_empty());
    }
}
