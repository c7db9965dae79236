"""Model checkpoints as an operator meets them: registry, hub / local resolution, conversion, verification
and loading. The rest of the project calls `weights.loading.load_model(cfg, weights, device)`."""

if not __name__.startswith("avatar_forcing."):
    # The folder is installed as avatar_forcing.weights; a bare name would shadow or be shadowed.
    raise ImportError(f"import avatar_forcing.{__name__}, not {__name__}")
