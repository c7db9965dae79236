"""Model checkpoints as an operator meets them: registry, hub / local resolution, conversion, verification
and loading. The rest of the project calls `weights.loading.load_model(cfg, weights, device)`."""
