"""Avatar Forcing networks, sampling and the streaming engine."""
