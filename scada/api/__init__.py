"""The REST API (aiohttp): routes, problem+json errors and the live websocket."""
