"""An invisible, robust watermark: a keyed spread-spectrum pattern on a coarse grid of cells.

Embedding. The frame is divided into a grid of cells in relative coordinates (grid_for: cells of 2-4 px;
a rescaled copy still lines up, and the detector tries every grid of GRIDS). Each cell gets a keyed
pseudo-random carrier of +1 or -1.
A quarter of the cells (keyed, scattered) form the *pilot*, which only says "marked"; the other cells are
dealt out round-robin to the 56 coded bits (48 payload bits + CRC-8), and a bit of 0 flips its cells'
carriers. The cell values are upsampled bilinearly to the frame size (no block edges), scaled to an RMS of
AMPLITUDE grey levels, and added equally to R, G and B (so only the luma changes). The pattern is the same
in every frame of a session: codecs keep a static pattern in their references instead of paying for it
every frame, and a detector needs no frame alignment.

Detection. The frame's luma is averaged over each cell (area resize to the grid), summed over the frames
of a window, and whitened by subtracting each cell's 8-neighbour mean (this removes most of the picture,
whose cells are strongly correlated, and little of the pattern, whose cells are independent). The pilot
statistic z = sum(h_c * carrier_c) / sqrt(sum(h_c^2)) over the pilot cells is, for any video that was not
marked with this key, a sum of independent random signs weighted by the video's own values: by Hoeffding's
inequality P(z >= t) <= exp(-t^2 / 2) whatever the video is. That bound is the false-positive rate we
report (times the number of grids tried), and a window counts as marked when it is at most TARGET_FPR.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

GRIDS = (32, 64, 128)  # cells per side the scheme may use; the detector tries each
MAX_CELL_GRID = 128  # 4 px cells at 512 x 512: finer cells are lost to VP8 at ~150 kbit/s
AMPLITUDE = 2.0  # RMS of the added pattern in grey levels: PSNR about 42 dB
PILOT_FRACTION = 0.25
DEPLOYMENT_BITS = 16
SESSION_BITS = 32
CRC_BITS = 8
CODED_BITS = DEPLOYMENT_BITS + SESSION_BITS + CRC_BITS
TARGET_FPR = 1e-6  # per decision (one window of frames), after correcting for the grids tried
DEFAULT_KEY = "avatar-forcing/watermark/v1"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def grid_for(height: int, width: int) -> int:
    """The grid a frame of this size is marked with: cells of at least 2 px, at most MAX_CELL_GRID per side."""
    fitting = [g for g in GRIDS if g <= min(height, width) // 2 and g <= MAX_CELL_GRID]
    if not fitting:
        raise ValueError(f"frames of {width}x{height} are too small to watermark: need at least "
                         f"{2 * GRIDS[0]} px per side")
    return fitting[-1]


def session_hash(session_id: str) -> int:
    """The 32-bit hash a session's frames carry: anyone holding the session id can check it; nobody needs
    to register sessions anywhere."""
    return int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=4).digest(), "big")


def crc8(bits: np.ndarray) -> int:
    """CRC-8 (polynomial x^8 + x^2 + x + 1) over a bit sequence, most significant bit first."""
    crc = 0
    for bit in bits:
        top = ((crc >> 7) & 1) ^ int(bit)
        crc = (crc << 1) & 0xFF
        if top:
            crc ^= 0x07
    return crc


def _to_bits(value: int, count: int) -> np.ndarray:
    return np.array([(value >> (count - 1 - i)) & 1 for i in range(count)], dtype=np.uint8)


def _from_bits(bits: np.ndarray) -> int:
    return int("".join(str(int(b)) for b in bits) or "0", 2)


@dataclass(frozen=True)
class Payload:
    deployment_id: int  # set by the operator, 0..65535
    session_hash: int  # session_hash(session_id), 32 bits

    def __post_init__(self) -> None:
        if not 0 <= self.deployment_id < 1 << DEPLOYMENT_BITS:
            raise ValueError(f"deployment id {self.deployment_id} must be in 0..{(1 << DEPLOYMENT_BITS) - 1}")
        if not 0 <= self.session_hash < 1 << SESSION_BITS:
            raise ValueError(f"session hash {self.session_hash} must fit in {SESSION_BITS} bits")

    def coded_bits(self) -> np.ndarray:
        data = np.concatenate([_to_bits(self.deployment_id, DEPLOYMENT_BITS),
                               _to_bits(self.session_hash, SESSION_BITS)])
        return np.concatenate([data, _to_bits(crc8(data), CRC_BITS)])

    @classmethod
    def from_coded_bits(cls, bits: np.ndarray) -> tuple[Payload, bool]:
        """The payload, and whether its CRC matches."""
        data, crc = bits[:DEPLOYMENT_BITS + SESSION_BITS], bits[DEPLOYMENT_BITS + SESSION_BITS:]
        payload = cls(_from_bits(data[:DEPLOYMENT_BITS]), _from_bits(data[DEPLOYMENT_BITS:]))
        return payload, crc8(data) == _from_bits(crc)

    def to_json(self) -> dict:
        return {"deployment_id": self.deployment_id, "session_hash": f"{self.session_hash:08x}"}


class Scheme:
    """The keyed layout: which cells are pilot, which bit each other cell carries, and every cell's sign."""

    def __init__(self, grid: int, key: str = DEFAULT_KEY, amplitude: float = AMPLITUDE):
        self.grid, self.amplitude = grid, amplitude
        seed = int.from_bytes(hashlib.sha256(f"{key}/{grid}".encode()).digest()[:8], "big")
        rng = np.random.default_rng(seed)
        cells = grid * grid
        self.carrier = rng.choice(np.array([-1.0, 1.0]), size=cells)
        order = rng.permutation(cells)
        pilots = round(cells * PILOT_FRACTION)
        self.pilot = np.zeros(cells, dtype=bool)
        self.pilot[order[:pilots]] = True
        self.bit_of = np.full(cells, -1, dtype=np.int64)  # -1 for pilot cells
        self.bit_of[order[pilots:]] = np.arange(cells - pilots) % CODED_BITS

    def cell_values(self, payload: Payload) -> np.ndarray:
        """The +1/-1 value of every cell for this payload, [grid, grid]."""
        signs = 2.0 * payload.coded_bits().astype(np.float64) - 1.0
        values = np.where(self.pilot, self.carrier, self.carrier * signs[self.bit_of.clip(min=0)])
        return values.reshape(self.grid, self.grid)

    def render(self, payload: Payload, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The pattern to add to a height x width frame: float32 [height, width], RMS = amplitude."""
        cells = torch.from_numpy(self.cell_values(payload)).to(torch.float32)[None, None]
        smooth = torch.nn.functional.interpolate(cells, size=(height, width), mode="bilinear", align_corners=False)
        smooth = smooth[0, 0] * (self.amplitude / smooth.pow(2).mean().sqrt())
        return smooth.to(device)


def embed(frames: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Add rendered patterns [..., H, W] (broadcast over frames) to uint8 RGB frames [..., H, W, 3] on any
    device; returns new frames."""
    # Frames are integers, so round(frame + p) == frame + round(p): round the (small) pattern once and add in
    # int16, a quarter cheaper than float32 on a CPU.
    steps = pattern.to(frames.device).round().to(torch.int16)[..., None]
    return (frames.to(torch.int16) + steps).clamp_(0, 255).to(torch.uint8)


def cell_means(frames: np.ndarray, grid: int) -> np.ndarray:
    """Luma of RGB uint8 frames [N, H, W, 3] (or one [H, W, 3]) averaged over each cell: float64 [N, grid, grid]."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [N, H, W, 3], got shape {frames.shape}")
    out = np.empty((len(frames), grid, grid), dtype=np.float64)
    for i, rgb in enumerate(frames):
        luma = rgb.astype(np.float32) @ LUMA
        out[i] = cv2.resize(luma, (grid, grid), interpolation=cv2.INTER_AREA)
    return out


def whiten(cells: np.ndarray) -> np.ndarray:
    """Each cell minus the mean of its 4 neighbours (edges mirrored): the picture's smooth part goes."""
    p = np.pad(cells, 1, mode="reflect")
    return cells - (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]) / 4.0


