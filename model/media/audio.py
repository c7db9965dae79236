"""Audio decoding, resampling and PCM conversions.

The model wants float32 mono at 16 kHz in [-1, 1]. Files can come in any container PyAV decodes;
uploads come as WAV bodies; the live microphone comes as int16 chunks at the browser's rate.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

import numpy as np

from avatar_forcing.errors import MediaError
from avatar_forcing.model.media._open import open_input

if TYPE_CHECKING:  # PyAV is imported where it is used: the engine and the GPU check run without it
    import av

# Full scale of each integer sample format, so that integer PCM maps to [-1, 1).
_INT_FULL_SCALE = {"s16": 32768.0, "s32": 2147483648.0}


MIN_WAV_RATE, MAX_WAV_RATE = 1000, 384000  # what a WAV may sensibly declare; beyond, the resampler overflows


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """A decoded audio frame of any sample format and layout -> float32 mono in [-1, 1]."""
    return _frame_to_channels(frame).mean(axis=0)


def _frame_to_channels(frame: av.AudioFrame) -> np.ndarray:
    """Decoded frame -> float32 array [channels, samples] in [-1, 1]."""
    channels = frame.layout.nb_channels
    data = frame.to_ndarray()
    if not frame.format.is_planar:
        # Packed formats come as one row of interleaved samples.
        data = data.reshape(-1, channels).T
    base = frame.format.name.rstrip("p")  # "s16p" -> "s16", "fltp" -> "flt"
    if base in ("flt", "dbl"):
        return data.astype(np.float32, copy=False)
    if base == "u8":
        return (data.astype(np.float32) - 128.0) / 128.0
    if base in _INT_FULL_SCALE:
        return data.astype(np.float32) / _INT_FULL_SCALE[base]
    if base == "s64":
        return (data.astype(np.float64) / 9223372036854775808.0).astype(np.float32)
    raise MediaError(f"unsupported decoded audio sample format {frame.format.name!r}: convert the file to WAV")


def _trim_to_declared_length(audio: np.ndarray, declared_s: float | None, sample_rate: int) -> np.ndarray:
    """Drop codec padding past the stream's declared duration.

    AAC/MP3 encoders pad the last frame with silence (up to ~1024 samples); the container's duration
    (an mp4 edit list) says where the real audio ends. Only a small excess is trimmed, so an estimated
    duration (e.g. a VBR mp3 without a header) can never cut real audio by more than 0.1 s.
    """
    if not declared_s:
        return audio
    n = round(declared_s * sample_rate)
    if 0 < n < audio.size <= n + 0.1 * sample_rate:
        return audio[:n]
    return audio


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Decode the first audio stream of any file PyAV reads -> float32 mono at `sample_rate`, in [-1, 1]."""
    import av

    container = open_input(path, "audio")
    try:
        if not container.streams.audio:
            raise MediaError(
                f"{path} has no audio stream: give a file that contains sound (wav, mp3, or a video with audio)"
            )
        stream = container.streams.audio[0]
        declared_s = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        resampler: StreamingResampler | None = None
        pieces: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                if resampler is None:
                    resampler = StreamingResampler(frame.sample_rate, sample_rate)
                # Plain average of the channels: the model listens to speech, not to the stereo image.
                mono = frame_to_mono(frame)
                pieces.append(resampler.push(mono))
        except av.FFmpegError as e:
            raise MediaError(
                f"could not decode the audio of {path} ({e}): the file is damaged; re-export it"
            ) from e
        if resampler is not None:
            pieces.append(resampler.flush())
    finally:
        container.close()
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    audio = _trim_to_declared_length(audio, declared_s, sample_rate)
    if audio.size == 0:
        raise MediaError(f"{path} contains no audio samples: record or export a non-empty audio track")
    return np.clip(np.nan_to_num(audio), -1.0, 1.0).astype(np.float32, copy=False)


def _as_float_mono(pcm: np.ndarray) -> np.ndarray:
    """int16 or float mono chunk -> contiguous float32 1-D array."""
    x = np.asarray(pcm)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"expected a mono 1-D chunk, got shape {x.shape}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected int16 or float samples, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


