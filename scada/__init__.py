"""CarbonOS SCADA: real-time monitoring and carbon-energy co-control server.

``scada.model`` and ``scada.runtime`` are the shared kernel; ``scada.app`` wires the feature
packages (protocols, streams, anomaly, control_engine) together.
"""

__version__ = "0.1.0"
