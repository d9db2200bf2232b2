//! Storage (sqlx `Any`: SQLite or PostgreSQL, same SQL).
//!
//! Functions take `&mut AnyConnection` so the same code runs inside a write
//! transaction (`&mut *tx`) or on a pooled read connection.

mod events;
mod jobs;
mod logs;

pub use events::*;
pub use jobs::*;
pub use logs::*;

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::Any;

/// A value bound to a dynamically built query.
#[derive(Clone, Debug)]
pub(crate) enum Bind {
    I64(i64),
    Text(String),
    OptText(Option<String>),
    Bytes(Vec<u8>),
}

/// Builds `$n` placeholders in order for queries whose shape depends on
/// the request (filters).
#[derive(Default)]
pub(crate) struct Sql {
    pub text: String,
    pub binds: Vec<Bind>,
}

impl Sql {
    pub fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            binds: Vec::new(),
        }
    }

    pub fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    /// Appends the placeholder for `b`.
    pub fn bind(&mut self, b: Bind) -> &mut Self {
        self.binds.push(b);
        self.text.push_str(&format!("${}", self.binds.len()));
        self
    }

    pub fn query(&self) -> Query<'_, Any, AnyArguments<'_>> {
        let mut q = sqlx::query(&self.text);
        for b in &self.binds {
            q = match b {
                Bind::I64(v) => q.bind(*v),
                Bind::Text(v) => q.bind(v.clone()),
                Bind::OptText(v) => q.bind(v.clone()),
                Bind::Bytes(v) => q.bind(v.clone()),
            };
        }
        q
    }
}

pub(crate) fn bool_to_db(b: bool) -> i64 {
    i64::from(b)
}
