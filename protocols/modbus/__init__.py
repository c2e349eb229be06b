"""Modbus TCP: register-map configuration, codec and driver."""
