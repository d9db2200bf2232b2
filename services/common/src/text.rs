//! Checks on caller-supplied strings, shared by every service so that a
//! name refused by one is refused by all.

use crate::error::FieldError;

/// Characters that change how text is displayed without being seen:
/// bidirectional overrides, embeddings and isolates (which can make a name
/// read differently from what it is), zero-width characters and other
/// invisible format characters (which make two names look alike).
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// At most `max` bytes.
pub fn max_len(field: &str, s: &str, max: usize) -> Result<(), FieldError> {
    if s.len() > max {
        return Err(FieldError::new(
            field,
            format!("is {} bytes; at most {max} are allowed", s.len()),
        ));
    }
    Ok(())
}

/// No control characters (which includes NUL and newlines).
pub fn no_control(field: &str, s: &str) -> Result<(), FieldError> {
    if s.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// No NUL bytes (which no database or process argument can hold).
pub fn no_nul(field: &str, s: &str) -> Result<(), FieldError> {
    if s.contains('\0') {
        return Err(FieldError::new(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// Text people read and compare (names, label keys and values): bounded,
/// no control characters, nothing invisible.
pub fn display_text(field: &str, s: &str, max: usize) -> Result<(), FieldError> {
    max_len(field, s, max)?;
    no_control(field, s)?;
    if let Some(c) = s.chars().find(|c| is_invisible(*c)) {
        return Err(FieldError::new(
            field,
            format!(
                "must not contain invisible or text-direction characters (found U+{:04X})",
                c as u32
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_and_direction_characters_are_refused_by_name() {
        for bad in [
            "train\u{202E}gnp.exe",
            "a\u{200B}b",
            "\u{FEFF}x",
            "x\u{2066}y",
            "z\u{200D}",
        ] {
            let err = display_text("spec.name", bad, 64).unwrap_err();
            assert_eq!(err.field, "spec.name");
            assert!(err.description.contains("U+"), "{}", err.description);
        }
        display_text("spec.name", "résumé-训练-🚀", 64).unwrap();
    }

    #[test]
    fn length_is_counted_in_bytes() {
        assert!(max_len("f", "é", 1).is_err());
        assert!(max_len("f", "é", 2).is_ok());
        assert!(no_control("f", "a\nb").is_err());
        assert!(no_nul("f", "a\0b").is_err());
    }
}
