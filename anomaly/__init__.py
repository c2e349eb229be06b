"""Online anomaly detection and alarm management (see docs/architecture.md: anomaly)."""
