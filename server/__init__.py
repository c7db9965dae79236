"""The WebRTC server: signalling, sessions, the model worker, playout, metrics and the web page."""

if not __name__.startswith("avatar_forcing."):
    # The folder is installed as avatar_forcing.server; a bare name would shadow or be shadowed.
    raise ImportError(f"import avatar_forcing.{__name__}, not {__name__}")
