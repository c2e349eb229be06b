"""MQTT driver (gmqtt): JSON telemetry on configurable topics, commands with correlation ids."""
