"""Synthetic talking-face clips: stylised cartoon faces whose mouth follows real speech (espeak-ng).

Used to train the demo model, to make the bundled example clip and the held-out evaluation clips. Every clip
carries its ground truth (mouth openness and width per frame, mouth centre, face box, eye centres), and
:func:`measure_openness` reads the mouth opening back from pixels, so a script can score whether a generated
video's mouth follows new audio.

Rendering: the static parts of a face (head, hair, ears, brows, nose, body) are drawn once with anti-aliased
signed-distance shapes on a canonical canvas; the parts that move (eyelids, mouth) are drawn with the same
shapes for all frames at once on small crops of it; one bilinear warp per frame applies the head motion
(translation, in-plane rotation, scale, nod). Coordinates are pixels with pixel (i, j) centred at
(j + 0.5, i + 0.5), as in :mod:`omnisync_core.face.types`.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..audio import FrameAligner, SAMPLE_RATE, Waveform, prepare_audio
from ..audio.align import FpsLike, as_fraction
from ..errors import InputError, OmniSyncError
from ..face.types import FrameFaces

__all__ = ["SENTENCES", "VOICES", "FaceStyle", "MouthTrack", "SpeechSynthesisError", "SyntheticClip",
           "make_example", "measure_openness", "mouth_track", "render_clip", "speak"]

Colour = tuple[float, float, float]


class SpeechSynthesisError(OmniSyncError):
    """espeak-ng is missing or failed to write speech."""


# espeak-ng voices (language + optional "+variant") that the Debian espeak-ng package provides
VOICES = [
    "en", "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
    "en-us-nyc", "en+f2", "en+f3", "en+f4", "en+m1", "en+m2", "en+m3", "en-us+f3", "en-us+f5", "en-us+m3",
    "en-us+m7", "en-gb+f2", "en-gb+m4", "en+klatt", "en+Annie", "en+Andy", "en-us+steph", "en-gb-scotland+f4",
]

SENTENCES = [
    "Good morning, everyone, and thank you for coming out on such a rainy day.",
    "The old lighthouse keeper climbed the stairs one more time before the storm.",
    "Could you pass me the salt and the pepper, please?",
    "We measured the temperature every hour, and it never dropped below freezing.",
    "My grandmother grew tomatoes, beans and pumpkins behind the garden shed.",
    "Open the window wide, the room is far too warm this afternoon.",
    "How many kilometres is it from here to the nearest train station?",
    "She laughed so loudly that the whole library turned around to look at her.",
    "Blue balloons bobbed above the busy boulevard all through the parade.",
    "A cup of hot cocoa is the only cure for a cold October evening.",
    "Please remember to water the plants while I am away next week.",
    "The orchestra tuned their instruments as the audience found their seats.",
    "Why would anyone want to paint a zebra purple and orange?",
    "Our team finally solved the puzzle after three long hours of thinking.",
    "Moonlight poured over the meadow, and the owls began to call.",
    "I would like a large coffee with oat milk and no sugar, thank you.",
    "The museum opens at nine o'clock on weekdays and at ten on Sundays.",
    "Whoever took the last cookie owes me a whole new box of them.",
    "Each morning the baker rolls out the dough and shapes the loaves by hand.",
    "The submarine dove deeper until the water outside was completely black.",
    "Do you know the way to the old oak tree beyond the river?",
    "Sixty-six sailors sang softly while the ship sailed south.",
    "If it snows tomorrow, we will build the biggest snowman in town.",
    "He opened the letter slowly, afraid of what it might say.",
    "Fresh oranges, apples and bananas are on sale at the market today.",
    "The robot rolled across the floor and politely said hello.",
    "You should always look both ways before you cross the road.",
    "Under the bridge, a family of ducks paddled quietly in a row.",
    "Wow, that was the most amazing magic trick I have ever seen!",
    "Please open your books to page forty-two and read the first paragraph.",
    "The weather forecast promises sunshine, light winds and warm afternoons.",
    "An elephant never forgets, or so the old saying goes.",
    "Who wants to go hiking up the mountain on Saturday morning?",
    "Turn left at the bakery, then walk straight on until you reach the fountain.",
    "The kettle whistled, the toast popped up, and breakfast was ready.",
    "Our new neighbour plays the trumpet every evening at exactly eight.",
    "Yellow leaves fluttered down and covered the quiet avenue.",
    "Knowledge is like a garden: if it is not cultivated, it cannot be harvested.",
    "Oh no, I think I left my umbrella on the bus again.",
    "Thank you all for listening, and have a wonderful week.",
]


# ---------------------------------------------------------------------------------------------------------- speech


def speak(text: str, path: Union[str, Path], voice: str = "en", speed: int = 150, pitch: int = 50) -> Path:
    """Write ``text`` as speech to the WAV file ``path`` with the ``espeak-ng`` binary; returns the path."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechSynthesisError("espeak-ng is not installed; install it (e.g. `apt-get install espeak-ng`) "
                                   "to synthesise speech.")
    if not text or not text.strip():
        raise InputError("speech text is empty")
    path = Path(path)
    cmd = [exe, "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "-w", str(path), text]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file() or path.stat().st_size <= 44:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise SpeechSynthesisError(f"espeak-ng failed with voice {voice!r}: {message[0] if message else 'no output'}")
    return path


# ----------------------------------------------------------------------------------------------------- mouth track


@dataclass
class MouthTrack:
    """Per-frame mouth shape from audio: ``openness [T]`` and ``width [T]`` in 0..1 at ``fps``."""

    openness: Tensor
    width: Tensor
    fps: float = 25.0

    def __len__(self) -> int:
        return int(self.openness.shape[0])


def _frame_starts(fps: FpsLike, num_frames: int, sample_rate: int) -> Tensor:
    """Start sample of frames 0..num_frames (inclusive), exactly as FrameAligner.sample_of_frame, vectorised."""
    aligner = FrameAligner(fps)
    p, q = aligner.fps.numerator, aligner.fps.denominator
    i = torch.arange(num_frames + 1, dtype=torch.int64)
    return torch.div(2 * i * sample_rate * q + p, 2 * p, rounding_mode="floor")


def _smooth(x: Tensor, weights: Sequence[float]) -> Tensor:
    k = torch.tensor(weights, dtype=x.dtype)
    k = k / k.sum()
    pad = len(weights) // 2
    return F.conv1d(F.pad(x[None, None], (pad, pad), mode="replicate"), k[None, None])[0, 0]


def _window_means(cumsum: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Mean of a sequence over ``[lo, hi)`` per row from its zero-prefixed cumulative sum ``[N + 1, ...]``."""
    return (cumsum[hi] - cumsum[lo]) / (hi - lo).clamp_min(1).reshape(-1, *([1] * (cumsum.ndim - 1)))


def mouth_track(samples_16k: Tensor, fps: FpsLike = 25, num_frames: Optional[int] = None,
                lookahead_ms: float = 25.0, range_db: float = 30.0, gamma: float = 1.7) -> MouthTrack:
    """Mouth openness and width per video frame from 16 kHz mono speech ``[N]``.

    openness: RMS over the frame plus ``lookahead_ms`` (lips move slightly ahead of the sound), in dB, mapped
    from ``range_db`` below the clip's loud level (its 95th percentile) to that level, raised to ``gamma`` (so
    consonants half-close the mouth and vowels open it), lightly smoothed; frames
    quieter than -60 dBFS read 0. width: spectral centroid of the same window (low for rounded vowels such as
    "oo", high for "ee"), normalised per clip, relaxed to 0.5 as the mouth closes.
    """
    x = torch.as_tensor(samples_16k).to(torch.float64).reshape(-1)
    if x.numel() == 0:
        raise InputError("mouth_track needs a non-empty waveform")
    rate = float(as_fraction(fps))
    aligner = FrameAligner(fps)
    t = aligner.num_frames(x.numel(), SAMPLE_RATE) if num_frames is None else int(num_frames)
    if t <= 0:
        raise InputError(f"mouth_track needs at least one frame, got {t}")
    starts = _frame_starts(fps, t, SAMPLE_RATE)
    lo = starts[:-1].clamp(0, x.numel())
    hi = (starts[1:] + round(lookahead_ms * SAMPLE_RATE / 1000)).clamp(0, x.numel())
    hi = torch.maximum(hi, lo)

    power = F.pad(x.square().cumsum(0), (1, 0))
    rms = _window_means(power, lo, hi).sqrt()
    db = 20 * torch.log10(rms + 1e-9)
    voiced = db > -60.0
    loud = torch.quantile(db[voiced], 0.95) if voiced.any() else torch.tensor(-60.0, dtype=db.dtype)
    openness = ((db - (loud - range_db)) / range_db).clamp(0, 1).pow(gamma) * voiced
    openness = _smooth(openness, [1, 2, 1]).clamp(0, 1) if t > 2 else openness

    # spectral centroid (100 Hz .. 5 kHz) of 32 ms STFT frames every 10 ms, averaged over each video frame
    hop, n_fft = 160, 512
    spec = torch.stft(x.float(), n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs().square()
    freqs = torch.fft.rfftfreq(n_fft, 1 / SAMPLE_RATE)
    band = (freqs >= 100) & (freqs <= 5000)
    spec, freqs = spec[band].double(), freqs[band].double()
    moments = F.pad(torch.stack([spec.sum(0), (spec * freqs[:, None]).sum(0)], -1).cumsum(0), (0, 0, 1, 0))
    k_lo = torch.div(lo + hop // 2, hop, rounding_mode="floor").clamp(0, spec.shape[1] - 1)
    k_hi = torch.maximum(torch.div(hi + hop // 2, hop, rounding_mode="floor"), k_lo + 1).clamp(max=spec.shape[1])
    m = _window_means(moments, k_lo, k_hi)
    centroid = torch.log(m[:, 1] / m[:, 0].clamp_min(1e-12) + 1.0)
    active = openness > 0.2
    if int(active.sum()) >= 2:
        c_lo, c_hi = torch.quantile(centroid[active], 0.05), torch.quantile(centroid[active], 0.95)
        raw = ((centroid - c_lo) / (c_hi - c_lo).clamp_min(1e-6)).clamp(0, 1)
    else:
        raw = torch.full_like(centroid, 0.5)
    width = 0.5 + (raw - 0.5) * (2 * openness).clamp(max=1)
    width = _smooth(width, [1, 2, 1]).clamp(0, 1) if t > 2 else width
    return MouthTrack(openness.float(), width.float(), rate)


# ------------------------------------------------------------------------------------------------------ face style


def _luma(c: Sequence[float]) -> float:
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]


def _scaled_to_luma(c: Sequence[float], lo: float, hi: float) -> Colour:
    """Scale a colour (towards white when brightening past 1) so its luminance lies in [lo, hi]."""
    y = max(_luma(c), 1e-4)
    target = min(max(y, lo), hi)
    if target <= y:
        return tuple(ch * target / y for ch in c)
    w = (target - y) / max(1.0 - y, 1e-4)
    return tuple(ch + (1 - ch) * w for ch in c)


SKIN_REALISTIC = [(0.98, 0.87, 0.78), (0.95, 0.79, 0.67), (0.88, 0.70, 0.56), (0.80, 0.59, 0.44),
                  (0.68, 0.48, 0.33), (0.55, 0.37, 0.25), (0.44, 0.29, 0.19), (0.37, 0.24, 0.16)]
SKIN_STYLIZED = [(0.36, 0.56, 0.92), (0.46, 0.80, 0.46), (0.62, 0.46, 0.86), (0.30, 0.75, 0.75),
                 (0.98, 0.86, 0.32), (0.96, 0.62, 0.76), (0.70, 0.72, 0.76), (0.95, 0.55, 0.35)]
HAIR = [(0.08, 0.06, 0.05), (0.24, 0.15, 0.09), (0.45, 0.28, 0.14), (0.85, 0.70, 0.40), (0.62, 0.25, 0.10),
        (0.75, 0.75, 0.75), (0.95, 0.40, 0.65), (0.20, 0.35, 0.85), (0.25, 0.65, 0.35), (0.45, 0.20, 0.55)]
IRIS = [(0.30, 0.18, 0.08), (0.15, 0.35, 0.65), (0.25, 0.50, 0.25), (0.45, 0.35, 0.20), (0.10, 0.08, 0.06),
        (0.55, 0.25, 0.70), (0.20, 0.60, 0.65)]
LIPS = [(0.80, 0.35, 0.38), (0.70, 0.28, 0.30), (0.88, 0.45, 0.50), (0.60, 0.25, 0.35), (0.85, 0.20, 0.25)]


@dataclass
class FaceStyle:
    """Appearance of one synthetic face. Lengths are relative to the face half-width unless noted."""

    face_width: float = 0.44            # face width / frame width
    aspect: float = 1.28                # face height / face width
    jaw: float = 0.5                    # 0: elliptic, 1: narrow chin
    skin: Colour = (0.88, 0.70, 0.56)
    hair: Colour = (0.24, 0.15, 0.09)
    hair_style: int = 1                 # 0 bald, 1 cap, 2 wavy fringe, 3 side part, 4 long hair
    hairline: float = 0.45              # 0: high forehead .. 1: low fringe
    ears: bool = True
    eye_size: float = 0.17              # eye half-width
    eye_spacing: float = 0.40           # eye centre x
    iris: Colour = (0.30, 0.18, 0.08)
    gaze: tuple[float, float] = (0.0, 0.0)
    brow: float = 0.05                  # eyebrow half-thickness
    nose_style: int = 0                 # 0 nostrils, 1 ink hook, 2 shaded tip
    blush: float = 0.0                  # cheek blush opacity
    lips: Colour = (0.80, 0.35, 0.38)
    lip_thickness: float = 0.07
    mouth_size: float = 0.34            # neutral mouth half-width
    interior: Colour = (0.16, 0.03, 0.05)
    teeth: bool = True
    background: Colour = (0.55, 0.70, 0.85)
    background2: Optional[Colour] = None   # None: solid; else a linear gradient to this colour
    gradient_angle: float = 0.0          # radians
    outline: float = 1.5                 # ink line width in pixels at 256 px frames (0: no outline)
    ink: Colour = (0.08, 0.06, 0.07)
    shirt: Colour = (0.30, 0.40, 0.60)

    @staticmethod
    def random(generator: Union[torch.Generator, int, None] = None) -> "FaceStyle":
        """A random style (a seed or a torch.Generator makes it reproducible)."""
        if not isinstance(generator, torch.Generator):
            seed = generator
            generator = torch.Generator()
            if seed is None:
                generator.seed()                      # non-deterministic, leaves the global RNG alone
            else:
                generator.manual_seed(int(seed))
        g = generator

        def u(lo: float = 0.0, hi: float = 1.0) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=g))

        def pick(options):
            return options[int(torch.randint(len(options), (), generator=g))]

        def jitter(c: Colour, amount: float = 0.04) -> Colour:
            return tuple(min(max(ch + u(-amount, amount), 0.0), 1.0) for ch in c)

        def rand_colour(lo: float = 0.0, hi: float = 1.0) -> Colour:
            return (u(lo, hi), u(lo, hi), u(lo, hi))

        stylized = u() < 0.4
        skin = _scaled_to_luma(jitter(pick(SKIN_STYLIZED if stylized else SKIN_REALISTIC)), 0.24, 0.85)
        if stylized and u() < 0.5:
            lips = _scaled_to_luma(jitter(rand_colour(0.1, 0.9), 0.0), 0.18, 0.6)
        else:
            base = pick(LIPS)
            lips = tuple(0.55 * s + 0.45 * b for s, b in zip(skin, base)) if u() < 0.6 else base
            lips = _scaled_to_luma(jitter(lips, 0.03), 0.18, 0.6)
        interior = _scaled_to_luma((u(0.15, 0.35), u(0.0, 0.06), u(0.02, 0.10)), 0.0, 0.04)
        bg = rand_colour(0.05, 0.95)
        hair = jitter(pick(HAIR))
        return FaceStyle(
            face_width=u(0.40, 0.48), aspect=u(1.2, 1.4), jaw=u(0.0, 1.0), skin=skin, hair=hair,
            hair_style=pick([0, 1, 1, 2, 3, 4, 4]), hairline=u(0.15, 0.6), ears=u() < 0.85,
            eye_size=u(0.14, 0.20), eye_spacing=u(0.36, 0.44), iris=jitter(pick(IRIS)),
            gaze=(u(-0.25, 0.25), u(-0.15, 0.15)), brow=u(0.03, 0.07), nose_style=pick([0, 1, 2]),
            blush=u(0.2, 0.5) if u() < 0.35 else 0.0, lips=lips, lip_thickness=u(0.05, 0.09),
            mouth_size=u(0.30, 0.38), interior=interior, teeth=u() < 0.7, background=bg,
            background2=rand_colour(0.05, 0.95) if u() < 0.5 else None, gradient_angle=u(0, 2 * math.pi),
            outline=pick([0.0, 1.0, 1.5, 2.0, 2.5]),
            ink=pick([(0.07, 0.05, 0.06), tuple(0.3 * c for c in skin), tuple(0.4 * c for c in hair)]),
            shirt=rand_colour(0.1, 0.9),
        )


# ------------------------------------------------------------------------------------------------------- geometry


@dataclass
class _Layout:
    """Face feature positions in face units (face half-width = 1, face centre at 0, y down)."""

    ry: float          # face half-height
    eye_y: float
    nose_y: float
    mouth_y: float
    ear_y: float
    eye_x: float

    @staticmethod
    def of(style: FaceStyle) -> "_Layout":
        ry = style.aspect
        return _Layout(ry=ry, eye_y=-0.02 * ry, nose_y=0.34 * ry, mouth_y=0.60 * ry, ear_y=0.12 * ry,
                       eye_x=style.eye_spacing)


def _ellipse(x: Tensor, y: Tensor, cx, cy, a, b) -> Tensor:
    """Approximate signed distance to an ellipse (first-order: implicit value over its gradient length)."""
    px, py = (x - cx) / a, (y - cy) / b
    grad = 2 * torch.sqrt((px / a).square() + (py / b).square()).clamp_min(1e-3)
    return (px.square() + py.square() - 1) / grad


def _circle(x: Tensor, y: Tensor, cx, cy, r) -> Tensor:
    return torch.sqrt((x - cx).square() + (y - cy).square()) - r


def _capsule(x: Tensor, y: Tensor, ax, ay, bx, by, r) -> Tensor:
    """Distance to the segment a-b minus r."""
    dx, dy = bx - ax, by - ay
    h = (((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
    return torch.sqrt((x - ax - h * dx).square() + (y - ay - h * dy).square()) - r


def _box(x: Tensor, y: Tensor, cx, cy, hx, hy, r=0.0) -> Tensor:
    qx, qy = (x - cx).abs() - hx + r, (y - cy).abs() - hy + r
    return torch.sqrt(qx.clamp_min(0).square() + qy.clamp_min(0).square()) + torch.maximum(qx, qy).clamp_max(0) - r


def _coverage(d: Tensor, px: float) -> Tensor:
    """Anti-aliased coverage of the region d < 0 (d in face units, px pixels per unit): smoothstep over 1 px."""
    t = (0.5 - d * px).clamp(0, 1)
    return t * t * (3 - 2 * t)


def _paint(canvas: Tensor, cov: Tensor, colour: Sequence[float], opacity: float = 1.0) -> Tensor:
    """Premultiplied 'over' of a flat colour with coverage ``cov [..., 1, h, w]`` onto ``canvas [..., 4, h, w]``."""
    c = torch.tensor([*colour, 1.0], dtype=canvas.dtype).reshape(4, 1, 1)
    a = cov * opacity
    return canvas * (1 - a) + c * a


def _ink(canvas: Tensor, d: Tensor, px: float, width_px: float, colour: Sequence[float]) -> Tensor:
    """An ink line of ``width_px`` pixels along the boundary d = 0."""
    if width_px <= 0:
        return canvas
    return _paint(canvas, _coverage(d.abs() - 0.5 * width_px / px, px), colour)


class _Canvas:
    """Canonical canvas of a style at a frame size: pixel grid, face centre and scale."""

    def __init__(self, style: FaceStyle, size: int):
        self.style, self.size = style, size
        self.lay = _Layout.of(style)
        self.margin = int(math.ceil(0.18 * size))
        self.side = size + 2 * self.margin
        self.px = style.face_width * size / 2                                   # pixels per face unit
        self.centre = (self.margin + size / 2, self.margin + 0.46 * size)       # face centre, canonical px
        self.line = style.outline * size / 256

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        return self.centre[0] + x * self.px, self.centre[1] + y * self.px

    def grid(self, x0: int, y0: int, x1: int, y1: int) -> tuple[Tensor, Tensor]:
        """Face-unit coordinates ``[1, h, w]`` of the canonical pixels [y0, y1) x [x0, x1)."""
        xs = (torch.arange(x0, x1, dtype=torch.float32) + 0.5 - self.centre[0]) / self.px
        ys = (torch.arange(y0, y1, dtype=torch.float32) + 0.5 - self.centre[1]) / self.px
        return xs.reshape(1, 1, -1), ys.reshape(1, -1, 1)

    def crop(self, left: float, top: float, right: float, bottom: float) -> tuple[int, int, int, int]:
        """Canonical pixel rectangle (x0, y0, x1, y1) covering a face-unit rectangle plus 2 px."""
        a, b = self.to_px(left, top)
        c, d = self.to_px(right, bottom)
        return (max(int(math.floor(a)) - 2, 0), max(int(math.floor(b)) - 2, 0),
                min(int(math.ceil(c)) + 2, self.side), min(int(math.ceil(d)) + 2, self.side))

    def mouth_rect(self) -> tuple[int, int, int, int]:
        s, m = self.style, self.lay.mouth_y
        half = s.mouth_size * 1.25 + s.lip_thickness + 0.04
        return self.crop(-half, m - 0.15 * MAX_OPEN - s.lip_thickness - 0.04, half,
                         m + 0.65 * MAX_OPEN + s.lip_thickness + 0.04)

    def eyes_rect(self) -> tuple[int, int, int, int]:
        s, lay = self.style, self.lay
        half = lay.eye_x + s.eye_size + 0.08
        return self.crop(-half, lay.eye_y - 0.7 * s.eye_size - 0.08, half, lay.eye_y + 0.7 * s.eye_size + 0.08)


MAX_OPEN = 0.42   # full mouth opening height at openness 1, face units


def _render_static(cv: _Canvas) -> Tensor:
    """Head, hair, ears, brows, nose and body: ``[4, side, side]`` premultiplied RGBA."""
    s, lay, px, line = cv.style, cv.lay, cv.px, cv.line
    x, y = cv.grid(0, 0, cv.side, cv.side)
    canvas = torch.zeros(4, cv.side, cv.side)
    ry = lay.ry
    skin_shade = tuple(0.82 * c for c in s.skin)

    # body: shoulders and neck
    d = _ellipse(x, y, 0.0, ry + 1.45, 2.4, 1.05)
    canvas = _ink(_paint(canvas, _coverage(d, px), s.shirt), d, px, line, s.ink)
    d = _box(x, y, 0.0, ry + 0.1, 0.42, 0.55, 0.1)
    canvas = _ink(_paint(canvas, _coverage(d, px), skin_shade), d, px, line, s.ink)

    # head outline: an ellipse whose lower half narrows towards the chin as `jaw` grows
    chin = (y / ry).clamp(0, 1).square()
    head = _ellipse(x * (1 + 0.35 * s.jaw * chin), y, 0.0, 0.0, 1.0, ry)
    top = _ellipse(x, y, 0.0, -0.05 * ry, 1.08, 1.07 * ry)            # hair volume around the skull
    if s.hair_style == 4:
        d = torch.minimum(_box(x, y, 0.0, 0.05 * ry, 1.15, 0.95 * ry, 0.5), top)
        canvas = _ink(_paint(canvas, _coverage(d, px), s.hair), d, px, line, s.ink)
    if s.ears:
        for side in (-1.0, 1.0):
            d = _ellipse(x, y, side * 0.98, lay.ear_y, 0.15, 0.25)
            canvas = _ink(_paint(canvas, _coverage(d, px), s.skin), d, px, line, s.ink)
            d = _ellipse(x, y, side * 1.01, lay.ear_y, 0.06, 0.14)
            canvas = _paint(canvas, _coverage(d, px), skin_shade)
    canvas = _ink(_paint(canvas, _coverage(head, px), s.skin), head, px, line, s.ink)

    # cheeks
    if s.blush > 0:
        for side in (-1.0, 1.0):
            d = _circle(x, y, side * 0.55, 0.33 * ry, 0.13)
            canvas = _paint(canvas, _coverage(d + 0.04, px * 0.25), (0.95, 0.45, 0.50), s.blush)

    # hair cap above a hairline curve
    if s.hair_style > 0:
        y0 = -ry * (0.9 - 0.75 * s.hairline)
        if s.hair_style == 2:
            line_y = y0 + 0.06 * torch.sin(x * 9.0) + 0.1 * x.square()
        elif s.hair_style == 3:
            line_y = y0 + 0.22 * (x - 0.3) - 0.15 + 0.2 * x.square()
        else:
            line_y = y0 + 0.3 * x.square()
        d = torch.maximum(top, (y - line_y) / math.sqrt(1.3))
        canvas = _ink(_paint(canvas, _coverage(d, px), s.hair), d, px, line, s.ink)

    # eyebrows
    brow_colour = tuple(0.7 * c for c in s.hair) if s.hair_style > 0 else tuple(0.45 * c for c in s.skin)
    by = lay.eye_y - 0.75 * s.eye_size - 0.13
    for side in (-1.0, 1.0):
        d = _capsule(x, y, side * (lay.eye_x - s.eye_size * 0.9), by + 0.01, side * (lay.eye_x + s.eye_size),
                     by - 0.03, s.brow)
        canvas = _paint(canvas, _coverage(d, px), brow_colour)

    # nose (kept light: measure_openness treats dark pixels near the mouth as its opening)
    ny = lay.nose_y
    if s.nose_style == 0:
        d = _ellipse(x, y, 0.0, ny - 0.08, 0.12, 0.1)
        canvas = _paint(canvas, _coverage(d, px * 0.3), skin_shade, 0.5)
        for side in (-1.0, 1.0):
            d = _ellipse(x, y, side * 0.075, ny, 0.045, 0.028)
            canvas = _paint(canvas, _coverage(d, px), tuple(0.62 * c for c in s.skin))
    elif s.nose_style == 1:
        w = max(line, 1.2) / px / 2
        d = torch.minimum(_capsule(x, y, 0.04, ny - 0.32, 0.09, ny - 0.02, w),
                          _capsule(x, y, 0.09, ny - 0.02, -0.04, ny + 0.01, w))
        canvas = _paint(canvas, _coverage(d, px), s.ink)
    else:
        d = _ellipse(x, y, 0.0, ny - 0.05, 0.11, 0.08)
        canvas = _paint(canvas, _coverage(d, px), skin_shade)
        d = _circle(x, y, -0.03, ny - 0.08, 0.025)
        canvas = _paint(canvas, _coverage(d, px), tuple(min(1.0, 0.4 + c) for c in s.skin), 0.7)
    return canvas


def _render_eyes(cv: _Canvas, canvas: Tensor, closed: Tensor) -> Tensor:
    """Both eyes for all frames on ``canvas [T, 4, h, w]`` (the eyes crop); ``closed [T]`` in 0..1."""
    s, lay, px = cv.style, cv.lay, cv.px
    x0, y0, x1, y1 = cv.eyes_rect()
    x, y = cv.grid(x0, y0, x1, y1)
    rx, ry = s.eye_size, 0.62 * s.eye_size
    lid = (lay.eye_y - ry * 1.05 + 2.15 * ry * closed).reshape(-1, 1, 1, 1)
    x, y = x.unsqueeze(0), y.unsqueeze(0)
    lash = max(cv.line, 1.2 * cv.size / 256)
    for side in (-1.0, 1.0):
        cx = side * lay.eye_x
        d_eye = torch.maximum(_ellipse(x, y, cx, lay.eye_y, rx, ry), lid - y)
        vis = _coverage(d_eye, px)
        canvas = _paint(canvas, vis, (0.97, 0.97, 0.95))
        ix, iy = cx + s.gaze[0] * rx * 0.5, lay.eye_y + s.gaze[1] * ry * 0.5
        iris_r = 0.8 * ry
        canvas = _paint(canvas, vis * _coverage(_circle(x, y, ix, iy, iris_r), px), s.iris)
        canvas = _paint(canvas, vis * _coverage(_circle(x, y, ix, iy, 0.45 * iris_r), px), (0.03, 0.03, 0.03))
        hl = _circle(x, y, ix + 0.35 * iris_r, iy - 0.35 * iris_r, 0.2 * iris_r)
        canvas = _paint(canvas, vis * _coverage(hl, px), (1.0, 1.0, 1.0))
        canvas = _ink(canvas, d_eye, px, lash, (0.05, 0.04, 0.04))
    return canvas


def _render_mouth(cv: _Canvas, canvas: Tensor, openness: Tensor, width: Tensor) -> Tensor:
    """The mouth for all frames on ``canvas [T, 4, h, w]`` (the mouth crop)."""
    s, lay, px = cv.style, cv.lay, cv.px
    x0, y0, x1, y1 = cv.mouth_rect()
    x, y = cv.grid(x0, y0, x1, y1)
    x, y = x.unsqueeze(0), y.unsqueeze(0)
    o = openness.clamp(0, 1).reshape(-1, 1, 1, 1)
    w = width.clamp(0, 1).reshape(-1, 1, 1, 1)
    hw = s.mouth_size * (0.8 + 0.45 * w) * (1 - 0.12 * o)
    h = MAX_OPEN * o
    yc = lay.mouth_y + 0.15 * h                       # the jaw drops: the opening grows mostly downwards
    lips = _ellipse(x, y, 0.0, yc, hw + 0.03, h / 2 + s.lip_thickness)
    canvas = _paint(canvas, _coverage(lips, px), s.lips)
    shine = _ellipse(x, y, 0.0, yc + h / 2 + 0.55 * s.lip_thickness, 0.45 * hw, 0.25 * s.lip_thickness)
    canvas = _paint(canvas, _coverage(shine, px), tuple(min(1.0, 0.25 + c) for c in s.lips), 0.5)
    seam = _capsule(x, y, -0.93 * hw, yc, 0.93 * hw, yc, 0.6 / px)
    canvas = _paint(canvas, _coverage(seam, px), tuple(0.72 * c for c in s.lips))
    half = (h / 2).clamp_min(1e-3)
    inner = _ellipse(x, y, 0.0, yc, 0.92 * hw, half)
    fade = (h * px).clamp(0, 1)                        # a sub-pixel opening darkens in proportion to its area
    cov = _coverage(inner, px) * fade
    canvas = _paint(canvas, cov, s.interior)
    if s.teeth:
        teeth = torch.maximum(inner, y - (yc - half + 0.3 * h))
        canvas = _paint(canvas, _coverage(teeth, px) * fade, (0.96, 0.95, 0.90))
    return canvas


# ----------------------------------------------------------------------------------------------------- the clip


@dataclass
class SyntheticClip:
    """A rendered clip and its ground truth (pixels of the output frames, pixel centres at +0.5).

    frames ``[T, S, S, 3]`` float 0..1; mouth_center ``[T, 2]``; face_box ``[T, 4]`` xyxy of the face outline;
    openness, width ``[T]`` (the MouthTrack drawn); eye_centers ``[T, 2, 2]`` (subject's right eye first, i.e.
    the one on the image's left); keypoints ``[T, 6, 2]`` in BlazeFace order (right eye, left eye, nose tip,
    mouth, right ear, left ear); mouth_open_px ``[T]`` the drawn opening height in pixels.
    """

    frames: Tensor
    mouth_center: Tensor
    face_box: Tensor
    openness: Tensor
    width: Tensor
    eye_centers: Tensor
    fps: float
    keypoints: Tensor = field(default=None)
    mouth_open_px: Tensor = field(default=None)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def face_width(self) -> Tensor:
        """Face width per frame in pixels ``[T]``."""
        return self.face_box[:, 2] - self.face_box[:, 0]

    def to_frame_faces(self) -> list[FrameFaces]:
        """One FrameFaces per frame (one face, score 1, BlazeFace keypoints, no landmarks)."""
        return [FrameFaces(self.face_box[i:i + 1].clone(), torch.ones(1), self.keypoints[i:i + 1].clone(), None)
                for i in range(len(self))]


def _smooth_signals(g: torch.Generator, t: Tensor, count: int, f_lo: float, f_hi: float) -> Tensor:
    """``count`` smooth random signals ``[count, T]`` in [-1, 1]: sums of three sinusoids."""
    freqs = f_lo + (f_hi - f_lo) * torch.rand(count, 3, 1, generator=g)
    phase = 2 * math.pi * torch.rand(count, 3, 1, generator=g)
    amps = 0.3 + torch.rand(count, 3, 1, generator=g)
    sig = (amps * torch.sin(2 * math.pi * freqs * t + phase)).sum(1)
    return sig / amps.sum(1)


def _blinks(g: torch.Generator, t: Tensor, duration: float = 0.15) -> Tensor:
    """Eyelid closure ``[T]`` in 0..1: blinks every 2-5 s, each ``duration`` seconds long."""
    closed = torch.zeros_like(t)
    end = float(t[-1]) if t.numel() else 0.0
    start = 0.4 + 2.5 * float(torch.rand((), generator=g))
    while start <= end:
        phase = ((t - start) / duration).clamp(0, 1)
        closed = torch.maximum(closed, (1.6 * torch.sin(math.pi * phase)).clamp(max=1))
        start += 2.0 + 3.0 * float(torch.rand((), generator=g))
    return closed


def _motion(size: int, num: int, fps: float, seed: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-frame head pose as a canonical->output affine ``A [T, 2, 2]``, translation and blink closure."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    t = torch.arange(num, dtype=torch.float32) / fps
    tx, ty, rot, zoom = _smooth_signals(g, t, 4, 0.05, 0.45)
    nod = _smooth_signals(g, t, 1, 0.2, 0.6)[0]
    blink = _blinks(g, t)
    tx, ty = 0.03 * size * scale * tx, 0.02 * size * scale * ty + 0.012 * size * scale * nod
    rot, zoom = math.radians(4.0) * scale * rot, 1 + 0.05 * scale * zoom
    squash = 1 - 0.04 * scale * nod.square()                             # pitch foreshortens the face
    c, s_ = torch.cos(rot), torch.sin(rot)
    a = torch.stack([torch.stack([c * zoom, -s_ * zoom * squash], -1),
                     torch.stack([s_ * zoom, c * zoom * squash], -1)], -2)
    return a, torch.stack([tx, ty], -1), blink


def _affine_grid(theta: Tensor, size: int) -> Tensor:
    """``F.affine_grid(theta, [n, c, size, size], align_corners=False)`` by broadcasting (several times faster
    on CPU than its batched matrix product)."""
    r = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    grid = torch.empty(theta.shape[0], size, size, 2)
    for k in range(2):
        t = theta[:, k, :, None, None]
        torch.add(t[:, 0] * r.reshape(1, 1, -1), t[:, 1] * r.reshape(1, -1, 1) + t[:, 2], out=grid[..., k])
    return grid


def _warp_region(grid: Tensor, rect: tuple[int, int, int, int], side: int, content: Tensor, target: Tensor,
                 corners_out: Tensor) -> None:
    """Add the bilinear warp of a per-frame canonical crop's change ``content [n, 4, h, w]`` (zero outside the
    crop) to ``target [n, 4, S, S]``, over the output pixels that the crop can reach (``corners_out [n, 4, 2]``).
    Warping is linear, so this equals warping the whole canvas with the crop replaced."""
    x0, y0, x1, y1 = rect
    size = target.shape[-1]
    lo = corners_out.reshape(-1, 2).amin(0).floor().sub(1).clamp(0, size).int().tolist()
    hi = corners_out.reshape(-1, 2).amax(0).ceil().add(1).clamp(0, size).int().tolist()
    if hi[0] <= lo[0] or hi[1] <= lo[1]:
        return
    sub = grid[:, lo[1]:hi[1], lo[0]:hi[0]]
    px = (sub + 1) * (side / 2) - sub.new_tensor([x0, y0])                       # crop pixel coordinates
    g = px * sub.new_tensor([2.0 / (x1 - x0), 2.0 / (y1 - y0)]) - 1
    patch = F.grid_sample(content, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    target[:, :, lo[1]:hi[1], lo[0]:hi[0]] += patch


def render_clip(style: FaceStyle, mouth: MouthTrack, size: int = 256, motion_seed: int = 0,
                motion_scale: float = 1.0, blink: bool = True, chunk: int = 50) -> SyntheticClip:
    """Render a talking face whose mouth follows ``mouth`` (one frame per MouthTrack entry, at its fps).

    The same style and motion_seed give the same face, head motion and blinks whatever the mouth track, and
    pixels away from the mouth are then identical.
    """
    num = len(mouth)
    if num <= 0:
        raise InputError("render_clip needs a mouth track with at least one frame")
    if size < 32:
        raise InputError(f"render_clip needs frames of at least 32 px, got {size}")
    cv = _Canvas(style, size)
    lay, side = cv.lay, cv.side
    static = _render_static(cv)
    static_cl = static[None].contiguous(memory_format=torch.channels_last)
    a, shift, closed = _motion(size, num, float(mouth.fps), motion_seed, motion_scale)
    if not blink:
        closed = torch.zeros_like(closed)
    openness, width = mouth.openness.float().clamp(0, 1), mouth.width.float().clamp(0, 1)

    # canonical -> output: p_out = origin + A (p_can - pivot); the head turns about the neck
    pivot = torch.tensor(cv.to_px(0.0, lay.ry * 0.85))
    origin = pivot - cv.margin + shift                                              # [T, 2]

    def forward(points: Tensor) -> Tensor:                                          # [K, 2] -> [T, K, 2]
        return origin[:, None] + torch.einsum("tij,kj->tki", a, points - pivot)

    # output -> canonical as affine_grid's theta (normalised coordinates, align_corners=False)
    a_inv = torch.linalg.inv(a)
    theta = torch.cat([a_inv * (size / side),
                       ((pivot + torch.einsum("tij,tj->ti", a_inv, size / 2 - origin)) * (2 / side) - 1)[..., None]],
                      -1)
    bg = _background(style, size)

    def rect_corners(rect):
        x0, y0, x1, y1 = rect
        return forward(torch.tensor([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=torch.float32))

    eyes_rect, mouth_rect = cv.eyes_rect(), cv.mouth_rect()
    eyes_corners, mouth_corners = rect_corners(eyes_rect), rect_corners(mouth_rect)

    def crop(rect):
        x0, y0, x1, y1 = rect
        return static[None, :, y0:y1, x0:x1]

    # eyes: draw each distinct closure once
    levels, which = torch.unique(closed, return_inverse=True)
    base = crop(eyes_rect)
    eyes = _render_eyes(cv, base.expand(len(levels), -1, -1, -1), levels) - base

    frames = torch.empty(num, size, size, 3)
    for lo in range(0, num, chunk):
        hi = min(lo + chunk, num)
        grid = _affine_grid(theta[lo:hi], size)
        rgba = F.grid_sample(static_cl.expand(hi - lo, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
        _warp_region(grid, eyes_rect, side, eyes[which[lo:hi]], rgba, eyes_corners[lo:hi])
        base = crop(mouth_rect)
        lips = _render_mouth(cv, base.expand(hi - lo, -1, -1, -1), openness[lo:hi], width[lo:hi]) - base
        _warp_region(grid, mouth_rect, side, lips, rgba, mouth_corners[lo:hi])
        rgba = rgba.permute(0, 2, 3, 1)
        frames[lo:hi] = torch.addcmul(rgba[..., :3], bg, 1 - rgba[..., 3:]).clamp_(0, 1)

    to = cv.to_px
    pts = torch.tensor([to(-lay.eye_x, lay.eye_y), to(lay.eye_x, lay.eye_y), to(0.0, lay.nose_y),
                        to(0.0, lay.mouth_y), to(-0.98, lay.ear_y), to(0.98, lay.ear_y)])
    kps = forward(pts)
    centre = forward(torch.tensor([cv.centre]))[:, 0]
    half = (a * torch.tensor([cv.px, cv.px * lay.ry])).norm(dim=-1)                 # extents of the face ellipse
    face_box = torch.cat([centre - half, centre + half], -1)
    open_px = MAX_OPEN * cv.px * openness * a[:, 1, 1]
    return SyntheticClip(frames, kps[:, 3].clone(), face_box, openness, width, kps[:, :2].clone(),
                         float(mouth.fps), kps, open_px)


def _background(style: FaceStyle, size: int) -> Tensor:
    """``[S, S, 3]`` solid colour or linear two-colour gradient."""
    c1 = torch.tensor(style.background)
    if style.background2 is None:
        return c1.expand(size, size, 3)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    t = (math.cos(style.gradient_angle) * coords.reshape(1, -1) + math.sin(style.gradient_angle)
         * coords.reshape(-1, 1)) / math.sqrt(0.5) * 0.5 + 0.5
    return torch.lerp(c1, torch.tensor(style.background2), t.clamp(0, 1)[..., None])


# ------------------------------------------------------------------------------------------------- measurement


def measure_openness(frames: Tensor, mouth_center: Tensor, face_width: Union[Tensor, float],
                     samples: tuple[int, int] = (40, 64)) -> Tensor:
    """Mouth opening read from pixels: ``[T]`` height of the dark mouth interior over the face width.

    ``frames [T, H, W, 3]`` (float 0..1 or uint8), ``mouth_center [T, 2]`` pixels, ``face_width`` pixels (``[T]``
    or one number). An elliptic window around each mouth centre (0.52 face widths wide, from 0.09 above to 0.17
    below it, where the opening lies, clear of nose and chin) is resampled at ``samples`` (rows, columns); pixels
    much darker than the window's median (the skin) count as mouth interior; the result is the mean of the
    three tallest columns of such pixels. Teeth and lips are not dark, so for a given face the value is
    proportional to the opening, and it is insensitive to small shifts of the centre.
    """
    if frames.ndim != 4 or frames.shape[-1] < 3:
        raise InputError(f"frames must be [T, H, W, 3], got {tuple(frames.shape)}")
    t, h, w = frames.shape[:3]
    img = frames[..., :3].float()
    if not frames.is_floating_point():
        img = img / 255.0
    centre = torch.as_tensor(mouth_center, dtype=torch.float32).reshape(t, 2)
    fw = torch.as_tensor(face_width, dtype=torch.float32).expand(t).reshape(t, 1, 1)
    rows, cols = samples
    top, bottom, half = -0.09, 0.17, 0.26
    ys = torch.linspace(top, bottom, rows).reshape(1, -1, 1)
    xs = torch.linspace(-half, half, cols).reshape(1, 1, -1)
    gx = (centre[:, 0, None, None] + xs * fw) * (2.0 / w) - 1.0
    gy = (centre[:, 1, None, None] + ys * fw) * (2.0 / h) - 1.0
    grid = torch.stack([gx.expand(t, rows, cols), gy.expand(t, rows, cols)], -1)
    patch = F.grid_sample(img.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                          align_corners=False)
    luma = torch.einsum("tchw,c->thw", patch, torch.tensor([0.2126, 0.7152, 0.0722]))
    r2 = (xs / half).square() + ((ys - (top + bottom) / 2) / ((bottom - top) / 2)).square()
    window = ((1 - r2) * 8).clamp(0, 1)                       # elliptic, so the chin's outline stays out
    ref = luma.flatten(1).median(dim=1).values.reshape(t, 1, 1)
    hi = (0.4 * ref).clamp(max=0.2)
    z = ((hi - luma) / (0.5 * hi).clamp_min(1e-4)).clamp(0, 1)
    dark = z * z * (3 - 2 * z) * window
    heights = dark.sum(1) * ((bottom - top) / (rows - 1))                   # [T, cols] in face widths
    return heights.topk(min(3, cols), dim=1).values.mean(1)


# ----------------------------------------------------------------------------------------------------- examples


def make_example(text: str, seed: int, size: int = 256, fps: FpsLike = 25, voice: str = "en",
                 tmp_dir: Optional[Union[str, Path]] = None, speed: int = 150,
                 pitch: int = 50) -> tuple[SyntheticClip, Waveform]:
    """Speech for ``text`` (espeak-ng) and a random-style face (from ``seed``) that speaks it."""
    with tempfile.TemporaryDirectory(dir=tmp_dir) as folder:
        wav = speak(text, Path(folder) / "speech.wav", voice=voice, speed=speed, pitch=pitch)
        wave = prepare_audio(wav)
    clip = render_clip(style_of(seed), mouth_track(wave.samples, fps), size=size, motion_seed=int(seed) + 1)
    return clip, wave


def style_of(seed: int) -> FaceStyle:
    """The face style :func:`make_example` draws for ``seed``."""
    return FaceStyle.random(torch.Generator().manual_seed(int(seed)))


def lip_swap(seed: int, mouth: MouthTrack, num_frames: int, size: int = 256, offset: int = 0) -> SyntheticClip:
    """The clip of :func:`make_example` for ``seed`` (same face, head motion and blinks) speaking with another
    mouth track, rolled by ``offset`` and tiled to ``num_frames``: a pseudo pair (paper Eq. 3) whose pixels
    differ from the original only around the mouth."""
    index = (torch.arange(num_frames) + offset) % len(mouth)
    other = MouthTrack(mouth.openness[index], mouth.width[index], mouth.fps)
    return render_clip(style_of(seed), other, size=size, motion_seed=int(seed) + 1)
