"""Device simulators with physics that stand in for plant hardware over real sockets."""