@dataclass(frozen=True)
class Detection:
    present: bool
    z: float  # the pilot statistic of the best grid; about N(0, 1) on unmarked video, large when marked
    false_positive_rate: float  # upper bound on P(a z this large | not marked), over all grids tried
    grid: int  # the grid that gave z
    payload: Payload | None  # decoded bits (trusted when present and payload_valid)
    payload_valid: bool  # the CRC of the decoded bits matches
    weakest_bit_z: float  # the least certain bit's |z|; below ~3 the payload needs more frames
    frames: int

    @property
    def confidence(self) -> float:
        return 1.0 - self.false_positive_rate

    def to_json(self) -> dict:
        return {"present": self.present, "confidence": self.confidence, "z": round(self.z, 2),
                "false_positive_rate": self.false_positive_rate, "grid": self.grid, "frames": self.frames,
                "payload": self.payload.to_json() if self.payload and self.present else None,
                "payload_valid": self.payload_valid and self.present,
                "weakest_bit_z": round(self.weakest_bit_z, 2)}


def hoeffding_tail(z: float) -> float:
    """P(sum of n random signs >= z sqrt(n)) <= exp(-z^2 / 2)."""
    return 1.0 if z <= 0 else math.exp(-z * z / 2.0)


def _sign_z(signs: np.ndarray, carrier: np.ndarray, mask: np.ndarray) -> float:
    """sum(sign * carrier) / sqrt(count) over the masked cells with a nonzero residual."""
    used = mask & (signs != 0)
    count = int(used.sum())
    return float(np.sum(signs[used] * carrier[used]) / math.sqrt(count)) if count else 0.0


