"""Media input/output for the avatar server: audio, video, images and face crops.

Every function here raises `avatar_forcing.errors.MediaError` for bad input (missing file, not
decodable, empty, no face), so callers can show the message to the user as it is.
"""

from avatar_forcing.model.media.audio import (
    StreamingResampler,
    float_to_pcm16,
    load_audio,
    pcm16_to_float,
    read_wav_bytes,
)
from avatar_forcing.model.media.face import (
    Box,
    FaceDetector,
    FaceTracker,
    crop_portrait,
    crop_video_fixed,
    fixed_crop_box,
    square_crop_box,
)
from avatar_forcing.model.media.image import load_image, resize_square, to_model_input, to_uint8
from avatar_forcing.model.media.video import Mp4Writer, VideoInfo, iter_video_frames, probe_video, read_video_frames

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
