//! The OpenAPI 3 document of the REST API, served at `/openapi.json` (and used by the API fuzz
//! test). Kept beside the routes in `api.rs`: a route added there belongs here too.

use serde_json::{json, Value};

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
                "requestBody": {"content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "properties": {"keep_stopped": {"type": "boolean"}}}}}},
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
                "responses": errors(json!({"200": ok(json!({"type": "object", "required": ["replica", "leader", "leading"], "properties": {
                    "replica": {"type": "string"}, "leader": {"type": "string"}, "leading": {"type": "boolean"}}}))}))}},
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
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "LaunchRequest": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                    "name": {"type": "string", "pattern": "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"},
                    "image": {"type": "string", "default": "default"},
                    "cpus": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
                    "memory_mib": {"type": "integer", "minimum": 32, "default": 256},
                    "disk_mib": {"type": "integer", "minimum": 1, "default": 1024},
                    "network": {"type": "string", "default": "default"},
                    "anti_affinity": {"type": "string", "pattern": "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", "description": "No two instances of this group run on one host"},
                    "restart": {"type": "string", "enum": ["always", "on-failure", "never"]},
                    "host": {"type": "string", "nullable": true},
                    "placement": {"type": "string", "enum": ["spread", "pack"], "default": "spread"}}},
                "AddHostRequest": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                    "name": {"type": "string", "pattern": "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"},
                    "ttl_secs": {"type": "integer", "minimum": 1, "maximum": 86400, "nullable": true}}},
                "Invitation": {"type": "object", "properties": {"host": {"type": "string"}, "token": {"type": "string"}, "expires_at": {"type": "integer"}, "command": {"type": "string"}}},
                "ImportRequest": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                    "name": {"type": "string"}, "kernel": {"type": "string", "nullable": true}, "rootfs": {"type": "string", "nullable": true},
                    "tarball": {"type": "string", "nullable": true},
                    "initrd": {"type": "string", "nullable": true}, "cmdline": {"type": "string", "nullable": true}}},
                "BuildRequest": {"type": "object", "required": ["recipe"], "additionalProperties": false, "properties": {
                    "recipe": {"type": "string", "enum": ["default", "debian"]}, "name": {"type": "string", "nullable": true}}},
                "NetworkRequest": {"type": "object", "required": ["name", "cidr"], "additionalProperties": false, "properties": {
                    "name": {"type": "string"}, "cidr": {"type": "string"}, "nat": {"type": "boolean", "default": true}}},
                "ExecRequest": {"type": "object", "required": ["command"], "additionalProperties": false, "properties": {
                    "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "stdin": {"type": "string", "format": "byte"}}},
                "ExecResult": {"type": "object", "properties": {"exit_code": {"type": "integer"}, "stdout": {"type": "string", "format": "byte"}, "stderr": {"type": "string", "format": "byte"}}},
                "Instance": {"type": "object", "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "project": {"type": "string"},
                    "spec": {"type": "object"}, "desired": {"type": "string", "enum": ["running", "stopped", "deleted"]},
                    "status": {"type": "object", "properties": {"state": {"type": "string", "enum": ["pending", "starting", "running", "stopping", "stopped", "deleting", "error"]},
                        "message": {"type": "string"}, "host": {"type": "string"}, "ip": {"type": "string"}, "mac": {"type": "string"}}},
                    "created_at": {"type": "integer"}, "operation": {"type": "string", "nullable": true}}},
                "Image": {"type": "object", "properties": {"name": {"type": "string"}, "kernel": {"type": "string"}, "rootfs": {"type": "string"}, "cmdline": {"type": "string"}, "rootfs_bytes": {"type": "integer"}}},
                "Network": {"type": "object", "properties": {"name": {"type": "string"}, "bridge": {"type": "string"}, "cidr": {"type": "string"}, "gateway": {"type": "string"}, "nat": {"type": "boolean"}}},
                "Host": {"type": "object", "properties": {"name": {"type": "string"}, "address": {"type": "string"}, "state": {"type": "string", "enum": ["online", "offline", "joining"]},
                    "seen_at": {"type": "integer"}, "maintenance": {"type": "boolean"}, "cpus": {"type": "integer"}, "memory_mib": {"type": "integer"}, "allocatable_mib": {"type": "integer"}, "allocated_mib": {"type": "integer"}}},
                "ClusterConfig": {"type": "object", "properties": {"rebalance": {"type": "object", "properties": {
                    "enabled": {"type": "boolean"}, "window_s": {"type": "integer"}, "threshold_percent": {"type": "integer"},
                    "min_gain_percent": {"type": "integer"}, "cooldown_s": {"type": "integer"}, "max_moves": {"type": "integer"}}}}},
                "ConsolidationPlan": {"type": "object", "properties": {
                    "moves": {"type": "array", "items": {"type": "object", "properties": {"instance": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"}, "reason": {"type": "string"}}}},
                    "emptied": {"type": "array", "items": {"type": "string"}},
                    "kept": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "allocated_mib": {"type": "integer"}, "allocatable_mib": {"type": "integer"}, "vcpus": {"type": "integer"}, "why": {"type": "string"}}}},
                    "skipped": {"type": "array", "items": {"type": "string"}}}},
                "Operation": {"type": "object", "properties": {"id": {"type": "string"}, "kind": {"type": "string"}, "instance": {"type": "string"},
                    "state": {"type": "string", "enum": ["running", "succeeded", "failed"]}, "error": {"type": "string"}}},
                "Event": {"type": "object", "properties": {"time_ms": {"type": "integer"}, "instance": {"type": "string"}, "level": {"type": "string"}, "message": {"type": "string"}}},
                "Accepted": {"type": "object", "properties": {"operation": {"$ref": "#/components/schemas/Operation"}, "instance": {"$ref": "#/components/schemas/Instance"}}}
            }
        }
    })
}
