"""The Redis Streams bus and the stages that consume it (historian, live fan-out)."""
