"""JSON Schemas of the ``--json`` outputs (draft 2020-12). Scripts may rely on these; a change
that breaks one bumps the ``schema`` field's version (``tunnelnat.status/v1`` ...)."""

from __future__ import annotations

from typing import Any

_TIME = {"type": ["string", "null"], "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"}
_IP = {"type": ["string", "null"]}
_INT = {"type": "integer", "minimum": 0}


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": sorted(properties),
        "additionalProperties": False,
        **extra,
    }


STATUS: dict[str, Any] = _object(
    {
        "schema": {"const": "tunnelnat.status/v1"},
        "deployment": {"type": "string"},
        "table": {"type": "string"},
        "region": {"type": "string"},
        "generated_at": _TIME,
        "gateway": _object(
            {
                "instance_id": {"type": ["string", "null"]},
                "desired_generation": _INT,
                "applied_generation": _INT,
                "applied_by": {"type": ["string", "null"]},
                "applied_at": _TIME,
                "in_sync": {"type": "boolean"},
            }
        ),
        # The gateway software (issue 22): the deployed package (the stack's SSM parameter) and
        # what each running gateway's pair agent says it runs (null: not reported).
        "software": _object(
            {
                "parameter": {"type": "string"},
                "deployed": {
                    "oneOf": [
                        {"type": "null"},
                        _object(
                            {
                                "version": {"type": ["string", "null"]},
                                "sha256": {"type": "string"},
                            }
                        ),
                    ]
                },
                "problem": {"type": ["string", "null"]},
                "gateways": {
                    "type": "array",
                    "items": _object(
                        {
                            "instance_id": {"type": "string"},
                            "version": {"type": ["string", "null"]},
                            "sha256": {"type": ["string", "null"]},
                            "deployed": {"type": ["boolean", "null"]},
                            "reported_at": _TIME,
                        }
                    ),
                },
            }
        ),
        # The gateway pair (issue 15): null for a single gateway.
        "pair": {
            "oneOf": [
                {"type": "null"},
                _object(
                    {
                        "active": {"type": ["string", "null"]},
                        "eni_id": {"type": ["string", "null"]},
                        "standbys": {
                            "type": "array",
                            "items": _object(
                                {
                                    "instance_id": {"type": "string"},
                                    "applied_generation": {"type": ["integer", "null"]},
                                    "behind": {"type": ["boolean", "null"]},
                                    "sas": {"type": ["integer", "null"]},
                                    "tunnel_loaded": {"type": ["boolean", "null"]},
                                    "heartbeat_heard_at": _TIME,
                                    "heard": {"type": ["boolean", "null"]},
                                    "reported_at": _TIME,
                                    "stale": {"type": "boolean"},
                                }
                            ),
                        },
                        "failovers": _INT,
                        "last_failover": {
                            "oneOf": [
                                {"type": "null"},
                                _object(
                                    {
                                        "from": {"type": ["string", "null"]},
                                        "to": {"type": ["string", "null"]},
                                        "at": _TIME,
                                        "detected_seconds": {"type": ["number", "null"]},
                                        "switch_seconds": {"type": ["number", "null"]},
                                        "reason": {"type": ["string", "null"]},
                                    }
                                ),
                            ]
                        },
                    }
                ),
            ]
        },
        "instances": {
            "type": "array",
            "items": _object(
                {
                    "instance_id": {"type": "string", "pattern": "^i-[0-9a-f]+$"},
                    "name": {"type": ["string", "null"]},
                    "state": {"type": "string"},
                    "private_ip": _IP,
                    "public_ip": _IP,
                    "status": {"type": "string"},
                    "reason": {"type": "string"},
                    "route_installed": {"type": "boolean"},
                    "mapped": {"type": "boolean"},
                    "updated_at": _TIME,
                }
            ),
        },
        "tunnels": {
            "type": "array",
            "items": _object(
                {
                    "tunnel": {"type": "string"},
                    "gateway": {"type": ["string", "null"]},
                    "state": {"enum": ["up", "down", "unknown"]},
                    "value": {"type": ["number", "null"]},
                    "timestamp": _TIME,
                }
            ),
        },
        "summary": _object(
            {
                "total": _INT,
                "enrolled": _INT,
                "pending": _INT,
                # Instances the controller skipped for a human to settle: status -> count.
                "attention": {"type": "object", "additionalProperties": _INT},
            }
        ),
    }
)

# Several partners (issue 23): present only when the deployment has lanes (a partners file);
# optional, so a one-partner deployment's document is the same v1 as before.
_NULL_INT = {"type": ["integer", "null"], "minimum": 0}
STATUS["properties"]["partners"] = {
    "type": "array",
    "items": _object(
        {
            "partner": {"type": "string"},
            "index": {"type": "integer", "minimum": 1},
            "tunnel": {"type": "string"},
            "ike_version": {"enum": [1, 2]},
            "endpoint": {"type": "string"},
            "networks": {"type": "array", "items": {"type": "string"}},
            "aliases": {"type": "array", "items": {"type": "string"}},
            "local_networks": {"type": "array", "items": {"type": "string"}},
            "nat_mode": {"type": "string"},
            "public_addresses": {"type": "array", "items": {"type": "string"}},
            "tag_key": {"type": "string"},
            "table": {"type": "string"},
            "tunnel_state": {"enum": ["up", "down", "unknown"]},
            "enrolled": _NULL_INT,
            "pending": _NULL_INT,
            "mapped": _NULL_INT,
            "desired_generation": _NULL_INT,
            "applied_generation": _NULL_INT,
            "problem": {"type": ["string", "null"]},
        }
    ),
}

