"""Media input/output for the avatar server: audio, video, images and face crops.

Every function here raises `avatar_forcing.errors.MediaError` for bad input (missing file, not
decodable, empty, no face), so callers can show the message to the user as it is.
"""

import importlib
from typing import Any

# Names re-exported from the submodules, imported on first use: importing one submodule (the engine uses
# audio and face) must not pull in PyAV's video stack (absent on the GPU check's machine).
_HOME = {
    **dict.fromkeys(("StreamingResampler", "float_to_pcm16", "load_audio", "pcm16_to_float", "read_wav_bytes"),
                    "audio"),
    **dict.fromkeys(("Box", "FaceDetector", "FaceTracker", "crop_portrait", "crop_video_fixed", "fixed_crop_box",
                     "square_crop_box"), "face"),
    **dict.fromkeys(("load_image", "resize_square", "to_model_input", "to_uint8"), "image"),
    **dict.fromkeys(("Mp4Writer", "VideoInfo", "iter_video_frames", "probe_video", "read_video_frames"), "video"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


__all__ = [
    "Box",
    "FaceDetector",
    "FaceTracker",
    "Mp4Writer",
    "StreamingResampler",
    "VideoInfo",
    "crop_portrait",
    "crop_video_fixed",
    "fixed_crop_box",
    "float_to_pcm16",
    "iter_video_frames",
    "load_audio",
    "load_image",
    "pcm16_to_float",
    "probe_video",
    "read_video_frames",
    "read_wav_bytes",
    "resize_square",
    "square_crop_box",
    "to_model_input",
    "to_uint8",
]
