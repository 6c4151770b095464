"""Home Assistant MQTT discovery: a car appears as a device with sensors, with no set-up.

Retained config messages under ``<prefix>/<component>/<node>/<object>/config``; availability follows the
car's retained state topic, so a dead car shows as unavailable. Republished whenever Home Assistant
announces itself on ``<prefix>/status`` (it forgets non-retained state on restart).
"""

from __future__ import annotations

import json
from typing import Any

from agent.telemetry.topics import Topics

SENSORS = [  # object id, name, value template on the telemetry payload, unit, device class
    ("mode", "Mode", "{{ value_json['values']['mode'] }}", None, None),
    ("loop_hz", "Loop rate", "{{ value_json['values']['loop_hz'] }}", "Hz", "frequency"),
    ("period_error_p99", "Period error p99", "{{ value_json['values']['period_error_p99_ms'] }}", "ms", "duration"),
    ("throttle", "Throttle", "{{ value_json['values']['throttle'] }}", None, None),
    ("steering", "Steering", "{{ value_json['values']['steering'] }}", None, None),
    ("faults", "Faults", "{{ value_json['values']['faults'] | join(', ') or 'none' }}", None, None),
    ("cpu_temp", "CPU temperature", "{{ value_json['values'].get('cpu_temp_c') }}", "°C", "temperature"),
]


def discovery(topics: Topics, identity: dict[str, Any], prefix: str = "homeassistant") -> list[tuple[str, str]]:
    fleet, car = identity["fleet"], identity["car_id"]
    node = f"donkey_{fleet}_{car}"
    device = {"identifiers": [node], "name": f"DonkeyCar {car} ({fleet})", "manufacturer": "donkey-agent",
              "model": "DonkeyCar", "sw_version": identity.get("agent_version", "")}
    availability = {"availability_topic": topics.state, "availability_template": "{{ value_json.state }}",
                    "payload_available": "online", "payload_not_available": "offline"}
    messages = []
    for object_id, name, template, unit, device_class in SENSORS:
        config: dict[str, Any] = {"name": name, "unique_id": f"{node}_{object_id}", "object_id": f"{node}_{object_id}",
                                  "state_topic": topics.telemetry, "value_template": template, "device": device,
                                  **availability}
        if unit:
            config["unit_of_measurement"] = unit
        if device_class:
            config["device_class"] = device_class
            config["state_class"] = "measurement"
        messages.append((f"{prefix}/sensor/{node}/{object_id}/config", json.dumps(config)))
    fault = {"name": "Fault", "unique_id": f"{node}_fault", "object_id": f"{node}_fault", "device_class": "problem",
             "state_topic": topics.telemetry, "device": device, **availability,
             "value_template": "{{ 'ON' if value_json['values']['faults'] else 'OFF' }}"}
    messages.append((f"{prefix}/binary_sensor/{node}/fault/config", json.dumps(fault)))
    return messages