ENROLL: dict[str, Any] = _object(
    {
        "schema": {"const": "tunnelnat.enroll/v1"},
        "action": {"enum": ["enroll", "unenroll"]},
        "instance_id": {"type": "string"},
        "result": {"enum": ["enrolled", "unenrolled", "failed", "timeout", "requested"]},
        "status": {"type": ["string", "null"]},
        "reason": {"type": ["string", "null"]},
        "public_ip": _IP,
        "message": {"type": "string"},
        "fix": {"type": ["string", "null"]},
    }
)

_VIEW = {
    "oneOf": [
        {"type": "null"},
        _object(
            {
                "status": {"type": ["string", "null"]},
                "reason": {"type": ["string", "null"]},
                "private_ip": _IP,
                "public_ip": _IP,
                "route_installed": {"type": "boolean"},
            }
        ),
    ]
}
_GENERATIONS = _object({"desired": _INT, "applied": _INT})

RECONCILE: dict[str, Any] = _object(
    {
        "schema": {"const": "tunnelnat.reconcile/v1"},
        "request_id": {"type": "string"},
        "message_id": {"type": ["string", "null"]},
        "queue_url": {"type": "string"},
        "instance_ids": {"type": "array", "items": {"type": "string"}},
        "waited": {"type": "boolean"},
        "completed": {"type": ["boolean", "null"]},
        "changes": {
            "type": "array",
            "items": _object(
                {
                    "instance_id": {"type": "string"},
                    "change": {"enum": ["added", "removed", "changed"]},
                    "before": _VIEW,
                    "after": _VIEW,
                }
            ),
        },
        "generation": _object(
            {"before": _GENERATIONS, "after": {"oneOf": [{"type": "null"}, _GENERATIONS]}}
        ),
    }
)

DOCTOR: dict[str, Any] = _object(
    {
        "schema": {"const": "tunnelnat.doctor/v1"},
        "deployment": {"type": "string"},
        "region": {"type": "string"},
        "healthy": {"type": "boolean"},
        "counts": _object({"ok": _INT, "fail": _INT, "unknown": _INT}),
        "findings": {
            "type": "array",
            "items": _object(
                {
                    "check": {"type": "string"},
                    "status": {"enum": ["ok", "fail", "unknown"]},
                    "summary": {"type": "string"},
                    "fix": {"type": ["string", "null"]},
                    "resource": {"type": ["string", "null"]},
                }
            ),
        },
    }
)

DLQ: dict[str, Any] = _object(
    {
        "schema": {"const": "tunnelnat.dlq/v1"},
        "dlq_url": {"type": "string"},
        "messages": {
            "type": "array",
            "items": _object(
                {
                    "message_id": {"type": "string"},
                    "sent_at": _TIME,
                    "receives": _INT,
                    "instance_ids": {"type": "array", "items": {"type": "string"}},
                    "full_reconcile": {"type": "boolean"},
                    "readable": {"type": "boolean"},
                    "reason": {"type": "string"},
                }
            ),
        },
        "redrive": {
            "oneOf": [
                {"type": "null"},
                _object(
                    {
                        "request_id": {"type": "string"},
                        "queue_url": {"type": "string"},
                        "instance_ids": {"type": "array", "items": {"type": "string"}},
                        "deleted": _INT,
                        "left": _INT,
                    }
                ),
            ]
        },
    }
)

# `tunnelnat partners check --json` (issue 23): the resolved plan, or every problem (valid false,
# partners empty). Each network: real (the selectors), local (what instances use), alias
# (declared, chosen from alias_block, or null when local is real).
PARTNERS: dict[str, Any] = _object(
    {
        "schema": {"const": "tunnelnat.partners/v1"},
        "file": {"type": "string"},
        "valid": {"type": "boolean"},
        "problems": {"type": "array", "items": {"type": "string"}},
        "vpc_cidrs": {"type": "array", "items": {"type": "string"}},
        "gateway_subnet": {"type": ["string", "null"]},
        "enrolment_tag_key": {"type": "string"},
        "alias_block": {"type": ["string", "null"]},
        "partners": {
            "type": "array",
            "items": _object(
                {
                    "name": {"type": "string"},
                    "tunnel": {"type": "string"},
                    "endpoint": {"type": "string"},
                    "ike_version": {"enum": [1, 2]},
                    "auth": {"enum": ["psk", "certificate"]},
                    "selector_layout": {"enum": ["single", "per-pair"]},
                    "start_action": {"enum": ["start", "none"]},
                    "networks": {
                        "type": "array",
                        "minItems": 1,
                        "items": _object(
                            {
                                "real": {"type": "string"},
                                "local": {"type": "string"},
                                "alias": {"enum": ["declared", "chosen", None]},
                            }
                        ),
                    },
                    "nat": _object(
                        {
                            "mode": {"enum": ["dedicated", "instance", "shared"]},
                            "addresses": {"type": "array", "items": {"type": "string"}},
                        }
                    ),
                    "tag_key": {"type": "string"},
                }
            ),
        },
    }
)
