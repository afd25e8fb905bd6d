//! Reading rows back into domain types, with errors naming the row and column,
//! and times to and from `TIMESTAMPTZ`.

use opamp_core::{Error, Result, Timestamp};
use sqlx::Row;
use sqlx::postgres::PgRow;
use time::OffsetDateTime;

use super::error::PgError;

/// A `Timestamp` as a `TIMESTAMPTZ` parameter.
pub(super) fn sql_time(at: Timestamp) -> Result<OffsetDateTime> {
    // Timestamps span the years 0000–9999, which `time` represents; the error is unreachable.
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(at.unix_millis()) * 1_000_000)
        .map_err(|err| Error::invalid_input(format!("timestamp {at} as TIMESTAMPTZ: {err}")))
}

/// A `TIMESTAMPTZ` as a `Timestamp`, to the millisecond (rounded down).
fn from_sql_time(at: OffsetDateTime) -> Result<Timestamp> {
    i64::try_from(at.unix_timestamp_nanos().div_euclid(1_000_000))
        .ok()
        .and_then(Timestamp::from_unix_millis)
        .ok_or_else(|| Error::invalid_input(format!("{at} is outside the years 0000–9999")))
}

/// One fetched row and the name of its table and key, for errors.
pub(super) struct RowReader<'r> {
    row: &'r PgRow,
    name: &'r dyn Fn() -> String,
}

impl<'r> RowReader<'r> {
    /// Reads `row`; `name` says which row it is (`device_lease row device_id="d1"`).
    pub(super) fn new(row: &'r PgRow, name: &'r dyn Fn() -> String) -> Self {
        RowReader { row, name }
    }

    fn bad(&self, column: &'static str, problem: Error) -> Error {
        PgError::BadRow {
            row: (self.name)(),
            column,
            problem,
        }
        .into()
    }

    /// The raw value of `column`; a type mismatch (a column altered by hand) names it.
    pub(super) fn get<T>(&self, column: &'static str) -> Result<T>
    where
        T: for<'a> sqlx::Decode<'a, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        self.row
            .try_get(column)
            .map_err(|err| self.bad(column, Error::invalid_input(err.to_string())))
    }

    /// The text of a non-null `column`, parsed by `parse` (a name type's `new`).
    pub(super) fn parsed<T>(&self, column: &'static str, parse: impl FnOnce(&str) -> Result<T>) -> Result<T> {
        let text: String = self.get(column)?;
        stored(self.name, column, &text, parse)
    }

    /// The text of a nullable `column`, parsed by `parse` when present.
    pub(super) fn parsed_opt<T>(
        &self,
        column: &'static str,
        parse: impl FnOnce(&str) -> Result<T>,
    ) -> Result<Option<T>> {
        match self.get::<Option<String>>(column)? {
            Some(text) => stored(self.name, column, &text, parse).map(Some),
            None => Ok(None),
        }
    }

    /// A non-null `TIMESTAMPTZ` column.
    pub(super) fn time(&self, column: &'static str) -> Result<Timestamp> {
        from_sql_time(self.get(column)?).map_err(|problem| self.bad(column, problem))
    }

    /// A nullable `TIMESTAMPTZ` column.
    pub(super) fn time_opt(&self, column: &'static str) -> Result<Option<Timestamp>> {
        self.get::<Option<OffsetDateTime>>(column)?
            .map(|at| from_sql_time(at).map_err(|problem| self.bad(column, problem)))
            .transpose()
    }
}

/// Parses `text`, read from `column` of the row `row` names; bad text is an
/// error naming the row and the column.
pub(super) fn stored<T>(
    row: impl FnOnce() -> String,
    column: &'static str,
    text: &str,
    parse: impl FnOnce(&str) -> Result<T>,
) -> Result<T> {
    parse(text).map_err(|problem| {
        PgError::BadRow {
            row: row(),
            column,
            problem,
        }
        .into()
    })
}

/// The name of a row keyed by one text column, for errors: `table row key="value"`.
pub(super) fn row_name(table: &str, key: &str, value: &str) -> String {
    format!("{table} row {key}={value:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_to_the_millisecond() {
        for millis in [0, 1, -1, 1_769_509_800_123, 253_402_300_799_999, -62_167_219_200_000] {
            let at = Timestamp::from_unix_millis(millis).unwrap();
            assert_eq!(from_sql_time(sql_time(at).unwrap()).unwrap(), at);
        }
        let micros = OffsetDateTime::from_unix_timestamp_nanos(1_500_999).unwrap();
        assert_eq!(from_sql_time(micros).unwrap().unix_millis(), 1);
    }
}
