//! The prompt template parser and expansion (SPEC §3): any template and variables either
//! expand within the limits or are refused with a `TemplateError`; never a panic, never a
//! prompt past `prompt_chars_max`, never more items than allowed.
//!
//! Input: `template \0 name \x01 value \x01 value \0 name \x01 value …` (lossy UTF-8).

#![no_main]

use libfuzzer_sys::fuzz_target;
use reelbatch::engine::batch::template::{Expansion, TemplateLimits};

/// Small limits, so that the fuzzer reaches them.
const LIMITS: TemplateLimits = TemplateLimits {
    template_chars_max: 400,
    variables_max: 6,
    values_per_variable_max: 50,
    value_chars_max: 60,
    prompt_chars_max: 500,
};
const ITEMS_MAX: u64 = 2_000;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let template = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let variables: Vec<(String, Vec<String>)> = parts
        .take(LIMITS.variables_max + 2)
        .map(|p| {
            let mut fields = p.split(|&b| b == 1);
            let name = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
            let values = fields
                .take(LIMITS.values_per_variable_max + 2)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            (name, values)
        })
        .collect();
    let Ok(e) = Expansion::new(&template, &variables, &LIMITS, ITEMS_MAX) else {
        return;
    };
    let n = e.count();
    assert!((1..=ITEMS_MAX).contains(&n), "{n} items");
    // The product of the list lengths is the item count.
    let product = e
        .variables()
        .iter()
        .try_fold(1u64, |acc, (_, v)| acc.checked_mul(v.len() as u64));
    assert_eq!(product, Some(n));
    for i in [0, n / 2, n - 1] {
        let p = e.prompt(i);
        assert!(p.chars().count() <= LIMITS.prompt_chars_max, "{p:?}");
        assert_eq!(p, e.prompt(i), "a prompt depends on its index alone");
    }
    assert_eq!(e.samples(3).len() as u64, n.min(3));
});
