//! The OpenAPI 3 document of the REST API, served at `/openapi.json`, kept in
//! `docs/openapi.json`, and used by the API fuzz test. The schemas are generated from the
//! types the routes take and answer (schemars); the paths are listed here with their summaries,
//! and a test holds them to the routes `router` declares, both ways.

use schemars::gen::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Value};
use stratus_api::model::{
    ClusterConfig, ConsolidationPlan, Event, Host, Image, Instance, Network, Operation,
};

use super::hosts::{AddHostAnswer, AddHostRequest, ControlView, EvacuateRequest};
use super::images::{BuildRequest, ImportRequest};
use super::instances::{Accepted, ExecAnswer, ExecBody, LaunchRequest, MoveRequest};
use super::networks::NetworkRequest;

/// The document.
pub fn document() -> Value {
    let error = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let accepted = json!({"description": "accepted: an operation to wait on", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}});
    let name = json!([{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let ok =
        |schema: Value| json!({"description": "ok", "content": {"application/json": {"schema": schema}}});
    let errors = |mut responses: Value| {
        for code in ["400", "401", "404", "409", "422"] {
            responses[code] = error.clone();
        }
        responses
    };
    let action = |summary: &str| json!({"post": {"summary": summary, "parameters": name, "responses": errors(json!({"202": accepted}))}});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Stratus API", "version": "1"},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/v1/instances": {
                "get": {"summary": "List instances", "responses": errors(json!({"200": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Instance"}}))}))},
                "post": {"summary": "Launch an instance", "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LaunchRequest"}}}},
                         "responses": errors(json!({"202": accepted}))}
            },
            "/v1/instances/{name}": {
                "get": {"summary": "Show an instance", "parameters": name, "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/Instance"}))}))},
                "delete": {"summary": "Delete an instance with its disk, tap and address", "parameters": name, "responses": errors(json!({"202": accepted}))}
            },
            "/v1/instances/{name}/start": action("Start a stopped instance"),
            "/v1/instances/{name}/stop": action("Stop an instance (ACPI power button, then hard)"),
            "/v1/instances/{name}/restart": action("Restart an instance"),
            "/v1/instances/{name}/exec": {"post": {"summary": "Run a command in the guest through its agent", "parameters": name,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ExecRequest"}}}},
                "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/ExecResult"})), "502": error}))}},
            "/v1/instances/{name}/move": {"post": {"summary": "Move an instance to another host: a running one live (same address, MAC, disk and memory), a stopped one cold (its disk copied)", "parameters": name,
                "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/MoveRequest"}}}},
                "responses": errors(json!({"202": accepted}))}},
            "/v1/instances/{name}/console": {"get": {"summary": "The serial console as a WebSocket: binary messages carry its bytes both ways", "parameters": name,
                "responses": errors(json!({"101": {"description": "switching to the WebSocket protocol"}}))}},
            "/v1/instances/{name}/metrics": {"get": {"summary": "The VMM's metrics", "parameters": name, "responses": errors(json!({"200": ok(json!({"type": "object"}))}))}},
            "/v1/images": {
                "get": {"summary": "List images", "responses": errors(json!({"200": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Image"}}))}))},
                "post": {"summary": "Import an image from uploads (PUT /v1/uploads/NAME): a raw ext4 root filesystem or a tarball, a kernel, an initrd", "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImportRequest"}}}},
                         "responses": errors(json!({"201": ok(json!({"$ref": "#/components/schemas/Image"}))}))}
            },
            "/v1/images/build": {"post": {"summary": "Build an image from a recipe (default, debian), install it and make its warm snapshot",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BuildRequest"}}}},
                "responses": errors(json!({"202": ok(json!({"$ref": "#/components/schemas/Operation"}))}))}},
            "/v1/uploads/{name}": {
                "put": {"summary": "Upload a file for an image import", "parameters": name,
                        "requestBody": {"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                        "responses": errors(json!({"201": ok(json!({"type": "object", "properties": {"name": {"type": "string"}, "bytes": {"type": "integer"}}})), "413": error}))},
                "delete": {"summary": "Delete an upload", "parameters": name, "responses": errors(json!({"204": {"description": "deleted"}}))}
            },
            "/v1/image-files/{dir}/{file}": {"get": {"summary": "A file of an image on record, for another control plane replica that lacks it",
                "parameters": [{"name": "dir", "in": "path", "required": true, "schema": {"type": "string"}},
                               {"name": "file", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": errors(json!({"200": {"description": "the file", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}))}},
            "/v1/images/{name}": {
                "get": {"summary": "Show an image", "parameters": name, "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/Image"}))}))},
                "delete": {"summary": "Delete an unused image", "parameters": name, "responses": errors(json!({"204": {"description": "deleted"}}))}
            },
            "/v1/networks": {
                "get": {"summary": "List networks", "responses": errors(json!({"200": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Network"}}))}))},
                "post": {"summary": "Create a network (bridge, subnet, NAT)", "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NetworkRequest"}}}},
                         "responses": errors(json!({"201": ok(json!({"$ref": "#/components/schemas/Network"})), "500": error}))}
            },
            "/v1/networks/{name}": {
                "get": {"summary": "Show a network", "parameters": name, "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/Network"}))}))},
                "delete": {"summary": "Delete an unused network", "parameters": name, "responses": errors(json!({"204": {"description": "deleted"}}))}
            },
            "/v1/hosts": {
                "get": {"summary": "Hosts with their state, capacity and allocation", "responses": errors(json!({"200": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Host"}}))}))},
                "post": {"summary": "Invite a host: a single-use, expiring join token for `stratus agent`", "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AddHostRequest"}}}},
                         "responses": errors(json!({"201": ok(json!({"$ref": "#/components/schemas/Invitation"}))}))}
            },
            "/v1/hosts/{name}": {
                "get": {"summary": "Show a host", "parameters": name, "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/Host"}))}))},
                "delete": {"summary": "Remove a host from the cluster (refused while instances are placed there)", "parameters": name, "responses": errors(json!({"204": {"description": "removed"}}))}
            },
            "/v1/hosts/{name}/evacuate": {"post": {"summary": "Maintenance: no new placements on the host, and every instance moved off it (running live, stopped cold unless keep_stopped)", "parameters": name,
                "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/EvacuateRequest"}}}},
                "responses": errors(json!({"202": ok(json!({"$ref": "#/components/schemas/Operation"}))}))}},
            "/v1/hosts/{name}/restore": {"post": {"summary": "End the host's maintenance and bring back the instances its evacuation moved off", "parameters": name,
                "responses": errors(json!({"202": ok(json!({"$ref": "#/components/schemas/Operation"}))}))}},
            "/v1/config": {
                "get": {"summary": "The cluster's settings, defaults filled in", "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/ClusterConfig"}))}))},
                "patch": {"summary": "Set settings, all or none: {\"rebalance.enabled\": false, \"rebalance.window_s\": 60}",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": true}}}},
                    "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/ClusterConfig"}))}))}
            },
            "/v1/consolidation": {
                "get": {"summary": "The consolidation plan: the moves that pack the instances onto as few hosts as fit, the hosts it would empty, and why each other host stays",
                    "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/ConsolidationPlan"}))}))},
                "post": {"summary": "Carry out the consolidation plan of the moment: the hosts it empties go into maintenance and stay there",
                    "responses": errors(json!({"202": ok(json!({"$ref": "#/components/schemas/Operation"}))}))}
            },
            "/v1/control": {"get": {"summary": "Which control replica answered, and which leads (runs the reconcilers)",
                "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/ControlView"}))}))}},
            "/v1/operations/{id}": {"get": {"summary": "An operation", "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/Operation"}))}))}},
            "/v1/operations/{id}/wait": {"get": {"summary": "Wait for an operation to finish", "parameters": [
                {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
                {"name": "timeout", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "maximum": 300}}],
                "responses": errors(json!({"200": ok(json!({"$ref": "#/components/schemas/Operation"}))}))}},
            "/v1/events": {"get": {"summary": "Events, oldest first", "parameters": [
                {"name": "instance", "in": "query", "required": false, "schema": {"type": "string"}},
                {"name": "after", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0}}],
                "responses": errors(json!({"200": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Event"}}))}))}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        }
    })
}

/// `{"error": "..."}`: what every refusal answers.
#[derive(JsonSchema)]
#[schemars(rename = "Error")]
#[allow(dead_code)]
struct ErrorBody {
    /// One line for the user.
    error: String,
}

/// The schemas of every type a route takes or answers, generated from the types themselves
/// (their fields, serde's renames and defaults, and the limits the API checks).
fn schemas() -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    generator.subschema_for::<ErrorBody>();
    generator.subschema_for::<LaunchRequest>();
    generator.subschema_for::<Accepted>();
    generator.subschema_for::<MoveRequest>();
    generator.subschema_for::<ExecBody>();
    generator.subschema_for::<ExecAnswer>();
    generator.subschema_for::<ImportRequest>();
    generator.subschema_for::<BuildRequest>();
    generator.subschema_for::<NetworkRequest>();
    generator.subschema_for::<EvacuateRequest>();
    generator.subschema_for::<AddHostRequest>();
    generator.subschema_for::<AddHostAnswer>();
    generator.subschema_for::<ControlView>();
    generator.subschema_for::<Instance>();
    generator.subschema_for::<Image>();
    generator.subschema_for::<Network>();
    generator.subschema_for::<Host>();
    generator.subschema_for::<Operation>();
    generator.subschema_for::<Event>();
    generator.subschema_for::<ClusterConfig>();
    generator.subschema_for::<ConsolidationPlan>();
    serde_json::to_value(generator.definitions()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `value`.
    fn references(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    found.push(target.clone());
                }
                map.values().for_each(|v| references(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| references(v, found)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_names_a_generated_schema() {
        let doc = document();
        let mut found = Vec::new();
        references(&doc, &mut found);
        assert!(found.len() > 20, "{found:?}");
        for target in found {
            let name = target.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{target}"));
            assert!(doc["components"]["schemas"].get(name).is_some(), "{target} is not among the schemas");
        }
        let launch = &doc["components"]["schemas"]["LaunchRequest"];
        assert_eq!(launch["additionalProperties"], false, "{launch}");
        assert_eq!(launch["properties"]["cpus"]["maximum"], 64.0, "{launch}");
        assert_eq!(launch["properties"]["image"]["default"], "default", "{launch}");
    }

    #[test]
    fn every_route_is_described_and_nothing_else() {
        // The routes as `router` declares them: `/v1` ones inside its nested router.
        let source = include_str!("mod.rs");
        let v1 = &source[source.find("let v1 = Router::new()").unwrap_or(0)
            ..source.find(".nest(\"/v1\", v1)").unwrap_or(0)];
        let mut routed: Vec<String> = v1
            .split(".route(\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(|path| format!("/v1{path}"))
            .collect();
        routed.sort();
        let doc = document();
        let mut described: Vec<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
        described.sort();
        assert!(!routed.is_empty());
        assert_eq!(routed, described);
    }

    #[test]
    fn the_committed_document_is_current() {
        // `docs/openapi.json` is this document, for readers and client generators; regenerate
        // it with `STRATUS_WRITE_OPENAPI=1 cargo test -p stratus-control openapi`.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let doc = document();
        if std::env::var_os("STRATUS_WRITE_OPENAPI").is_some() {
            std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
        }
        let committed: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_default()).unwrap_or(Value::Null);
        assert!(
            committed == doc,
            "docs/openapi.json is out of date: STRATUS_WRITE_OPENAPI=1 cargo test -p stratus-control openapi"
        );
    }
}