class StreamingResampler:
    """Resample a mono stream chunk by chunk, with the filter state carried across chunks.

    Why libswresample (through av.AudioResampler) rather than our own filter: it is a windowed-sinc
    polyphase resampler with good stop-band rejection (wav2vec2 features are sensitive to aliasing
    and to pitch errors), it keeps the filter history between calls so chunked output equals one-shot
    output, it handles any rate pair (48k/44.1k/16k), and PyAV is already a dependency (aiortc).
    """

    def __init__(self, in_rate: int, out_rate: int):
        if int(in_rate) <= 0 or int(out_rate) <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self._identity = self.in_rate == self.out_rate
        self._resampler = self._new_resampler()

    def _new_resampler(self) -> av.AudioResampler | None:
        if self._identity:
            return None
        import av

        return av.AudioResampler(format="flt", layout="mono", rate=self.out_rate)

    @staticmethod
    def _collect(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros(0, np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32, copy=False)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Feed one chunk; returns the resampled samples ready so far (may lag by the filter's delay)."""
        x = _as_float_mono(pcm)
        resampler = self._resampler
        if resampler is None:  # same rate in and out
            return x.copy()
        if x.size == 0:
            return np.zeros(0, np.float32)
        import av

        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = self.in_rate
        return self._collect(resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """Drain the samples still held in the filter; the resampler can then start a new stream."""
        if self._resampler is None:  # same rate in and out: nothing held
            return np.zeros(0, np.float32)
        out = self._collect(self._resampler.resample(None))
        # A flushed filter graph accepts no more input: start afresh for the next stream.
        self._resampler = self._new_resampler()
        return out


def resample(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """A whole clip (mono) from one rate to another, float32."""
    if from_rate == to_rate:
        return _as_float_mono(pcm).copy()
    resampler = StreamingResampler(from_rate, to_rate)
    return np.concatenate([resampler.push(pcm), resampler.flush()])


def pcm16_to_float(b: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Little-endian int16 PCM (bytes or an int16 array) -> float32 in [-1, 1)."""
    if isinstance(b, np.ndarray):
        if b.dtype != np.int16:
            raise ValueError(f"expected an int16 array, got {b.dtype}")
        samples = b
    else:
        raw = bytes(b)
        if len(raw) % 2:
            raise MediaError(f"16-bit PCM data has an odd number of bytes ({len(raw)}): the audio chunk is cut")
        samples = np.frombuffer(raw, dtype="<i2")
    return samples.astype(np.float32) / 32768.0


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float samples -> int16, clipping to [-1, 1] first so loud samples saturate instead of wrapping."""
    y = np.nan_to_num(np.asarray(x, dtype=np.float32))
    return np.rint(np.clip(y, -1.0, 1.0) * 32767.0).astype(np.int16)


# WAV format tags (from the RIFF WAVE format): integer PCM, IEEE float, and the "extensible" wrapper.
_WAVE_PCM = 0x0001
_WAVE_FLOAT = 0x0003
_WAVE_EXTENSIBLE = 0xFFFE
# Streaming writers that do not know the length put this in the data chunk's size field.
_UNKNOWN_SIZE = 0xFFFFFFFF


def _decode_wav_samples(raw: bytes, tag: int, bits: int) -> np.ndarray:
    """Interleaved sample bytes -> float32 1-D array."""
    if tag == _WAVE_FLOAT:
        return np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    if bits == 8:  # 8-bit WAV is unsigned, centred on 128
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if bits == 16:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)  # sign-extend 24 -> 32 bits
        return v.astype(np.float32) / 8388608.0
    return (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)


def read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Parse an uploaded WAV body -> (float32 mono in [-1, 1], sample rate).

    Our own small RIFF reader: the stdlib `wave` module reads integer PCM only, and uploads from
    browsers and tools are often float32 or WAVE_FORMAT_EXTENSIBLE.
    """
    data = bytes(data)
    if len(data) < 12 or data[0:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise MediaError("the upload is not a WAV file (no RIFF/WAVE header): send a .wav file")
    fmt: tuple[int, int, int, int, int] | None = None
    pcm: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        start = pos + 8
        available = len(data) - start
        if chunk_id == b"fmt ":
            if size < 16 or size > available:
                raise MediaError("the WAV header is truncated (short 'fmt ' chunk): re-export the file")
            tag, channels, rate, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", data[start : start + 16])
            if tag == _WAVE_EXTENSIBLE and size >= 26:
                # The real format tag is the first two bytes of the sub-format GUID.
                (tag,) = struct.unpack("<H", data[start + 24 : start + 26])
            fmt = (tag, channels, rate, block_align, bits)
        elif chunk_id == b"data":
            if size > available:
                if size != _UNKNOWN_SIZE:
                    raise MediaError(
                        f"the WAV file is truncated: its header announces {size} bytes of audio but only "
                        f"{available} are present; upload the complete file"
                    )
                size = available
            pcm = data[start : start + size]
        pos = start + size + (size & 1)  # chunks are padded to an even length
    if fmt is None:
        raise MediaError("the WAV file has no 'fmt ' chunk (bad or truncated header): re-export the file")
    if pcm is None:
        raise MediaError("the WAV file has no 'data' chunk (truncated?): upload the complete file")
    tag, channels, rate, block_align, bits = fmt
    supported = (tag == _WAVE_PCM and bits in (8, 16, 24, 32)) or (tag == _WAVE_FLOAT and bits in (32, 64))
    if not supported:
        raise MediaError(
            f"unsupported WAV encoding (format tag {tag:#x}, {bits} bits): convert it to 16-bit PCM or float32 WAV"
        )
    if channels < 1 or rate < 1 or block_align != channels * bits // 8:
        raise MediaError(
            f"the WAV header is inconsistent ({channels} channels, {rate} Hz, block align {block_align}, "
            f"{bits} bits): re-export the file"
        )
    if not MIN_WAV_RATE <= rate <= MAX_WAV_RATE:
        raise MediaError(f"the WAV sample rate {rate} Hz is outside {MIN_WAV_RATE}-{MAX_WAV_RATE} Hz: "
                         "re-export the audio at a usual rate (16, 24, 44.1 or 48 kHz)")
    n_frames = len(pcm) // block_align
    if n_frames == 0:
        raise MediaError("the WAV file contains zero audio samples: record some sound and upload again")
    samples = _decode_wav_samples(pcm[: n_frames * block_align], tag, bits)
    mono = samples.reshape(n_frames, channels).mean(axis=1)
    return np.clip(np.nan_to_num(mono), -1.0, 1.0).astype(np.float32), rate
