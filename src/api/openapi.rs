//! `GET /openapi.json`: OpenAPI 3.1 built from the route table (paths, methods, auth,
//! scopes, query parameters, success status) plus the schemas below. Because the router is
//! built from the same table, a served route cannot be missing from the document.

use serde_json::{json, Map, Value};

use crate::api::routes::{Auth, ROUTES};
use crate::engine::accounts::scope_names;

fn problem_codes() -> Value {
    json!([
        "unauthorized",
        "forbidden",
        "not_found",
        "insufficient_credits",
        "invalid_template",
        "invalid_request",
        "invalid_json",
        "plan_limit_exceeded",
        "key_spend_limit_exceeded",
        "rate_limited",
        "idempotency_key_reused",
        "request_in_progress",
        "payload_too_large",
        "method_not_allowed",
        "delivery_pending",
        "invalid_signature",
        "link_expired",
        "domain_not_allowed",
        "watermark_unavailable",
        "range_not_satisfiable",
        "unavailable"
    ])
}

fn int() -> Value {
    json!({"type": "integer", "minimum": 0})
}
fn string() -> Value {
    json!({"type": "string"})
}
fn nullable_string() -> Value {
    json!({"type": ["string", "null"]})
}
fn time() -> Value {
    json!({"type": "string", "format": "date-time"})
}
fn list_of(item: &str) -> Value {
    json!({
        "type": "object",
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": format!("#/components/schemas/{item}")}},
            "next_cursor": nullable_string(),
        }
    })
}

