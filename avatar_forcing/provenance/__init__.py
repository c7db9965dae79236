"""Provenance of generated video: an invisible watermark in every frame, a visible label (option), a C2PA
manifest on written files, and the detector that checks all of it (`avatar-forcing provenance check`)."""
