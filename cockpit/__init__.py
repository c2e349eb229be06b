"""Operator and big-screen cockpits; a client of the REST API and websocket, like any other."""
