"""wav2vec2 audio features at the video frame rate (MODEL_SPEC §2.2).

The CNN features are linearly resampled to one vector per video frame *before* the feature projection, the
encoder layers run one by one and their outputs are stacked layer-major per frame, then projected.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Model

from .config import AudioEncoderConfig


def normalize_utterance(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the whole clip, as Wav2Vec2FeatureExtractor(do_normalize) does."""
    x = np.asarray(wave.cpu() if isinstance(wave, torch.Tensor) else wave, dtype=np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


class AudioEncoder(nn.Module):
    """wav2vec2 over raw 16 kHz speech, every hidden layer stacked per frame and projected to dim_a
    (MODEL_SPEC §2.2): [B, samples] -> [B, frames, dim_a]."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.config = cfg
        backbone_cfg = cfg.backbone_config()
        if backbone_cfg.do_stable_layer_norm:
            raise ValueError("pre-LN (do_stable_layer_norm) wav2vec2 variants are not supported: "
                             "the model was trained on the post-LN base architecture")
        self.wav2vec2 = Wav2Vec2Model(backbone_cfg)
        self.wav2vec2.requires_grad_(False)
        self.audio_projection = nn.Sequential(
            nn.Linear(cfg.projection_in_features(), cfg.dim_a),
            nn.LayerNorm(cfg.dim_a),
            nn.SiLU(),
        )

    def pad_waveform(self, wave: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Replicate-pad [B, N] at the end to num_frames * samples_per_frame samples."""
        short = num_frames * self.config.samples_per_frame - wave.shape[-1]
        if short > 0:
            wave = F.pad(wave.unsqueeze(1), (0, short), mode="replicate").squeeze(1)
        return wave

    def cnn_features(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, C, N'] at about 50 Hz."""
        return self.wav2vec2.feature_extractor(wave)

    @staticmethod
    def to_frame_rate(cnn: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[B, C, N'] -> [B, num_frames, C] by linear interpolation with aligned end points."""
        out = F.interpolate(cnn.float(), size=num_frames, mode="linear", align_corners=True)
        return out.transpose(1, 2).to(cnn.dtype)

    def encoder_layers(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Per-frame CNN features [B, T, C] -> [encoder input, layer 1 output, ..., layer L output]."""
        w2v = self.wav2vec2
        hidden, _ = w2v.feature_projection(frames)
        hidden = hidden + w2v.encoder.pos_conv_embed(hidden)
        hidden = w2v.encoder.layer_norm(hidden)
        states = [hidden]
        for layer in w2v.encoder.layers:
            hidden = layer(hidden)
            if isinstance(hidden, tuple):  # older transformers return (hidden, attentions)
                hidden = hidden[0]
            states.append(hidden)
        return states

    def stacked_features(self, wave: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised waveform [B, N] -> [B, num_frames, layers * hidden] (layer-major per frame)."""
        frames = self.to_frame_rate(self.cnn_features(self.pad_waveform(wave, num_frames)), num_frames)
        states = self.encoder_layers(frames)
        layers = states[-1:] if self.config.only_last_features else states[1:]
        return torch.cat(layers, dim=-1)

    def forward(self, wave: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised waveform [B, N] -> projected features [B, num_frames, dim_a]."""
        return self.audio_projection(self.stacked_features(wave, num_frames))

    def encode_long(self, wave: torch.Tensor, num_frames: int, window: int = 1500,
                    context: int = 100) -> torch.Tensor:
        """Like forward, for any length: segments of `window` frames, each encoded with up to `context`
        frames of audio on both sides and cropped back, so memory stays bounded. Clips of at most
        window + 2 * context frames are encoded whole, exactly as the reference does."""
        spf = self.config.samples_per_frame
        if num_frames <= window + 2 * context:
            return self(wave, num_frames)
        wave = self.pad_waveform(wave, num_frames)
        pieces = []
        for start in range(0, num_frames, window):
            stop = min(start + window, num_frames)
            lo, hi = max(0, start - context), min(num_frames, stop + context)
            feats = self(wave[:, lo * spf:hi * spf], hi - lo)
            pieces.append(feats[:, start - lo:stop - lo])
        return torch.cat(pieces, dim=1)

