"""Fleet telemetry over MQTT: presence, live telemetry, durable events (and, next, commands)."""
