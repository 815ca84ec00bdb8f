//! Template properties (SPEC §3): the count is the product of the list lengths, every
//! index gives a distinct prompt, the order is the documented mixed radix (last variable
//! fastest) and stable; malformed templates are refused with a position, and template
//! bombs are refused by count before anything proportional to it is allocated.

use proptest::prelude::*;
use reelbatch::engine::batch::template::{Expansion, TemplateError, TemplateLimits};

/// A template over `n` variables `v0..vn` with literal text (including escaped braces)
/// between them, and distinct values per variable.
fn template_and_vars() -> impl Strategy<Value = (String, Vec<(String, Vec<String>)>)> {
    (1usize..=4)
        .prop_flat_map(|n| {
            (
                proptest::collection::vec(1usize..=6, n),
                proptest::collection::vec("[a-z ,.]{0,4}(\\{\\{|\\}\\})?", n + 1),
                Just(n),
            )
        })
        .prop_map(|(lens, texts, n)| {
            let mut t = String::new();
            for (k, text) in texts.iter().take(n).enumerate() {
                t.push_str(text);
                t.push_str(&format!("{{v{k}}}"));
            }
            t.push_str(&texts[n]);
            // Variables given in reverse order: the order of the map must not matter.
            let vars = (0..n)
                .rev()
                .map(|k| {
                    (
                        format!("v{k}"),
                        (0..lens[k]).map(|i| format!("<{k}:{i}>")).collect(),
                    )
                })
                .collect();
            (t, vars)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn count_order_and_distinct_prompts((t, vars) in template_and_vars()) {
        let e = Expansion::new(&t, &vars, &TemplateLimits::default(), 10_000).unwrap();
        let product: u64 = vars.iter().map(|(_, v)| v.len() as u64).product();
        prop_assert_eq!(e.count(), product);
        let all: Vec<String> = (0..e.count()).map(|i| e.prompt(i)).collect();
        let unique: std::collections::HashSet<&String> = all.iter().collect();
        prop_assert_eq!(unique.len(), all.len());
        // Documented order: item i's digits in mixed radix, variables by first
        // appearance (v0, v1, …), the last varying fastest.
        let radices: Vec<u64> = (0..vars.len())
            .map(|k| vars.iter().find(|(n, _)| *n == format!("v{k}")).unwrap().1.len() as u64)
            .collect();
        for (i, p) in all.iter().enumerate() {
            let mut rest = i as u64;
            let mut digits = vec![0u64; radices.len()];
            for k in (0..radices.len()).rev() {
                digits[k] = rest % radices[k];
                rest /= radices[k];
            }
            let mut pos = 0;
            for (k, d) in digits.iter().enumerate() {
                let needle = format!("<{k}:{d}>");
                let at = p[pos..].find(&needle);
                prop_assert!(at.is_some(), "{} lacks {} in order", p, needle);
                pos += at.unwrap() + needle.len();
            }
        }
        // Stable: a second expansion gives the same prompts; escapes became single braces.
        let again = Expansion::new(&t, &vars, &TemplateLimits::default(), 10_000).unwrap();
        prop_assert_eq!(again.samples(all.len()), all.clone());
        for p in &all {
            prop_assert!(!p.contains("{v"), "unexpanded placeholder in {}", p);
        }
    }

    #[test]
    fn malformed_templates_name_a_position(prefix in "[a-z ]{0,8}", bad in prop_oneof![
        Just("{"), Just("}"), Just("{Bad}"), Just("{}"), Just("{9}"), Just("{a-b}"), Just("{ a}"),
    ], suffix in "[a-z ]{0,8}") {
        let t = format!("{prefix}{bad}{suffix}");
        match Expansion::new(&t, &[], &TemplateLimits::default(), 10) {
            Err(e @ TemplateError::Malformed { position, .. }) => {
                prop_assert_eq!(position, prefix.chars().count());
                prop_assert_eq!(e.code(), "invalid_template");
            }
            other => prop_assert!(false, "{:?} for {:?}", other, t),
        }
    }

    #[test]
    fn bombs_are_refused_by_count(k in 2usize..=16, len in 2usize..=1000) {
        // len^k items with only k × len values allocated by the caller.
        let t: String = (0..k).map(|i| format!("{{v{i}}}")).collect();
        let vars: Vec<(String, Vec<String>)> = (0..k)
            .map(|i| (format!("v{i}"), (0..len).map(|j| j.to_string()).collect()))
            .collect();
        let limit = 10_000u64;
        let count = (len as u128).checked_pow(k as u32);
        match Expansion::new(&t, &vars, &TemplateLimits::default(), limit) {
            Ok(e) => prop_assert!(count.is_some_and(|c| c <= limit as u128) && e.count() as u128 == count.unwrap()),
            Err(e @ TemplateError::TooManyItems { .. }) => {
                prop_assert!(count.is_none_or(|c| c > limit as u128));
                prop_assert_eq!(e.code(), "plan_limit_exceeded");
            }
            Err(other) => prop_assert!(false, "{:?}", other),
        }
    }
}

#[test]
fn a_10_to_the_12_bomb_is_cheap_and_refused() {
    // 10^12 items from 4 × 1000 values: refused by the checked count, instantly.
    let vars: Vec<(String, Vec<String>)> = (0..4)
        .map(|i| (format!("v{i}"), (0..1000).map(|j| j.to_string()).collect()))
        .collect();
    let start = std::time::Instant::now();
    let e = Expansion::new(
        "{v0}{v1}{v2}{v3}",
        &vars,
        &TemplateLimits::default(),
        10_000,
    )
    .unwrap_err();
    assert_eq!(
        e,
        TemplateError::TooManyItems {
            count: Some(1_000_000_000_000),
            limit: 10_000
        }
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
    // Beyond u64: still a clean refusal.
    let vars: Vec<(String, Vec<String>)> = (0..16)
        .map(|i| (format!("v{i}"), (0..1000).map(|j| j.to_string()).collect()))
        .collect();
    let t: String = (0..16).map(|i| format!("{{v{i}}}")).collect();
    let e = Expansion::new(&t, &vars, &TemplateLimits::default(), 10_000).unwrap_err();
    assert_eq!(
        e,
        TemplateError::TooManyItems {
            count: None,
            limit: 10_000
        }
    );
    // Limits on the inputs themselves.
    let long = "x".repeat(5_000);
    assert!(matches!(
        Expansion::new(&long, &[], &TemplateLimits::default(), 10),
        Err(TemplateError::TooLarge { .. })
    ));
}
