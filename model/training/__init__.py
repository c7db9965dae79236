"""Training of the Avatar Forcing networks: diffusion forcing, label-free DPO, the motion auto-encoder,
and the paper's evaluation metrics. Nothing here imports the server or the weights package."""
