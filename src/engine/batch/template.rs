//! Prompt templates (SPEC §3): parsing, validation against the variables, the checked
//! Cartesian count, and item `i`'s prompt computed from `i` alone.
//!
//! Grammar (positions in errors are 0-based character offsets into the template):
//! ```text
//! template    := ( literal | "{{" | "}}" | placeholder )*
//! placeholder := "{" name "}"            name := [a-z_][a-z0-9_]*
//! ```
//! `{{` and `}}` are literal braces; any other `{` or `}` is an error naming its position.
//!
//! Order (documented, stable): variables are numbered by their first appearance in the
//! template; item `i` is `i` written in mixed radix with the *last* variable varying
//! fastest. So `{a} {b}` with a=[x,y], b=[1,2,3] gives `x 1, x 2, x 3, y 1, y 2, y 3`.
//! The count is the product of the list lengths with checked multiplication, compared
//! with the caller's limit before anything proportional to it is allocated: a 10^12-item
//! template costs exactly as much as a 2-item one.

/// Bounds on a template and its variables (every input is bounded; see `Default`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateLimits {
    /// Characters in the template.
    pub template_chars_max: usize,
    /// Distinct placeholders.
    pub variables_max: usize,
    /// Values in one variable's list.
    pub values_per_variable_max: usize,
    /// Characters in one value.
    pub value_chars_max: usize,
    /// Characters in the longest prompt the template can produce.
    pub prompt_chars_max: usize,
}

impl Default for TemplateLimits {
    fn default() -> Self {
        TemplateLimits {
            template_chars_max: 4_000,
            variables_max: 16,
            values_per_variable_max: 10_000,
            value_chars_max: 1_000,
            prompt_chars_max: 8_000,
        }
    }
}

/// Longest placeholder name.
const NAME_CHARS_MAX: usize = 64;

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Syntax error at a 0-based character position.
    #[error("malformed template at position {position}: {reason}")]
    Malformed {
        /// 0-based character offset.
        position: usize,
        /// What is wrong there.
        reason: &'static str,
    },
    /// A placeholder has no entry in `variables`.
    #[error("placeholder {{{name}}} has no values in variables")]
    MissingVariable { name: String },
    /// A variable's list is empty.
    #[error("variable {name} has an empty list of values")]
    EmptyVariable { name: String },
    /// A variable is not used by the template.
    #[error("variable {name} is not used by the template")]
    UnusedVariable { name: String },
    /// The same variable appears twice in `variables`.
    #[error("variable {name} is given twice")]
    DuplicateVariable { name: String },
    /// A bound of `TemplateLimits` is exceeded.
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge { what: &'static str, limit: usize },
    /// The Cartesian count exceeds the plan's batch limit (`None`: beyond `u64`).
    #[error("the template expands to {} items; the plan allows {limit} per batch",
        count.map_or_else(|| "more than 18446744073709551615".to_string(), |c| c.to_string()))]
    TooManyItems { count: Option<u64>, limit: u64 },
}

