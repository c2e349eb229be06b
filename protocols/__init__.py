"""Device drivers: translate each wire protocol to and from readings and commands."""
