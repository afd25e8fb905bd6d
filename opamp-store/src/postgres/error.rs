//! What goes wrong in the PostgreSQL store, mapped into [`opamp_core::Error`] by kind.

use opamp_core::Error;

/// The backend's name in [`Error::Backend`].
pub(super) const BACKEND: &str = "postgres";

/// The PostgreSQL store's own failures; callers only ever see them as an [`Error`].
#[derive(Debug)]
pub(super) enum PgError {
    /// A statement failed; `doing` names the statement and its key.
    Query { doing: String, source: sqlx::Error },
    /// A stored value could not be read back; `row` names the table and key.
    BadRow {
        row: String,
        column: &'static str,
        problem: Error,
    },
    /// Applying the migrations failed.
    Migrate {
        schema: String,
        source: sqlx::migrate::MigrateError,
    },
}

impl PgError {
    /// For `map_err`: a failed statement, described by `doing` (called only on failure).
    pub(super) fn query<D: Into<String>>(doing: impl FnOnce() -> D) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| {
            PgError::Query {
                doing: doing().into(),
                source,
            }
            .into()
        }
    }
}

/// SQLSTATEs after which the same call may succeed: serialization failure,
/// deadlock, too many connections or other resource shortage, a server
/// shutting down or starting, a lost connection (class 08).
fn retryable(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || matches!(code, "40001" | "40P01" | "57P01" | "57P02" | "57P03")
}

impl From<PgError> for Error {
    fn from(err: PgError) -> Self {
        match err {
            PgError::Query { doing, source } => from_sqlx(doing, source),
            // The problem is named in the message, so it is not the source too.
            PgError::BadRow { row, column, problem } => Error::Backend {
                backend: BACKEND,
                message: format!("{row}: column {column} holds bad data: {problem}"),
                source: None,
            },
            PgError::Migrate { schema, source } => {
                Error::backend(BACKEND, format!("migrating schema {schema}"), source)
            }
        }
    }
}

fn from_sqlx(doing: String, source: sqlx::Error) -> Error {
    let unavailable = |doing: String, source: sqlx::Error| Error::Unavailable {
        message: doing,
        source: Some(Box::new(source)),
    };
    match &source {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|code| code.into_owned()).unwrap_or_default();
            match code.as_str() {
                code if retryable(code) => unavailable(doing, source),
                // statement_timeout or a cancel request.
                "57014" => Error::timeout(format!("{doing}: {}", db.message())),
                // undefined_table, invalid_schema_name: usually a schema never migrated.
                "42P01" | "3F000" => Error::backend(
                    BACKEND,
                    format!(
                        "{doing}: {}; has PostgresStore::migrate run for this schema?",
                        db.message()
                    ),
                    source,
                ),
                // Data exceptions (a value too long, …) and check or not-null
                // violations: the input did not fit the column.
                code if code.starts_with("22") || matches!(code, "23502" | "23514") => {
                    Error::invalid_input(format!("{doing}: {}", db.message()))
                }
                "23505" => Error::already_exists(format!("{doing}: {}", db.message())),
                _ => Error::backend(BACKEND, doing, source),
            }
        }
        // A connection cut while it opens reads as a protocol error: sqlx
        // takes the end of the stream for the answer to its SSLRequest
        // ("unexpected response from SSLRequest: 0x00"), as a proxy or load
        // balancer in front of a server that is down or restarting answers.
        // sqlx drops the connection either way, so another may succeed.
        sqlx::Error::Protocol(_)
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => unavailable(doing, source),
        _ => Error::backend(BACKEND, doing, source),
    }
}

/// Whether `err` is a foreign-key violation (the row named a missing template).
pub(super) fn is_foreign_key_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("23503"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_states() {
        for code in ["08006", "40001", "40P01", "53300", "57P01"] {
            assert!(retryable(code), "{code}");
        }
        for code in ["23505", "42P01", "22001", "57014"] {
            assert!(!retryable(code), "{code}");
        }
    }

    #[test]
    fn io_errors_are_unavailable_and_name_the_statement() {
        let err: Error = PgError::Query {
            doing: "lookup of device d1".into(),
            source: sqlx::Error::PoolTimedOut,
        }
        .into();
        assert!(err.is_retryable());
        assert!(err.to_string().contains("lookup of device d1"), "{err}");
    }

    #[test]
    fn a_connection_cut_while_it_opens_is_unavailable() {
        let err: Error = PgError::Query {
            doing: "lookup of device d1".into(),
            source: sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into()),
        }
        .into();
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    }

    #[test]
    fn bad_rows_name_the_row_and_column() {
        let err: Error = PgError::BadRow {
            row: "device_lease row device_id=\"d1\"".into(),
            column: "supervisor_id",
            problem: Error::invalid_input("supervisor id \"a b\" contains ' '"),
        }
        .into();
        let text = err.to_string();
        assert!(
            text.contains("device_lease row device_id=\"d1\": column supervisor_id"),
            "{text}"
        );
        assert!(matches!(
            err,
            Error::Backend {
                backend: "postgres",
                ..
            }
        ));
    }
}
