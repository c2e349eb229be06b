"""Carbon ledger, forecast, rules and the dispatcher (see docs/architecture.md: control)."""
