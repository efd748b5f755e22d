"""Success rate, in the spirit of the AIGC-LipSync benchmark (the OmniSync paper, Sec. 4: the share of clips a
method lip-syncs at all; 97.4 % overall, 87.8 % on stylised characters).

The paper counts a clip as a success when the method produces a result for it (no "face not detected" abort, no
collapse). We name and measure a stricter rule, **follows-speech v1**: a clip succeeds when

1. a face is found in at least ``min_face_rate`` (default 0.9) of the output frames, and
2. the mouth opening follows the speech envelope: ``av_corr_best >= min_corr`` (default 0.3; the Pearson
   correlation of :mod:`omnisync_core.eval.envelope` at the best lag within +-2 frames), and
3. when SyncNet weights were given, ``LSE-C >= min_lse_c`` (default 1.5; unset to ignore).

The success rate of a run is the share of its clips that succeed. Clips that failed to run count as failures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

RULE_NAME = "follows-speech v1"


@dataclass
class SuccessRule:
    min_face_rate: float = 0.9
    min_corr: float = 0.3
    max_lag: int = 2
    min_lse_c: Optional[float] = 1.5

    def describe(self) -> str:
        text = (f"{RULE_NAME}: face found in >= {self.min_face_rate:.0%} of output frames and mouth-opening vs "
                f"speech-envelope correlation >= {self.min_corr:g} (best lag within +-{self.max_lag} frames)")
        if self.min_lse_c is not None:
            text += f", and LSE-C >= {self.min_lse_c:g} when SyncNet weights are given"
        return text

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: Optional[dict]) -> "SuccessRule":
        return SuccessRule(**(d or {}))


def is_success(face_rate: float, corr_best: float, lse_c: Optional[float], rule: SuccessRule) -> bool:
    if not face_rate >= rule.min_face_rate:          # NaN fails
        return False
    if not corr_best >= rule.min_corr:
        return False
    if rule.min_lse_c is not None and lse_c is not None and lse_c == lse_c:
        return lse_c >= rule.min_lse_c
    return True
