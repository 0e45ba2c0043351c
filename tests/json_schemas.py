"""Twenty JSON schemas of real-world shape, for structured-outputs tests and benchmarks/structured_outputs.py.

Each schema is small enough that a model can finish a valid instance in about 100-150 tokens: arrays carry
`maxItems`, free-text strings `maxLength`. Together they cover nested objects, arrays of objects, enums,
required and optional fields, bounded integers and numbers (inclusive and exclusive), string formats and
patterns that xgrammar enforces, `$ref` into `$defs` (chained), `anyOf`/`oneOf`, booleans, nulls,
`additionalProperties: false` and `minItems`/`maxItems`. `EXAMPLES` holds one hand-written valid instance
per schema; tests/test_json_schemas_corpus.py checks both against jsonschema and xgrammar.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_SHORT = {"type": "string", "maxLength": 40}

SCHEMAS: list[tuple[str, Schema]] = [
    # A person record: required vs optional fields, a bounded integer, an email, a nullable nickname.
    ("person", {
        "type": "object",
        "properties": {
            "name": _SHORT,
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string", "format": "email"},
            "employed": {"type": "boolean"},
            "nickname": {"type": ["string", "null"], "maxLength": 20},
        },
        "required": ["name", "age", "employed"],
        "additionalProperties": False,
    }),
    # A postal address: patterns, an enum of country codes, no extra keys.
    ("address", {
        "type": "object",
        "properties": {
            "street": _SHORT,
            "city": {"type": "string", "maxLength": 30},
            "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["US", "DE", "FR", "GB", "JP"]},
        },
        "required": ["street", "city", "postal_code", "country"],
        "additionalProperties": False,
    }),
    # An invoice with line items: `$ref` into `$defs`, an array of objects, a date, exclusive bounds.
    ("invoice", {
        "$defs": {
            "line_item": {
                "type": "object",
                "properties": {
                    "description": {"type": "string", "maxLength": 30},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "unit_price": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
                },
                "required": ["description", "quantity", "unit_price"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {
            "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
            "due_date": {"type": "string", "format": "date"},
            "currency": {"enum": ["USD", "EUR", "GBP"]},
            "items": {"type": "array", "items": {"$ref": "#/$defs/line_item"}, "minItems": 1, "maxItems": 3},
            "total": {"type": "number", "minimum": 0},
            "paid": {"type": "boolean"},
        },
        "required": ["invoice_number", "currency", "items", "total", "paid"],
        "additionalProperties": False,
    }),
    # A product catalog entry: a nested object, a bounded array of strings, a price above zero.
    ("product", {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
            "name": _SHORT,
            "price": {"type": "number", "exclusiveMinimum": 0},
            "in_stock": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3},
            "dimensions_cm": {
                "type": "object",
                "properties": {
                    "width": {"type": "number", "minimum": 0},
                    "height": {"type": "number", "minimum": 0},
                    "depth": {"type": "number", "minimum": 0},
                },
                "required": ["width", "height", "depth"],
                "additionalProperties": False,
            },
        },
        "required": ["sku", "name", "price", "in_stock"],
        "additionalProperties": False,
    }),
    # A calendar event: date-time formats, an array of emails, an enum, a nullable location.
    ("calendar_event", {
        "type": "object",
        "properties": {
            "title": _SHORT,
            "start": {"type": "string", "format": "date-time"},
            "end": {"type": "string", "format": "date-time"},
            "attendees": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 3},
            "location": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
            "recurrence": {"enum": ["none", "daily", "weekly", "monthly"]},
        },
        "required": ["title", "start", "end", "recurrence"],
        "additionalProperties": False,
    }),
    # A GitHub issue: `$ref` to a shared user twice, a nullable assignee, label enums, a positive number.
    ("github_issue", {
        "$defs": {
            "user": {
                "type": "object",
                "properties": {
                    "login": {"type": "string", "pattern": "^[a-z0-9-]{1,20}$"},
                    "id": {"type": "integer", "minimum": 1},
                },
                "required": ["login", "id"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {
            "number": {"type": "integer", "minimum": 1},
            "title": {"type": "string", "maxLength": 60},
            "state": {"enum": ["open", "closed"]},
            "author": {"$ref": "#/$defs/user"},
            "assignee": {"anyOf": [{"$ref": "#/$defs/user"}, {"type": "null"}]},
            "labels": {
                "type": "array",
                "items": {"enum": ["bug", "enhancement", "question", "documentation"]},
                "maxItems": 3,
            },
        },
        "required": ["number", "title", "state", "author", "assignee", "labels"],
        "additionalProperties": False,
    }),
    # A weather report: numbers with physical bounds, an integer percentage, a nested wind object.
    ("weather_report", {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "temperature_c": {"type": "number", "minimum": -90, "maximum": 60},
            "humidity_pct": {"type": "integer", "minimum": 0, "maximum": 100},
            "conditions": {"enum": ["sunny", "cloudy", "rain", "snow", "fog", "storm"]},
            "wind": {
                "type": "object",
                "properties": {
                    "speed_kmh": {"type": "number", "minimum": 0, "maximum": 400},
                    "direction": {"enum": ["N", "NE", "E", "SE", "S", "SW", "W", "NW"]},
                },
                "required": ["speed_kmh", "direction"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "temperature_c", "humidity_pct", "conditions", "wind"],
        "additionalProperties": False,
    }),
    # A sentiment label with a confidence in [0, 1].
    ("sentiment", {
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["label", "confidence"],
        "additionalProperties": False,
    }),
    # A named-entity extraction result: an array of objects with an enum type and character offsets.
    ("named_entities", {
        "type": "object",
        "properties": {
            "entities": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string", "maxLength": 30},
                        "type": {"enum": ["PERSON", "ORG", "LOC", "DATE", "MISC"]},
                        "start": {"type": "integer", "minimum": 0},
                        "end": {"type": "integer", "minimum": 0},
                    },
                    "required": ["text", "type", "start", "end"],
                    "additionalProperties": False,
                },
                "maxItems": 4,
            },
        },
        "required": ["entities"],
        "additionalProperties": False,
    }),
    # A recipe: two bounded arrays (objects and strings), a unit enum, a quantity above zero.
    ("recipe", {
        "type": "object",
        "properties": {
            "name": _SHORT,
            "servings": {"type": "integer", "minimum": 1, "maximum": 12},
            "vegetarian": {"type": "boolean"},
            "ingredients": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "item": {"type": "string", "maxLength": 20},
                        "quantity": {"type": "number", "exclusiveMinimum": 0},
                        "unit": {"enum": ["g", "kg", "ml", "l", "tsp", "tbsp", "cup", "piece"]},
                    },
                    "required": ["item", "quantity", "unit"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 4,
            },
            "steps": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "servings", "vegetarian", "ingredients", "steps"],
        "additionalProperties": False,
    }),
    # A flight booking: `$ref` to a passenger, IATA-code and seat patterns, a date-time, a cabin enum.
    ("flight_booking", {
        "$defs": {
            "passenger": {
                "type": "object",
                "properties": {
                    "first_name": {"type": "string", "maxLength": 20},
                    "last_name": {"type": "string", "maxLength": 20},
                    "seat": {"type": "string", "pattern": "^[0-9]{1,2}[A-F]$"},
                },
                "required": ["first_name", "last_name"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {
            "booking_ref": {"type": "string", "pattern": "^[A-Z0-9]{6}$"},
            "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "departure": {"type": "string", "format": "date-time"},
            "cabin": {"enum": ["economy", "premium_economy", "business", "first"]},
            "passengers": {"type": "array", "items": {"$ref": "#/$defs/passenger"}, "minItems": 1, "maxItems": 2},
        },
        "required": ["booking_ref", "origin", "destination", "departure", "cabin", "passengers"],
        "additionalProperties": False,
    }),
    # A log record: an enum level, a timestamp, an optional request id (uuid).
    ("log_record", {
        "type": "object",
        "properties": {
            "timestamp": {"type": "string", "format": "date-time"},
            "level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]},
            "logger": {"type": "string", "pattern": "^[a-z_]+(\\.[a-z_]+){0,3}$"},
            "message": {"type": "string", "maxLength": 80},
            "request_id": {"type": "string", "format": "uuid"},
        },
        "required": ["timestamp", "level", "logger", "message"],
        "additionalProperties": False,
    }),
    # A tool call: `oneOf` over three tools' argument objects, told apart by a `const` name.
    ("tool_call", {
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": "get_weather"},
                    "arguments": {
                        "type": "object",
                        "properties": {
                            "location": {"type": "string", "maxLength": 30},
                            "unit": {"enum": ["celsius", "fahrenheit"]},
                        },
                        "required": ["location", "unit"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "name": {"const": "search_web"},
                    "arguments": {
                        "type": "object",
                        "properties": {
                            "query": {"type": "string", "maxLength": 50},
                            "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
                        },
                        "required": ["query"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "name": {"const": "send_email"},
                    "arguments": {
                        "type": "object",
                        "properties": {
                            "to": {"type": "string", "format": "email"},
                            "subject": {"type": "string", "maxLength": 40},
                        },
                        "required": ["to", "subject"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
        ],
    }),
    # A tree three levels deep through a chain of `$ref`s (a recursive `$ref` compiles too, but lets a small
    # greedy model nest without end): each node has at most two children.
    ("tree", {
        "$defs": {
            "leaf": {"type": "object", "properties": {"label": {"type": "string", "maxLength": 12}},
                     "required": ["label"], "additionalProperties": False},
            "child": {"type": "object", "properties": {
                "label": {"type": "string", "maxLength": 12},
                "children": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 2}},
                "required": ["label"], "additionalProperties": False},
        },
        "type": "object",
        "properties": {
            "label": {"type": "string", "maxLength": 12},
            "children": {"type": "array", "items": {"$ref": "#/$defs/child"}, "maxItems": 2},
        },
        "required": ["label"],
        "additionalProperties": False,
    }),
    # User settings: booleans, a nested object, a nullable timezone, a language-tag pattern.
    ("user_settings", {
        "type": "object",
        "properties": {
            "theme": {"enum": ["light", "dark", "system"]},
            "language": {"type": "string", "pattern": "^[a-z]{2}(-[A-Z]{2})?$"},
            "timezone": {"type": ["string", "null"], "maxLength": 30},
            "notifications": {
                "type": "object",
                "properties": {
                    "email": {"type": "boolean"},
                    "sms": {"type": "boolean"},
                    "push": {"type": "boolean"},
                },
                "required": ["email", "sms", "push"],
                "additionalProperties": False,
            },
        },
        "required": ["theme", "language", "timezone", "notifications"],
        "additionalProperties": False,
    }),
    # A shipment's tracking history: an array of event objects, `anyOf` a date-time or null.
    ("shipment_tracking", {
        "type": "object",
        "properties": {
            "tracking_number": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{9}[A-Z]{2}$"},
            "status": {"enum": ["label_created", "in_transit", "out_for_delivery", "delivered", "exception"]},
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "time": {"type": "string", "format": "date-time"},
                        "location": {"type": "string", "maxLength": 30},
                    },
                    "required": ["time", "location"],
                    "additionalProperties": False,
                },
                "maxItems": 3,
            },
            "delivered_at": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
        },
        "required": ["tracking_number", "status", "events", "delivered_at"],
        "additionalProperties": False,
    }),
    # A movie review: bounded integers, a boolean, a longer free-text field.
    ("movie_review", {
        "type": "object",
        "properties": {
            "title": _SHORT,
            "year": {"type": "integer", "minimum": 1888, "maximum": 2030},
            "rating": {"type": "integer", "minimum": 1, "maximum": 10},
            "would_recommend": {"type": "boolean"},
            "summary": {"type": "string", "maxLength": 120},
        },
        "required": ["title", "year", "rating", "would_recommend", "summary"],
        "additionalProperties": False,
    }),
    # A bank transaction: an exclusive maximum, an IBAN pattern, a nullable counterparty, a date.
    ("bank_transaction", {
        "type": "object",
        "properties": {
            "iban": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}[A-Z0-9]{10,20}$"},
            "amount": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1000000},
            "direction": {"enum": ["debit", "credit"]},
            "booked_on": {"type": "string", "format": "date"},
            "pending": {"type": "boolean"},
            "counterparty": {"type": ["string", "null"], "maxLength": 30},
        },
        "required": ["iban", "amount", "direction", "booked_on", "pending", "counterparty"],
        "additionalProperties": False,
    }),
    # An HTTP API error body: a status in 400-599, a nested error object, a nullable retry delay.
    ("api_error", {
        "type": "object",
        "properties": {
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "pattern": "^[a-z_]{3,30}$"},
                    "message": {"type": "string", "maxLength": 80},
                },
                "required": ["code", "message"],
                "additionalProperties": False,
            },
            "retry_after_s": {"type": ["integer", "null"], "minimum": 0, "maximum": 3600},
        },
        "required": ["status", "error", "retry_after_s"],
        "additionalProperties": False,
    }),
    # Keyword extraction: one to eight short strings, and the language they were found in.
    ("keywords", {
        "type": "object",
        "properties": {
            "keywords": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 20},
                         "minItems": 1, "maxItems": 8},
            "language": {"enum": ["en", "de", "fr", "es", "other"]},
        },
        "required": ["keywords", "language"],
        "additionalProperties": False,
    }),
]

EXAMPLES: dict[str, Any] = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "employed": False, "nickname": None},
    "address": {"street": "221B Baker Street", "city": "London", "postal_code": "12345", "country": "GB"},
    "invoice": {
        "invoice_number": "INV-0042", "due_date": "2025-03-31", "currency": "EUR",
        "items": [{"description": "Consulting", "quantity": 3, "unit_price": 120.5},
                  {"description": "Travel", "quantity": 1, "unit_price": 80}],
        "total": 441.5, "paid": False,
    },
    "product": {"sku": "KTC-042", "name": "Chef's knife", "price": 49.99, "in_stock": True,
                "tags": ["kitchen", "steel"], "dimensions_cm": {"width": 4.5, "height": 2, "depth": 33}},
    "calendar_event": {"title": "Sprint review", "start": "2025-06-02T14:00:00Z", "end": "2025-06-02T15:00:00Z",
                       "attendees": ["bob@example.com", "eve@example.com"], "location": None, "recurrence": "weekly"},
    "github_issue": {"number": 1234, "title": "Crash when max_tokens is 0", "state": "open",
                     "author": {"login": "octocat", "id": 583231}, "assignee": None, "labels": ["bug"]},
    "weather_report": {"city": "Oslo", "temperature_c": -3.5, "humidity_pct": 81, "conditions": "snow",
                       "wind": {"speed_kmh": 12.4, "direction": "NW"}},
    "sentiment": {"label": "positive", "confidence": 0.93},
    "named_entities": {"entities": [{"text": "Marie Curie", "type": "PERSON", "start": 0, "end": 11},
                                    {"text": "Paris", "type": "LOC", "start": 24, "end": 29}]},
    "recipe": {"name": "Pancakes", "servings": 4, "vegetarian": True,
               "ingredients": [{"item": "flour", "quantity": 200, "unit": "g"},
                               {"item": "milk", "quantity": 0.3, "unit": "l"},
                               {"item": "egg", "quantity": 2, "unit": "piece"}],
               "steps": ["Whisk everything", "Fry in a hot pan"]},
    "flight_booking": {"booking_ref": "X7K2QP", "origin": "CDG", "destination": "JFK",
                       "departure": "2025-09-14T10:35:00+02:00", "cabin": "economy",
                       "passengers": [{"first_name": "Jean", "last_name": "Dupont", "seat": "23C"}]},
    "log_record": {"timestamp": "2025-01-07T08:15:30.120Z", "level": "ERROR", "logger": "pagedllm.engine",
                   "message": "engine core died", "request_id": "123e4567-e89b-12d3-a456-426614174000"},
    "tool_call": {"name": "get_weather", "arguments": {"location": "Berlin", "unit": "celsius"}},
    "tree": {"label": "root", "children": [{"label": "a", "children": [{"label": "a1"}]}, {"label": "b"}]},
    "user_settings": {"theme": "dark", "language": "en-GB", "timezone": None,
                      "notifications": {"email": True, "sms": False, "push": True}},
    "shipment_tracking": {"tracking_number": "RR123456785DE", "status": "in_transit",
                          "events": [{"time": "2025-02-01T09:00:00Z", "location": "Leipzig hub"}],
                          "delivered_at": None},
    "movie_review": {"title": "Metropolis", "year": 1927, "rating": 9, "would_recommend": True,
                     "summary": "A silent epic whose city still looks like the future."},
    "bank_transaction": {"iban": "DE89370400440532013000", "amount": 1250.75, "direction": "credit",
                         "booked_on": "2025-04-30", "pending": False, "counterparty": "ACME GmbH"},
    "api_error": {"status": 429, "error": {"code": "rate_limited", "message": "Too many requests"},
                  "retry_after_s": 30},
    "keywords": {"keywords": ["paged attention", "kv cache", "scheduler"], "language": "en"},
}
