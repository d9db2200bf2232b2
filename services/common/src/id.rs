//! Typed ids: a job id can never be passed where a runner id is expected.

/// Defines a newtype over [`uuid::Uuid`] with `Display`, `FromStr` and a
/// `parse_field` constructor whose error names the offending field.
#[macro_export]
macro_rules! typed_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub ::uuid::Uuid);

        impl $name {
            /// A new time-ordered id (UUIDv7), so ids sort by creation.
            pub fn new() -> Self {
                Self(::uuid::Uuid::now_v7())
            }

            /// Parses `value` as an id; the error names `field`.
            pub fn parse_field(
                field: &str,
                value: &str,
            ) -> ::std::result::Result<Self, $crate::error::FieldError> {
                if value.is_empty() {
                    return Err($crate::error::FieldError::new(field, "is required"));
                }
                ::uuid::Uuid::parse_str(value).map(Self).map_err(|_| {
                    $crate::error::FieldError::new(field, format!("`{value}` is not a valid id"))
                })
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = ::uuid::Error;
            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                ::uuid::Uuid::parse_str(s).map(Self)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    typed_id!(
        /// A test id.
        ThingId
    );

    #[test]
    fn parse_field_names_the_field() {
        let err = ThingId::parse_field("thing_id", "nope").unwrap_err();
        assert_eq!(err.field, "thing_id");
        assert!(err.description.contains("nope"));
        let id = ThingId::new();
        assert_eq!(ThingId::parse_field("x", &id.to_string()).unwrap(), id);
    }
}
