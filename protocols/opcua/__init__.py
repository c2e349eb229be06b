"""OPC UA client driver (asyncua): subscriptions, reads, writes and method calls, with security."""
