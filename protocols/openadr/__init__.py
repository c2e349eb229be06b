"""OpenADR 2.0b: the server as VTN for external energy management systems (VENs)."""
