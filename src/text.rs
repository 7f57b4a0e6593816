//! Unicode hygiene for text that came from the network and is shown to a person or searched
//! for an address: which characters display as nothing, and which look like `@` and `.`.
//!
//! One table for every consumer: the `queue` commands and the log escape these characters,
//! the `From:` check drops them before it looks for an address in a display name, and the
//! header reader drops them before it compares an authserv-id.

use std::borrow::Cow;

/// Characters that display as nothing or change how the text around them displays: format
/// characters (general category Cf), the line and paragraph separators (Zl, Zp), every
/// Default_Ignorable_Code_Point (Unicode DerivedCoreProperties.txt), and U+2800 BRAILLE
/// PATTERN BLANK, all as of Unicode 16.0. That covers U+202E RIGHT-TO-LEFT OVERRIDE, the
/// isolates U+2066..U+2069, U+200B ZERO WIDTH SPACE, the direction marks, U+FEFF, tag
/// characters, U+034F COMBINING GRAPHEME JOINER, the Hangul fillers (U+115F, U+1160, U+3164,
/// U+FFA0), the variation selectors (U+FE00..U+FE0F, U+E0100..U+E01EF) and the reserved
/// default-ignorable planes. A blank that is not a space (U+2800) hides a character just as
/// well, though it is not default-ignorable. Control characters (Cc) are `char::is_control`.
pub fn is_invisible(c: char) -> bool {
    /// Inclusive ranges, sorted, ending with a sentinel.
    const RANGES: [(u32, u32); 27] = [
        (0x00AD, 0x00AD),
        (0x034F, 0x034F),
        (0x0600, 0x0605),
        (0x061C, 0x061C),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x0890, 0x0891),
        (0x08E2, 0x08E2),
        (0x115F, 0x1160),
        (0x17B4, 0x17B5),
        (0x180B, 0x180F),
        (0x200B, 0x200F),
        (0x2028, 0x202E),
        (0x2060, 0x206F),
        (0x2800, 0x2800),
        (0x3164, 0x3164),
        (0xFE00, 0xFE0F),
        (0xFEFF, 0xFEFF),
        (0xFFA0, 0xFFA0),
        (0xFFF0, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x110CD, 0x110CD),
        (0x13430, 0x1343F),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0000, 0xE0FFF),
        (u32::MAX, u32::MAX),
    ];
    let c = c as u32;
    let i = RANGES.partition_point(|&(_, hi)| hi < c);
    RANGES[i].0 <= c
}

/// Maps the characters a reader takes for `@` (U+FF20 full-width, U+FE6B small) and for
/// `.` (U+FF0E full-width, U+3002 ideographic, U+FF61 half-width ideographic) to ASCII;
/// every other character is returned as it is.
pub fn fold_lookalike(c: char) -> char {
    match c {
        '\u{FF20}' | '\u{FE6B}' => '@',
        '\u{FF0E}' | '\u{3002}' | '\u{FF61}' => '.',
        c => c,
    }
}

/// `text` with every character of [`is_invisible`] replaced by what `escape` writes for it
/// (the rest unchanged); borrowed, with no copy, when there is none.
pub fn escape_invisible(text: &str, escape: impl Fn(char, &mut String)) -> Cow<'_, str> {
    // Every invisible character is above U+00AC: ASCII text has none (the common case, looked
    // at a word at a time).
    if text.is_ascii() || !text.chars().any(is_invisible) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_invisible(c) {
            escape(c, &mut out);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}
