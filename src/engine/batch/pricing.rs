//! Generation parameters and the price table (SPEC §3, §12): the unit price of an item is
//! `per_second[resolution] × duration_seconds` for its model, in integer credits, fixed on
//! the batch when it is created.

use std::collections::BTreeMap;

/// What each item of a batch is generated with (SPEC §11 `params`).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Params {
    /// A model of the price table.
    pub model: String,
    /// Seconds of video.
    pub duration_seconds: u32,
    /// A resolution the model prices.
    pub resolution: String,
    /// One of the model's aspect ratios.
    pub aspect_ratio: String,
}

impl Default for Params {
    /// SPEC §12 defaults.
    fn default() -> Self {
        Params {
            model: "sim-standard".into(),
            duration_seconds: 4,
            resolution: "720p".into(),
            aspect_ratio: "16:9".into(),
        }
    }
}

/// One model's entry in the price table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    /// Provider that runs it (a name in the provider registry).
    pub provider: String,
    /// The provider's own model name (`owner/name` on Replicate, an app id on fal).
    pub provider_model: String,
    /// Credits per second of video, by resolution.
    pub per_second: BTreeMap<String, u64>,
    /// Longest duration offered.
    pub duration_seconds_max: u32,
    /// Aspect ratios offered.
    pub aspect_ratios: Vec<String>,
}

/// Model → prices. Data from the config file, never code; `Default` is SPEC §12's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    /// By model name.
    pub models: BTreeMap<String, ModelPrice>,
}

impl Default for PriceTable {
    fn default() -> Self {
        let mut models = BTreeMap::new();
        models.insert(
            "sim-standard".to_string(),
            ModelPrice {
                provider: "simulated".into(),
                provider_model: "sim-standard".into(),
                per_second: BTreeMap::from([("720p".into(), 10), ("1080p".into(), 20)]),
                duration_seconds_max: 60,
                aspect_ratios: ["16:9", "9:16", "1:1", "4:3", "3:4"]
                    .map(String::from)
                    .to_vec(),
            },
        );
        PriceTable { models }
    }
}

/// A parameter the table does not offer (422 `invalid_request`, naming the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("params.{field}: {reason}")]
pub struct PriceError {
    /// `model`, `resolution`, `duration_seconds` or `aspect_ratio`.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

/// The price of one item and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    /// Credits per item.
    pub unit_price: u64,
    /// Provider name.
    pub provider: String,
    /// The provider's model name.
    pub provider_model: String,
}

impl PriceTable {
    /// Checks `params` against the table and prices one item.
    pub fn price(&self, p: &Params) -> Result<Priced, PriceError> {
        let m = self.models.get(&p.model).ok_or_else(|| PriceError {
            field: "model",
            reason: format!(
                "unknown model {:?}; offered: {}",
                p.model,
                self.models.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })?;
        let per_second = *m.per_second.get(&p.resolution).ok_or_else(|| PriceError {
            field: "resolution",
            reason: format!(
                "{:?} is not offered for {}; offered: {}",
                p.resolution,
                p.model,
                m.per_second.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })?;
        if p.duration_seconds == 0 || p.duration_seconds > m.duration_seconds_max {
            return Err(PriceError {
                field: "duration_seconds",
                reason: format!("must be 1..={}", m.duration_seconds_max),
            });
        }
        if !m.aspect_ratios.contains(&p.aspect_ratio) {
            return Err(PriceError {
                field: "aspect_ratio",
                reason: format!("offered: {}", m.aspect_ratios.join(", ")),
            });
        }
        let unit_price = per_second
            .checked_mul(p.duration_seconds as u64)
            .ok_or_else(|| PriceError {
                field: "duration_seconds",
                reason: "price out of range".into(),
            })?;
        Ok(Priced {
            unit_price,
            provider: m.provider.clone(),
            provider_model: m.provider_model.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_defaults() {
        let t = PriceTable::default();
        assert_eq!(t.price(&Params::default()).unwrap().unit_price, 40);
        let hd = Params {
            resolution: "1080p".into(),
            duration_seconds: 5,
            ..Params::default()
        };
        assert_eq!(t.price(&hd).unwrap().unit_price, 100);
        let bad = |p: Params| t.price(&p).unwrap_err().field;
        assert_eq!(
            bad(Params {
                model: "x".into(),
                ..Params::default()
            }),
            "model"
        );
        assert_eq!(
            bad(Params {
                resolution: "4k".into(),
                ..Params::default()
            }),
            "resolution"
        );
        assert_eq!(
            bad(Params {
                duration_seconds: 0,
                ..Params::default()
            }),
            "duration_seconds"
        );
        assert_eq!(
            bad(Params {
                aspect_ratio: "2:1".into(),
                ..Params::default()
            }),
            "aspect_ratio"
        );
    }
}