def _decide(summed_cells: np.ndarray, scheme: Scheme) -> tuple[float, np.ndarray]:
    """Pilot z and the 56 bit z's of one grid."""
    # Only the residual's sign counts: the picture's edges leave a few huge residuals that would swamp the
    # pattern in a plain correlation; signs weigh every cell alike, and make the statistic on unmarked
    # video exactly a sum of independent random signs (the carrier's), whatever the video.
    signs = np.sign(whiten(summed_cells)).reshape(-1)
    z = _sign_z(signs, scheme.carrier, scheme.pilot)
    return z, np.array([_sign_z(signs, scheme.carrier, scheme.bit_of == k) for k in range(CODED_BITS)])


class Detector:
    """Accumulates frames (any size, any count) and decides whether they carry the mark.

    Frames are reduced to cell means at once (for every grid that fits them), so a long video costs
    little memory. `window()` decides on the frames since the last call and `total()` on all of them.
    """

    def __init__(self, key: str = DEFAULT_KEY):
        self.key = key
        self._window: dict[int, np.ndarray] = {}
        self._total: dict[int, np.ndarray] = {}
        self.window_frames = self.total_frames = 0

    def add(self, frames: np.ndarray) -> None:
        """RGB uint8 frames [N, H, W, 3] or one [H, W, 3]."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        for grid in (g for g in GRIDS if g <= min(frames.shape[1:3])):
            sums = cell_means(frames, grid).sum(axis=0)
            self._window[grid] = self._window.get(grid, 0.0) + sums
            self._total[grid] = self._total.get(grid, 0.0) + sums
        self.window_frames += len(frames)
        self.total_frames += len(frames)

    def window(self) -> Detection:
        found = self._decide(self._window, self.window_frames)
        self._window, self.window_frames = {}, 0
        return found

    def total(self) -> Detection:
        return self._decide(self._total, self.total_frames)

    def _decide(self, sums: dict[int, np.ndarray], frames: int) -> Detection:
        if not sums:
            raise ValueError(f"no frames to decide on (frames must be at least {GRIDS[0]} px per side)")
        best = max(((grid, *_decide(cells, scheme_for(grid, self.key))) for grid, cells in sums.items()),
                   key=lambda found: found[1])
        grid, z, bit_z = best
        # Several grids were tried: the chance that any of them is this high on unmarked video is at most
        # their count times the bound of one (Bonferroni).
        fpr = min(1.0, len(sums) * hoeffding_tail(z))
        payload, valid = Payload.from_coded_bits((bit_z > 0).astype(np.uint8))
        return Detection(present=fpr <= TARGET_FPR, z=z, false_positive_rate=fpr, grid=grid, payload=payload,
                         payload_valid=valid, weakest_bit_z=float(np.abs(bit_z).min()), frames=frames)


@functools.lru_cache(maxsize=16)
def scheme_for(grid: int, key: str = DEFAULT_KEY) -> Scheme:
    return Scheme(grid, key)


def detect_frames(frames: np.ndarray, key: str = DEFAULT_KEY) -> Detection:
    """Decide on RGB uint8 frames [N, H, W, 3] taken together (one window)."""
    detector = Detector(key)
    detector.add(frames)
    return detector.total()
