"""Avatar Forcing real-time avatar server: command line and shared helpers."""

__version__ = "0.1.0"
