"""Avatar Forcing networks, sampling and the streaming engine."""

if not __name__.startswith("avatar_forcing."):
    # The folder is installed as avatar_forcing.model; a bare name would shadow or be shadowed.
    raise ImportError(f"import avatar_forcing.{__name__}, not {__name__}")