impl TemplateError {
    /// The stable error code clients see (SPEC §11).
    pub fn code(&self) -> &'static str {
        match self {
            TemplateError::TooManyItems { .. } => "plan_limit_exceeded",
            _ => "invalid_template",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Literal text (braces already unescaped).
    Text(String),
    /// Variable number (first-appearance order).
    Var(usize),
}

/// A parsed template with its variables, ready to produce prompts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    segments: Vec<Segment>,
    /// `(name, values)` in first-appearance order.
    variables: Vec<(String, Vec<String>)>,
    /// Items: the product of the list lengths (1 without placeholders).
    count: u64,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_lowercase() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

/// Parses the template into segments and the placeholder names in first-appearance order.
fn parse(
    template: &str,
    limits: &TemplateLimits,
) -> Result<(Vec<Segment>, Vec<String>), TemplateError> {
    let chars: Vec<char> = template
        .chars()
        .take(limits.template_chars_max + 1)
        .collect();
    if chars.len() > limits.template_chars_max {
        return Err(TemplateError::TooLarge {
            what: "template length in characters",
            limit: limits.template_chars_max,
        });
    }
    let mut segments = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    // Each iteration consumes at least one character: bounded by the template length.
    while i < chars.len() {
        match chars[i] {
            '{' if chars.get(i + 1) == Some(&'{') => {
                text.push('{');
                i += 2;
            }
            '}' if chars.get(i + 1) == Some(&'}') => {
                text.push('}');
                i += 2;
            }
            '}' => {
                return Err(TemplateError::Malformed {
                    position: i,
                    reason: "unmatched '}' (write '}}' for a literal brace)",
                })
            }
            '{' => {
                let start = i;
                let mut j = i + 1;
                while j < chars.len() && is_name_char(chars[j]) {
                    j += 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                if j >= chars.len() {
                    return Err(TemplateError::Malformed {
                        position: start,
                        reason: "unclosed placeholder (write '{{' for a literal brace)",
                    });
                }
                if chars[j] != '}' || name.is_empty() || !name.starts_with(is_name_start) {
                    return Err(TemplateError::Malformed {
                        position: start,
                        reason: "a placeholder is {name} with name matching [a-z_][a-z0-9_]*",
                    });
                }
                if name.len() > NAME_CHARS_MAX {
                    return Err(TemplateError::Malformed {
                        position: start,
                        reason: "placeholder name longer than 64 characters",
                    });
                }
                if !text.is_empty() {
                    segments.push(Segment::Text(std::mem::take(&mut text)));
                }
                let idx = match names.iter().position(|n| *n == name) {
                    Some(k) => k,
                    None => {
                        if names.len() == limits.variables_max {
                            return Err(TemplateError::TooLarge {
                                what: "number of distinct placeholders",
                                limit: limits.variables_max,
                            });
                        }
                        names.push(name);
                        names.len() - 1
                    }
                };
                segments.push(Segment::Var(idx));
                i = j + 1;
            }
            c => {
                text.push(c);
                i += 1;
            }
        }
    }
    if !text.is_empty() {
        segments.push(Segment::Text(text));
    }
    Ok((segments, names))
}

impl Expansion {
    /// Parses `template`, matches it with `variables` (name → values, any order), and
    /// checks the item count against `max_items` before allocating anything per item.
    pub fn new(
        template: &str,
        variables: &[(String, Vec<String>)],
        limits: &TemplateLimits,
        max_items: u64,
    ) -> Result<Expansion, TemplateError> {
        let (segments, names) = parse(template, limits)?;
        if variables.len() > limits.variables_max {
            return Err(TemplateError::TooLarge {
                what: "number of variables",
                limit: limits.variables_max,
            });
        }
        for (k, (name, _)) in variables.iter().enumerate() {
            if variables[..k].iter().any(|(n, _)| n == name) {
                return Err(TemplateError::DuplicateVariable { name: name.clone() });
            }
            if !names.contains(name) {
                return Err(TemplateError::UnusedVariable { name: name.clone() });
            }
        }
        // Count first, with checked multiplication: nothing below is proportional to it.
        let mut count: Option<u64> = Some(1);
        let mut ordered: Vec<&Vec<String>> = Vec::with_capacity(names.len());
        for name in &names {
            let values = variables
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .ok_or_else(|| TemplateError::MissingVariable { name: name.clone() })?;
            if values.is_empty() {
                return Err(TemplateError::EmptyVariable { name: name.clone() });
            }
            if values.len() > limits.values_per_variable_max {
                return Err(TemplateError::TooLarge {
                    what: "values of one variable",
                    limit: limits.values_per_variable_max,
                });
            }
            count = count.and_then(|c| c.checked_mul(values.len() as u64));
            ordered.push(values);
        }
        match count {
            Some(c) if c <= max_items => {}
            _ => {
                return Err(TemplateError::TooManyItems {
                    count,
                    limit: max_items,
                })
            }
        }
        // The longest prompt: literal text plus the longest value at each placeholder.
        let mut longest: usize = 0;
        for seg in &segments {
            longest = longest.saturating_add(match seg {
                Segment::Text(t) => t.chars().count(),
                Segment::Var(k) => {
                    let mut m = 0;
                    for v in ordered[*k] {
                        let n = v.chars().count();
                        if n > limits.value_chars_max {
                            return Err(TemplateError::TooLarge {
                                what: "characters in one value",
                                limit: limits.value_chars_max,
                            });
                        }
                        m = m.max(n);
                    }
                    m
                }
            });
        }
        if longest > limits.prompt_chars_max {
            return Err(TemplateError::TooLarge {
                what: "characters in the longest prompt",
                limit: limits.prompt_chars_max,
            });
        }
        let variables = names
            .into_iter()
            .zip(ordered)
            .map(|(n, v)| (n, v.clone()))
            .collect();
        Ok(Expansion {
            segments,
            variables,
            count: count.expect("checked above"),
        })
    }

    /// Number of items.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The variables in first-appearance order (the order the batch stores).
    pub fn variables(&self) -> &[(String, Vec<String>)] {
        &self.variables
    }

    /// Item `i`'s prompt (`i < count`), from `i` alone: mixed radix, last variable fastest.
    pub fn prompt(&self, i: u64) -> String {
        assert!(i < self.count, "item {i} of {}", self.count);
        let mut digits = vec![0usize; self.variables.len()];
        let mut rest = i;
        for (k, (_, values)) in self.variables.iter().enumerate().rev() {
            let radix = values.len() as u64;
            digits[k] = (rest % radix) as usize;
            rest /= radix;
        }
        debug_assert_eq!(rest, 0);
        let mut out = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Text(t) => out.push_str(t),
                Segment::Var(k) => out.push_str(&self.variables[*k].1[digits[*k]]),
            }
        }
        out
    }

