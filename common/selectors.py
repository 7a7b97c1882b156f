"""Training-free frame selectors on the retrieval embeddings: AKS (relevance + coverage) and a DPP (relevance +
diversity).

Both score the same M uniform candidates as `frames.strategy=retrieval` (RetrievalSelector: a CLIP/SigLIP model or
the answering model's own embeddings) and differ only in how the T frames are chosen from the scores. The choice is
a pure function of a score vector (and, for the DPP, a frame-similarity matrix) that returns sorted positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common.video import Clip
from common.voyager import RetrievalSelector, pick_frames


def normalise(scores: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Scores min-max scaled to [0, 1] within the video (all 0 when they are flat), float64."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    spread = s.max() - s.min()
    return (s - s.min()) / spread if spread > 0 else torch.zeros_like(s)


def _check(num: int, m: int) -> None:
    if not 0 < num <= m:
        raise ValueError(f"cannot pick {num} of {m} frames")


def aks_select(scores: Sequence[float] | torch.Tensor, num: int, threshold: float = 0.5,
               max_depth: int = 5) -> list[int]:
    """Adaptive Keyframe Sampling's judge-and-split (Tang et al., "Adaptive Keyframe Sampling for Long Video
    Understanding", CVPR 2025): positions of `num` frames, in temporal order.

    A segment with budget k is judged on the normalised scores: if the mean of its top k is more than `threshold`
    above the segment's mean (relevance is concentrated), or it is at `max_depth`, its top k are taken. Otherwise
    it is split into two halves that get k/2 each (an odd frame goes to the half with the higher mean relevance),
    which keeps frames spread over the video when no part of it stands out. Ties go to the earlier frame.
    """
    s = normalise(scores)
    _check(num, len(s))

    def pick(lo: int, hi: int, k: int, depth: int) -> list[int]:
        seg = s[lo:hi]
        top = torch.argsort(-seg, stable=True)[:k]
        if k == hi - lo or k == 1 or depth == max_depth or seg[top].mean() - seg.mean() > threshold:
            return [lo + int(p) for p in top]
        mid = (lo + hi) // 2
        left = k // 2 + (k % 2 if s[lo:mid].mean() >= s[mid:hi].mean() else 0)
        left = min(max(left, k - (hi - mid)), mid - lo)  # neither half gets more frames than it has
        return (pick(lo, mid, left, depth + 1) if left else []) + \
            (pick(mid, hi, k - left, depth + 1) if k - left else [])

    return sorted(pick(0, len(s), num, 0))


def dpp_select(scores: Sequence[float] | torch.Tensor, similarity: torch.Tensor, num: int,
               temperature: float = 0.5, ridge: float = 1e-3) -> list[int]:
    """Greedy MAP of a DPP over the frames, as in MDP3 (Sun et al., "MDP3: A Training-free Approach for List-wise
    Frame Selection in Video-LLMs", 2025): positions of `num` frames, in temporal order.

    Kernel L = diag(q) (S + ridge I) diag(q) with q = exp(normalised score / temperature) and S the frames'
    cosine-similarity matrix, so log det L_Y = 2 sum(score_Y) / temperature + log det S_Y: relevant frames that
    are unlike each other. Each step adds the frame with the largest gain det(L_{Y+j}) / det(L_Y) = its residual
    variance d_j^2 after projecting out the chosen frames (an incremental Cholesky factor; Chen et al., NeurIPS
    2018). The ridge keeps duplicates selectable, at a large cost, once nothing else is left.
    """
    q = torch.exp(normalise(scores) / temperature)
    m = len(q)
    _check(num, m)
    S = torch.as_tensor(similarity, dtype=torch.float64)
    if S.shape != (m, m):
        raise ValueError(f"similarity is {tuple(S.shape)}, expected ({m}, {m})")
    L = q[:, None] * (S + ridge * torch.eye(m, dtype=torch.float64)) * q[None, :]
    d2 = L.diagonal().clone()  # residual variance of each frame given the chosen ones
    rows = torch.zeros(num, m, dtype=torch.float64)  # Cholesky rows of the chosen frames against all frames
    chosen: list[int] = []
    for k in range(num):
        gain = d2.clone()
        gain[chosen] = -torch.inf
        j = int(torch.argmax(gain))  # first maximum: ties go to the earlier frame
        rows[k] = (L[j] - rows[:k, j] @ rows[:k]) / d2[j].clamp_min(1e-300).sqrt()
        d2 = d2 - rows[k] ** 2
        chosen.append(j)
    return sorted(chosen)


class AKSSelector(RetrievalSelector):
    """frames.strategy=aks: retrieval relevance of M uniform candidates, T chosen by `aks_select`."""

    def __init__(self, *args, threshold: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold = threshold

    def choose(self, clip: Clip, query: str) -> list[int]:
        return aks_select(self.frame_scores(clip, query).cpu(), self.num, threshold=self.threshold)

    def __call__(self, sample) -> Clip:
        return pick_frames(sample, self.candidates, self.num, self.choose)


class DPPSelector(RetrievalSelector):
    """frames.strategy=dpp: retrieval relevance and frame-frame cosine similarity, T chosen by `dpp_select`."""

    def choose(self, clip: Clip, query: str) -> list[int]:
        image, text = self.embeddings(clip, query)  # one pass for both: the scores are frame_scores' cosine
        scores = F.cosine_similarity(image.float(), text.float(), dim=-1)
        unit = F.normalize(image.double(), dim=-1)
        return dpp_select(scores.cpu(), (unit @ unit.T).cpu(), self.num)

    def __call__(self, sample) -> Clip:
        return pick_frames(sample, self.candidates, self.num, self.choose)