/// The component schemas (names used by the route table).
pub fn schemas() -> Map<String, Value> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    put(
        "Problem",
        json!({
            "type": "object",
            "required": ["type", "title", "status", "detail", "code"],
            "properties": {
                "type": string(), "title": string(), "status": int(), "detail": string(),
                "code": {"type": "string", "enum": problem_codes()},
            }
        }),
    );
    put(
        "Health",
        json!({"type": "object", "properties": {"status": string()}}),
    );
    put("Text", json!({"type": "string"}));
    put("Object", json!({"type": "object"}));
    put(
        "BatchRequest",
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["template"],
            "properties": {
                "template": {"type": "string", "description": "Text with {placeholders}"},
                "variables": {"type": "object", "additionalProperties": {"type": "array", "items": string()}},
                "params": {
                    "type": "object", "additionalProperties": false,
                    "properties": {
                        "model": {"type": "string", "default": "sim-standard"},
                        "duration_seconds": {"type": "integer", "default": 4},
                        "resolution": {"type": "string", "default": "720p"},
                        "aspect_ratio": {"type": "string", "default": "16:9"},
                    }
                },
                "request_id": string(),
                "expires_in": {"type": "integer", "minimum": 1, "description": "seconds"},
            }
        }),
    );
    put(
        "RetryRequest",
        json!({
            "type": "object", "additionalProperties": false,
            "properties": {"request_id": string()}
        }),
    );
    put(
        "Quote",
        json!({
            "type": "object",
            "required": ["items", "unit_price", "total", "sample_prompts"],
            "properties": {
                "items": int(), "unit_price": int(), "total": int(),
                "sample_prompts": {"type": "array", "items": string()},
            }
        }),
    );
    let counts = json!({
        "type": "object",
        "properties": {"total": int(), "pending": int(), "running": int(),
            "succeeded": int(), "failed": int(), "canceled": int()}
    });
    put(
        "Batch",
        json!({
            "type": "object",
            "required": ["id", "status", "unit_price", "total", "counts", "credits"],
            "properties": {
                "id": {"type": "string", "pattern": "^bat_"},
                "status": {"type": "string", "enum": ["queued", "processing", "completed", "partial", "failed", "canceled"]},
                "unit_price": int(), "total": int(), "counts": counts,
                "credits": {"type": "object", "properties": {"held": int(), "settled": int(), "released": int(), "remaining": int()}},
                "template": string(), "params": {"type": "object"}, "provider": string(),
                "request_id": nullable_string(), "retry_of": nullable_string(),
                "cancel_requested": {"type": "boolean"},
                "created_at": time(), "expires_at": time(), "finished_at": nullable_string(),
            }
        }),
    );
    put("BatchList", list_of("Batch"));
    put(
        "Item",
        json!({
            "type": "object",
            "required": ["id", "index", "prompt", "status", "attempts"],
            "properties": {
                "id": {"type": "string", "pattern": "^itm_"}, "index": int(), "prompt": string(),
                "status": {"type": "string", "enum": ["pending", "running", "succeeded", "failed", "canceled"]},
                "failure_code": nullable_string(), "failure_message": nullable_string(),
                "attempts": int(), "video_id": nullable_string(),
            }
        }),
    );
    put("ItemList", list_of("Item"));
    put(
        "Wallet",
        json!({
            "type": "object",
            "required": ["available", "held", "granted", "spent", "released", "adjusted", "expired"],
            "properties": {
                "available": int(), "held": int(), "granted": int(), "spent": int(),
                "released": int(), "adjusted": {"type": "integer"}, "expired": int(),
                "low_balance_threshold": {"type": ["integer", "null"]},
            }
        }),
    );
    put(
        "LedgerEntry",
        json!({
            "type": "object",
            "required": ["id", "seq", "kind", "amount", "available_after", "held_after", "at", "hash"],
            "properties": {
                "id": string(), "seq": int(),
                "kind": {"type": "string", "enum": ["top_up", "hold", "settle", "release", "adjust", "expire"]},
                "amount": {"type": "integer", "description": "negative only for downward adjustments"},
                "available_after": int(), "held_after": int(),
                "batch_id": nullable_string(), "item_id": nullable_string(),
                "grant": {"type": ["integer", "null"]},
                "parts": {"type": "array", "items": {"type": "object", "properties": {"grant": int(), "amount": int()}}},
                "request_id": nullable_string(), "reason": nullable_string(),
                "at": time(), "hash": string(), "prev_hash": string(),
            }
        }),
    );
    put("LedgerList", list_of("LedgerEntry"));
    put(
        "Statement",
        json!({
            "type": "object",
            "properties": {
                "from": time(), "to": time(),
                "opening": {"type": "object"}, "closing": {"type": "object"},
                "top_ups": int(), "held": int(), "settled": int(), "released": int(),
                "expired": int(), "adjusted": {"type": "integer"},
                "settled_by_batch": {"type": "array"}, "settled_by_grant": {"type": "array"},
            }
        }),
    );
    put(
        "Usage",
        json!({"type": "object", "properties": {"granularity": string(), "data": {"type": "array"}}}),
    );
    put(
        "TopUsage",
        json!({"type": "object", "properties": {"tenants": {"type": "array"}, "routes": {"type": "array"}}}),
    );
    let event_types = json!({"type": "array", "items": {"type": "string",
        "enum": crate::webhooks::EVENT_TYPES.iter().chain(["*"].iter()).collect::<Vec<_>>()}});
    put(
        "WebhookEndpointRequest",
        json!({
            "type": "object", "additionalProperties": false, "required": ["url"],
            "properties": {"url": {"type": "string", "format": "uri", "maxLength": 2048},
                "events": event_types, "description": string()}
        }),
    );
    put("Binary", json!({"type": "string", "format": "binary"}));
    put(
        "Video",
        json!({
            "type": "object", "required": ["id", "batch_id", "item_id", "content_type"],
            "properties": {"id": {"type": "string", "pattern": "^vid_"}, "object": string(),
                "batch_id": string(), "item_id": string(), "index": int(), "prompt": string(),
                "content_type": string(), "bytes": int(), "watermarked": {"type": "boolean"},
                "created_at": time()}
        }),
    );
    put(
        "LinkRequest",
        json!({
            "type": "object", "additionalProperties": false, "required": ["expires_in"],
            "properties": {"expires_in": {"type": "integer", "minimum": 1, "maximum": 2592000},
                "embed": {"type": "boolean"}}
        }),
    );
    put(
        "Link",
        json!({
            "type": "object", "required": ["url", "expires_at"],
            "properties": {"url": string(), "expires_at": time(), "kind": string(), "video_id": string()}
        }),
    );
    put(
        "EmbedDomain",
        json!({
            "type": "object", "additionalProperties": false, "required": ["domain"],
            "properties": {"domain": string()}
        }),
    );
    put("EmbedDomainList", list_of("EmbedDomain"));
    put(
        "AccessEntry",
        json!({
            "type": "object",
            "required": ["id", "video_id", "kind", "allowed", "domain", "ip", "user_agent", "key_id", "at"],
            "properties": {"id": {"type": "string", "pattern": "^acc_"}, "tenant_id": string(),
                "video_id": string(), "kind": {"type": "string", "enum": ["download", "link", "embed"]},
                "allowed": {"type": "boolean"}, "detail": string(), "domain": nullable_string(),
                "ip": nullable_string(), "user_agent": nullable_string(), "key_id": nullable_string(),
                "at": time()}
        }),
    );
    put("AccessLogList", list_of("AccessEntry"));
    put(
        "WalletPatch",
        json!({
            "type": "object", "additionalProperties": false,
            "properties": {"low_balance_threshold": {"type": ["integer", "null"], "minimum": 0}}
        }),
    );
    put(
        "WebhookEndpointPatch",
        json!({
            "type": "object", "additionalProperties": false,
            "properties": {"url": {"type": "string", "format": "uri"}, "events": event_types,
                "description": string(), "enabled": {"type": "boolean"}}
        }),
    );
    put(
        "RotateSecretRequest",
        json!({
            "type": "object", "additionalProperties": false,
            "properties": {"overlap_s": {"type": "integer", "minimum": 0, "maximum": 604800}}
        }),
    );
    let endpoint_props = json!({
        "id": {"type": "string", "pattern": "^ep_"}, "object": string(), "url": string(),
        "events": {"type": "array", "items": string()}, "description": string(),
        "status": {"type": "string", "enum": ["enabled", "disabled"]}, "enabled": {"type": "boolean"},
        "disabled_reason": nullable_string(), "disabled_at": nullable_string(),
        "failing_since": nullable_string(), "previous_secret_expires_at": nullable_string(),
        "created_at": time()
    });
    put(
        "WebhookEndpoint",
        json!({"type": "object", "required": ["id", "url", "events", "status"], "properties": endpoint_props}),
    );
    let mut with_secret = endpoint_props.clone();
    with_secret["secret"] = json!({"type": "string", "pattern": "^whsec_"});
    put(
        "WebhookEndpointWithSecret",
        json!({"type": "object", "required": ["id", "url", "events", "status", "secret"], "properties": with_secret}),
    );
    put("WebhookEndpointList", list_of("WebhookEndpoint"));
    put(
        "WebhookDelivery",
        json!({
            "type": "object", "required": ["id", "endpoint_id", "event_id", "event_type", "status", "attempts"],
            "properties": {
                "id": {"type": "string", "pattern": "^whd_"}, "object": string(),
                "endpoint_id": string(), "event_id": {"type": "string", "pattern": "^evt_"},
                "event_type": string(),
                "status": {"type": "string", "enum": ["pending", "succeeded", "failed"]},
                "attempts_total": int(), "next_attempt_at": nullable_string(), "note": nullable_string(),
                "created_at": time(),
                "attempts": {"type": "array", "items": {"type": "object", "properties": {
                    "at": time(), "status": int(), "latency_ms": int(), "error": nullable_string(),
                    "next_attempt_at": nullable_string(), "manual": {"type": "boolean"}}}},
                "event": {"type": "object", "description": "The payload as sent"}
            }
        }),
    );
    put("WebhookDeliveryList", list_of("WebhookDelivery"));
    put(
        "TenantRequest",
        json!({
            "type": "object", "additionalProperties": false, "required": ["name", "plan"],
            "properties": {"name": string(), "plan": string()}
        }),
    );
    put(
        "Tenant",
        json!({
            "type": "object", "required": ["id", "name", "plan"],
            "properties": {"id": {"type": "string", "pattern": "^ten_"}, "name": string(), "plan": string(), "created_at": time()}
        }),
    );
    put("TenantList", list_of("Tenant"));
    put(
        "KeyRequest",
        json!({
            "type": "object", "additionalProperties": false, "required": ["name"],
            "properties": {
                "name": string(),
                "scopes": {"type": "array", "items": {"type": "string", "enum": crate::engine::accounts::SCOPES}},
                "daily_credit_limit": int(), "expires_at": time(),
            }
        }),
    );
    put(
        "Key",
        json!({
            "type": "object", "required": ["id", "tenant_id", "scopes"],
            "properties": {
                "id": {"type": "string", "pattern": "^key_"}, "tenant_id": string(), "name": string(),
                "scopes": {"type": "array", "items": string()},
                "daily_credit_limit": {"type": ["integer", "null"]},
                "expires_at": nullable_string(), "created_at": time(), "revoked_at": nullable_string(),
            }
        }),
    );
    put(
        "KeyWithSecret",
        json!({
            "allOf": [{"$ref": "#/components/schemas/Key"}],
            "properties": {"key": {"type": ["string", "null"], "description": "the secret, shown once"}}
        }),
    );
    put("KeyList", list_of("Key"));
    put(
        "TopUpRequest",
        json!({
            "type": "object", "additionalProperties": false, "required": ["amount", "kind"],
            "properties": {"amount": {"type": "integer", "minimum": 1},
                "kind": {"type": "string", "enum": ["paid", "promotional"]}, "expires_at": time()}
        }),
    );
    put(
        "AdjustmentRequest",
        json!({
            "type": "object", "additionalProperties": false, "required": ["amount", "reason"],
            "properties": {"amount": {"type": "integer"}, "reason": string()}
        }),
    );
    put(
        "Reconciliation",
        json!({
            "type": "object", "required": ["tenants_checked", "batches_checked", "discrepancies"],
            "properties": {"tenants_checked": int(), "batches_checked": int(),
                "discrepancies": {"type": "array", "items": {"type": "object"}}}
        }),
    );
    m
}

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let mut op = Map::new();
        op.insert("operationId".into(), json!(r.operation_id));
        op.insert("summary".into(), json!(r.summary));
        let mut params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(r.query.iter().map(
            |q| json!({"name": q, "in": "query", "required": false, "schema": {"type": "string"}}),
        ));
        if r.mutating {
            params.push(
                json!({"name": "Idempotency-Key", "in": "header", "required": false,
                "schema": {"type": "string", "maxLength": 255}}),
            );
        }
        op.insert("parameters".into(), Value::Array(params));
        match r.auth {
            Auth::Public => {
                op.insert("security".into(), json!([]));
            }
            Auth::Admin => {
                op.insert("security".into(), json!([{"adminToken": []}]));
            }
            Auth::Key(scope) => {
                let scopes = scope.map(scope_names).unwrap_or_default();
                op.insert("security".into(), json!([{"apiKey": scopes}]));
            }
        }
        if let Some(req) = r.request {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{req}")}}}}),
            );
        }
        let (status, schema) = r.ok;
        op.insert(
            "responses".into(),
            json!({
                status.to_string(): {"description": "success",
                    "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}},
                "default": {"description": "problem",
                    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}},
            }),
        );
        let item = paths
            .entry(r.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        item[r.method.as_str().to_ascii_lowercase()] = Value::Object(op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "reelbatch", "version": env!("CARGO_PKG_VERSION"),
            "description": "A financially safe batch production line for AI video generation."},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "API key (rbk_…)"},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "REELBATCH_ADMIN_TOKEN"},
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_referenced_schema_exists() {
        let doc = super::document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(schemas.contains_key(&name), "missing schema {name}");
        }
    }
}