    /// The first `n` prompts (for quotes).
    pub fn samples(&self, n: usize) -> Vec<String> {
        (0..self.count.min(n as u64))
            .map(|i| self.prompt(i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        v.iter()
            .map(|(n, l)| (n.to_string(), l.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn exp(t: &str, v: &[(&str, &[&str])]) -> Result<Expansion, TemplateError> {
        Expansion::new(t, &vars(v), &TemplateLimits::default(), 10_000)
    }

    #[test]
    fn documented_order_and_escapes() {
        let e = exp(
            "{{{a}}} {b}-{a}",
            &[("b", &["1", "2", "3"]), ("a", &["x", "y"])],
        )
        .unwrap();
        assert_eq!(e.count(), 6);
        let all: Vec<String> = (0..6).map(|i| e.prompt(i)).collect();
        assert_eq!(
            all,
            ["{x} 1-x", "{x} 2-x", "{x} 3-x", "{y} 1-y", "{y} 2-y", "{y} 3-y"]
        );
        assert_eq!(e.variables()[0].0, "a");
        assert_eq!(e.samples(2), ["{x} 1-x", "{x} 2-x"]);
        let plain = exp("a cat, {{literal}}", &[]).unwrap();
        assert_eq!(plain.count(), 1);
        assert_eq!(plain.prompt(0), "a cat, {literal}");
    }

    #[test]
    fn errors_name_the_position() {
        let m = |t: &str| match exp(t, &[("a", &["x"])]) {
            Err(TemplateError::Malformed { position, .. }) => position,
            other => panic!("{t}: {other:?}"),
        };
        assert_eq!(m("ab {a"), 3);
        assert_eq!(m("ab } {a}"), 3);
        assert_eq!(m("{a} {Bad}"), 4);
        assert_eq!(m("{a} {}"), 4);
        assert_eq!(m("{a} {9a}"), 4);
        assert_eq!(m("{a} { a}"), 4);
        assert_eq!(m("é{a}{"), 4);
        assert!(matches!(
            exp("{a}", &[]),
            Err(TemplateError::MissingVariable { .. })
        ));
        assert!(matches!(
            exp("{a}", &[("a", &[])]),
            Err(TemplateError::EmptyVariable { .. })
        ));
        assert!(matches!(
            exp("{a}", &[("a", &["x"]), ("b", &["y"])]),
            Err(TemplateError::UnusedVariable { .. })
        ));
        assert!(matches!(
            exp("{a}", &[("a", &["x"]), ("a", &["y"])]),
            Err(TemplateError::DuplicateVariable { .. })
        ));
    }
}
