"""
HunyuanVideo data curation (paper §3, §3.1, §3.2): raw videos in, filtered, tiered, captioned clips out.

    python curate.py --input RAW_DIR --output OUT_DIR [--workers N] [--labels human_labels.jsonl]
                     [--clip CLIP_DIR [--aesthetic FILE]] [--captioner LLAVA_DIR]    # the open models
    python curate.py --synthetic N --output RAW_DIR [--seed S]      # the embedded demo's raw videos

Per video: split into shots -> cut each shot into clips of up to 129 frames, each from a sharp frame ->
crop letterbox borders -> measure clarity, motion, camera movement, static overlays, technical quality ->
filter -> write the clip -> caption from a sidecar file. Across videos: de-duplicate by embedding cosine
distance, balance concepts with k-means weights, and sort clips into nested resolution tiers, a
fine-tuning set and two image sets (as the paper's, from image-text pairs: each photo in RAW_DIR
(.jpg .jpeg .png .webp) with its sidecar caption, and the sharpest frame of each accepted shot, with its
clip's caption). OUT_DIR gets manifest.jsonl,
rejected.jsonl, images.jsonl, clips/, images/, and one manifest per tier (manifest_256p.jsonl ...
manifest_720p.jsonl: what `train.py --tier 256p` reads), finetune.jsonl, images_256p.jsonl,
images_512p.jsonl (and caption_cache.jsonl with --captioner).

The paper uses in-house or heavy models we cannot ship. Open models take three of their places when
given (apply_models(), after the per-video pass); without them a transparent stand-in does each job:
  VideoCLIP embedding -> --clip: CLIP ViT-L/14        (else clip_embedding(): thumbnails + colour histogram)
  DOVER quality       -> --aesthetic: LAION aesthetic predictor on CLIP ViT-L/14
                                                      (else quality_score(): exposure, contrast, noise)
  VLM captioner       -> --captioner: LLaVA (llava-llama-3-8b) on one frame per clip, so no motion or
                         scene changes in its text: camera_movement() adds the camera's
                                                      (else captions come only from sidecars)
  OCR / YOLOX overlay -> static_overlay()   (pixels that stay fixed while the picture changes)
  camera classifier   -> camera_movement()  (global motion model fitted to optical flow)
  clarity model       -> clarity()          (a Laplacian measure, also for each clip's sharp first frame)
PySceneDetect + TransNet v2 are replaced by detect_shots() (plain OpenCV; `bench.py curate` compares it with
PySceneDetect).
"""
import argparse
import collections
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, asdict, replace

import cv2
import numpy as np
from tqdm import tqdm


@dataclass
class CurateConfig:
    # --- shot detection (content change between consecutive 64x36 thumbnails) ---
    thumb_w: int = 64
    thumb_h: int = 36
    cut_min_score: float = 1.5        # mean |RGB diff| (0-255) a cut must exceed in absolute terms
    cut_ratio: float = 3.0            # ...and this multiple of the median change before or after it
    cut_offset: float = 1.0           # ...plus this, so near-still footage (median ~0) needs a real jump
    cut_window: int = 12              # frames on each side for those medians
    min_shot_frames: int = 4          # two cuts are never closer than this (flash frames)
    fade_level: float = 8.0           # a thumbnail darker than this on average (0-255) is black (fades)
    # --- clips ---
    analysis_w: int = 256             # width of the frames all measurements but clarity run on (the same
                                      # units at every input size)
    clarity_side: int = 256           # clarity is measured at this short side (the smallest tier's)
    sharp_search: int = 12            # paper §3.1: a clip starts on a clear frame; here the sharpest of
                                      # its first N (N is ours: the paper gives no window)
    min_clip_frames: int = 33         # shorter shots are rejected ("too short"); clips are 4n+1 frames
    max_clip_frames: int = 129        # paper §4: the longest training clip (720x1280x129); a longer shot is
                                      # cut into clips back to back while the rest is min_clip_frames
    max_aspect: float = 4.0           # a video's long side is at most this x its short side (the widest
                                      # common format is 32:9; analysis frames are analysis_w wide, so a
                                      # taller video costs memory and time as its height / width)
    # --- basic filters (paper §3.1; every accepted clip passes these, the tiers tighten them; the paper
    # states no threshold, and has no "too fast" filter: max_motion is ours) ---
    min_clarity: float = 2.5          # clarity() at 256p: between blurred and sharp demo shots (docs/demo.md)
    min_motion: float = 0.5           # 99th-percentile flow, px per 1/24 s at analysis_w: below = static
    max_motion: float = 25.0          # above = too fast (whip pans, strobing): ~10% of the width per 1/24 s
    min_quality: float = 0.25         # quality_score() in [0, 1]
    dedup_max_dist: float = 0.006     # cosine distance below which two clips are duplicates (copies,
                                      # re-encodes; see clip_embedding())
    # --- letterbox and static overlays ---
    border_luma: float = 16.0         # a letterbox row/column never gets brighter than this
    overlay_std: float = 2.5          # luma std below which a pixel counts as fixed (across frames or shots)
    overlay_min_area: float = 0.002   # overlays smaller than this fraction of the frame are ignored
    min_area_after_crop: float = 0.7  # crop an overlay off the edge only if this much of the frame remains
    # --- camera movement (paper §3.2; thresholds in px per 1/24 s at analysis_w: px/frame at 24 fps) ---
    cam_static: float = 0.12          # drift below this on every component: no camera move
    cam_jitter: float = 0.3           # frame-to-frame wobble above this (and no drift) is a handheld shot
    cam_consistency: float = 0.5      # |mean| / rms of a component: a real move keeps its direction
    cam_parallax_frac: float = 0.08   # a second motion layer must hold this fraction of tracked points...
    cam_parallax_pairs: float = 0.5   # ...in this fraction of frame pairs to call the shot parallax
    cam_pedestal: float = 1.0         # vertical drift whose flow varies across the frame by more than this
                                      # x its median is a pedestal, not a tilt (see camera_movement())
    cam_min_conf: float = 0.5         # paper §3.2: only high-confidence labels go into captions
    cam_pairs: int = 24               # frame pairs sampled per clip for flow
    # --- hierarchical tiers (paper §3.1, Fig. 4): each tier also passes every looser one ---
    tier_names: tuple = ("256p", "360p", "540p", "720p")
    tier_side: tuple = (256, 360, 540, 720)           # minimum short side after cropping
    tier_frames: tuple = (65, 65, 97, 129)            # paper: 256x256x65 first stage ... 720x1280x129 last
    # clarity above 256p is measured at the tier's own short side (a clip's clarity_at): blur of the
    # tier's own pixels does not show at 256p. 5.5 lies between 2 px blur and sharp footage at those
    # sides (docs/demo.md); the same footage scores lower at a larger side, so higher tiers are stricter
    tier_clarity: tuple = (2.5, 5.5, 5.5, 5.5)
    tier_quality: tuple = (0.25, 0.35, 0.45, 0.55)
    finetune_tier: str = "540p"       # fine-tune set (no human labels): clips of this tier or above...
    finetune_quality: float = 0.6     # ...with at least this quality...
    finetune_clarity: float = 5.5     # ...and this clarity at its side (--labels, human picks, replaces this)
    # --- image sets (paper §3.1: the video filters without the motion ones) ---
    image_side: tuple = (256, 512)    # T2I stage 1 (256px) and stage 2 (256/512px)
    image_clarity: tuple = (4.2, 5.5)  # 512p: measured at 512p, as the tiers above 256p
    image_quality: tuple = (0.3, 0.45)
    sharp_tag_clarity: float = 7.5    # 256p clarity from which the quality tags say "sharp" (else "soft")
    # --- concept balancing (paper §3.1: k-means over clip embeddings, ~10K centroids at their scale) ---
    clips_per_concept: int = 20       # k = n_clips / this, at least 1
    max_concepts: int = 10000
    # --- the open models' units (curate.py --clip, --aesthetic; model_units() switches to these when a
    # manifest's values come from them): the same filters as above, in CLIP cosine distance and in the LAION
    # aesthetic predictor's score (~1-10; LAION-Aesthetics cut its image sets at 5, 6 and 6.5) ---
    clip_dedup_max_dist: float = 0.05   # cosine similarity 0.95, the usual CLIP near-duplicate cut:
                                        # re-encodes below, other shots above (tested where CLIP is on disk)
    min_aesthetic: float = 4.0          # basic filter: only the unappealing tail goes, footage scores below
                                        # curated photos
    tier_aesthetic: tuple = (4.0, 4.5, 5.0, 5.5)   # 540p at 5.0: the "5+" set Stable Diffusion trained on
    image_aesthetic: tuple = (4.5, 5.0)            # stills half a point above the video tier of their side
    finetune_aesthetic: float = 6.0     # LAION-Aesthetics' "6+" high-aesthetic set


CFG = CurateConfig()
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")
# photos: image-text pairs for the image sets (process_photo)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_FIELDS = ("short_description", "dense_description", "background", "style", "shot_type",
                  "lighting", "atmosphere")
CAMERA_CLASSES = ("zoom in", "zoom out", "pan up", "pan down", "pan left", "pan right", "tilt up",
                  "tilt down", "tilt left", "tilt right", "around left", "around right", "static shot",
                  "handheld shot")

# -----------------------------------------------------------------------------
# decoding and probing

def iter_frames(path, size=None):
    """Yield RGB frames (optionally resized to size=(w, h)); stops quietly at the first unreadable frame."""
    cap = cv2.VideoCapture(path)
    try:
        while True:
            ok, f = cap.read()
            if not ok or f is None:
                return
            if size is not None:
                f = cv2.resize(f, size, interpolation=cv2.INTER_AREA)
            yield cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def probe(path, raw_fps=False):
    """(width, height, fps) of a readable video, else raise ValueError with the reason. A frame rate the file
    does not give, or one outside 1-240 fps (0, NaN, a broken header's 1000), is taken as 24.
    raw_fps=True: a fourth value, the file's own frame rate as OpenCV reads it."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file")
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise ValueError("cannot open as video")
        ok, f = cap.read()
        if not ok or f is None:
            raise ValueError("no decodable frames")
        fps = cap.get(cv2.CAP_PROP_FPS)
        out = f.shape[1], f.shape[0], fps if 1 <= fps <= 240 else 24.0
        return out + (fps,) if raw_fps else out
    finally:
        cap.release()


def resize_w(frame, w):
    """frame resized to width w (INTER_AREA), its height rounded to even, the aspect kept."""
    h = max(2, int(round(frame.shape[0] * w / frame.shape[1] / 2)) * 2)
    return cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)

# -----------------------------------------------------------------------------
# shot detection (paper §3.1 uses PySceneDetect; this is our own, faster: hard cuts, jump cuts, fades)

def frame_change(a, b, shift):
    """Mean |BGR diff| of two uint8 thumbnails after undoing the global (sub-pixel) shift between them
    (phase correlation, given), or without, whichever is lower: a pan or tilt moves content but keeps it, a
    cut brings new content. Over fine texture undoing the shift lowers the diff only partly, yet on every
    frame of the move alike; cuts_from_rows decides where this score or the raw diff counts."""
    d0 = cv2.norm(a, b, cv2.NORM_L1) / a.size
    sx, sy = shift
    h, w = a.shape[:2]
    if abs(sx) > w // 3 or abs(sy) > h // 3 or (abs(sx) < 0.25 and abs(sy) < 0.25):
        return d0
    wa = cv2.warpAffine(a, np.float32([[1, 0, sx], [0, 1, sy]]), (w, h), flags=cv2.INTER_LINEAR)
    x0, x1 = int(np.ceil(max(0, sx))), w - int(np.ceil(max(0, -sx)))
    y0, y1 = int(np.ceil(max(0, sy))), h - int(np.ceil(max(0, -sy)))
    aa, bb = np.ascontiguousarray(wa[y0:y1, x0:x1]), np.ascontiguousarray(b[y0:y1, x0:x1])
    return min(d0, cv2.norm(aa, bb, cv2.NORM_L1) / aa.size)


def cuts_from_scores(d, cfg=CFG):
    """Frame indices i where a new shot starts, from d[i] = change between frames i-1 and i (d[0] = 0).
    Adaptive threshold: d[i] must beat cut_ratio x the median change on the calmer side of it (the
    frames before or after), so a cut from a still shot into a moving one is found, and be a spike
    (1.5x both neighbours), so the sustained change of a zoom, pan or handheld shot is not a cut."""
    d = np.asarray(d, np.float64)
    n, W = len(d), cfg.cut_window
    if n < 2:
        return []
    # d[0] and the frames beyond the ends are no measurements (NaN): near the start of a video the median
    # before a frame is that of the few frames there are, not pulled to 0 by padding
    pad = np.pad(d[1:], (W + 1, W), constant_values=np.nan)
    win = np.lib.stride_tricks.sliding_window_view(pad, W)       # win[j] = pad[j:j+W]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)            # an all-NaN side: no median there
        left = np.nanmedian(win[:n], axis=1)                       # d[i-W:i]
        right = np.nanmedian(win[W + 1:W + 1 + n], axis=1)         # d[i+1:i+W+1]
    calm = np.fmin(left, right)                                    # the side that has a median
    cuts, last = [], 0
    for i in range(1, n):
        lo, hi = max(1, i - 2), min(n, i + 3)
        nb = max(d[i - 1] if i > 1 else 0.0, d[i + 1] if i + 1 < n else 0.0)
        if (d[i] > cfg.cut_min_score and d[i] > cfg.cut_ratio * calm[i] + cfg.cut_offset and d[i] > 1.5 * nb
                and d[i] == d[lo:hi].max() and i - last >= cfg.min_shot_frames):
            cuts.append(i)
            last = i
    return cuts


def _open_single_threaded(path):
    # One decoder thread per capture: detect_shots runs two captures side by side, and FFmpeg's frame
    # threading costs more CPU than it saves on small frames (docs/performance.md)
    return cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])


def _scan(cap, cfg, win, prev=None, limit=None, keep=range(0), stop=None):
    """Reads frames (to the end, or `limit` of them) and scores each against the one before it (the first
    against `prev`, if given). Returns (one row per frame read: (mean level, raw change d0, pan-compensated
    change d1, global shift x, y), thumbnails of the frames whose read index is in `keep`, the last
    thumbnail); the first row has no scores (zeros) unless `prev` was given. Phase correlation runs only
    for a cut candidate (d0 > cut_min_score) and the 3 frames on each side of it, which cuts_from_rows
    compares it with; other frames keep shift 0."""
    tw, th = cfg.thumb_w, cfg.thumb_h
    rows, kept, n = [], [], 0
    recent, after = collections.deque(maxlen=3), 0   # (row, thumbnail before, thumbnail): no shift yet

    def shift(a, b):
        ga, gb = (cv2.cvtColor(x, cv2.COLOR_BGR2GRAY).astype(np.float32) for x in (a, b))
        return cv2.phaseCorrelate(ga, gb, win)[0]
    while (limit is None or n < limit) and not (stop is not None and stop.is_set()):
        ok, f = cap.read()
        if not ok or f is None:
            break
        # two cheap bilinear steps instead of one INTER_AREA: the same scores in practice, far cheaper
        t = cv2.resize(cv2.resize(f, (2 * tw, 2 * th), interpolation=cv2.INTER_LINEAR), (tw, th),
                       interpolation=cv2.INTER_AREA)
        row = [sum(cv2.mean(t)[:3]) / 3, 0.0, 0.0, 0.0, 0.0]
        if prev is not None:
            d0 = cv2.norm(t, prev, cv2.NORM_L1) / t.size
            row[1:3] = d0, d0
            if d0 > cfg.cut_min_score:   # only a big change can be a cut: then the pan-compensated score
                for r, a, b in recent:                          # ...and the shifts of the frames before it
                    r[3:] = shift(a, b)
                recent.clear()
                row[3:] = shift(prev, t)
                row[2], after = frame_change(prev, t, row[3:]), 3
                # phase correlation on a thumbnail is off by a few tenths of a px now and then: inside a move
                # the previous frame's shift may undo this one's better
                before = rows[-1][3:] if rows else (0.0, 0.0)
                if abs(before[0] - row[3]) + abs(before[1] - row[4]) > 0.1:
                    row[2] = min(row[2], frame_change(prev, t, before))
            elif after:                                         # ...and after it
                row[3:], after = shift(prev, t), after - 1
            else:
                recent.append((row, prev, t))
        rows.append(row)
        if n in keep:
            kept.append(t)
        prev, n = t, n + 1
    return rows, kept, prev


def detect_shots(path, cfg=CFG):
    """[(start, end)] frame ranges of single shots, end exclusive. Raises ValueError if unreadable.

    Decoding (and OpenCV's YUV -> BGR conversion) is almost all of the cost, so the two halves of the
    video are decoded at once by two captures, the second one seeked to the middle. Seeking is not
    frame-exact in every container, so the halves overlap by `seam` frames and are joined only if the
    overlap matches exactly and is not a still (where any offset would match); otherwise the first
    capture simply reads on. Either way the scores are those of reading every frame in order."""
    cap = _open_single_threaded(path)
    if not cap.isOpened():
        raise ValueError("cannot open as video")
    win = cv2.createHanningWindow((cfg.thumb_w, cfg.thumb_h), cv2.CV_32F)
    seam = 8
    mid = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) // 2  # the container's estimate: only a split point
    second, stop = {}, threading.Event()

    def read_second_half():
        cap2 = None
        try:
            cap2 = _open_single_threaded(path)
            if cap2.isOpened() and cap2.set(cv2.CAP_PROP_POS_FRAMES, mid):
                second["scan"] = _scan(cap2, cfg, win, keep=range(seam), stop=stop)
        except Exception:  # noqa: BLE001 -- a failed second reader only costs speed: the first reads on
            second.clear()
        finally:
            if cap2 is not None:
                cap2.release()

    thread = threading.Thread(target=read_second_half, daemon=True) if mid >= 4 * seam else None
    try:
        if thread is None:
            rows, _, last = _scan(cap, cfg, win)
        else:
            thread.start()
            rows, overlap, last = _scan(cap, cfg, win, limit=mid + seam, keep=range(mid, mid + seam))
            thread.join()
            rows2, head, _ = second.get("scan", ([], [], None))
            joined = (len(overlap) == len(head) == seam
                      and all(np.array_equal(x, y) for x, y in zip(overlap, head))
                      and any(not np.array_equal(overlap[0], x) for x in overlap[1:]))
            if joined:  # frames 0..mid+1 from the first half, the rest from the second (its row 0 has no
                rows = rows[:mid + 2] + rows2[2:]   # scores, its row 1 no previous shift)
            elif len(overlap) == seam:  # the first capture has not reached the end: read on from there
                rows = rows + _scan(cap, cfg, win, prev=last)[0]
    finally:
        stop.set()
        if thread is not None and thread.is_alive():
            thread.join()
        cap.release()
    if last is None:  # not one frame decoded
        return []
    bounds = [0] + cuts_from_rows(np.array(rows), cfg) + [len(rows)]
    return list(zip(bounds[:-1], bounds[1:]))


def cuts_from_rows(rows, cfg=CFG):
    """Cuts from _scan's rows (level, d0, d1, shift x, y per frame): hard cuts from the change scores, and
    fades through black. The pan-compensated score d1 stands only inside a camera move, where it is the
    like-for-like score of every frame around: the frame's shift is within 2 thumbnail px of the median
    shift of the 3 frames before or of the 3 after (inside a slow pan, a jump of several px is an edit, a
    jump cut, not the pan), and undoing the shift lowered the change of those frames (median d1 <= 0.8 d0).
    Between two still shots a shift found across the cut only lines up leftovers (a shape where another
    was, a similar backdrop), and the raw change decides."""
    n = len(rows)
    level, d0, d1, shift = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:5]

    def around(x):   # medians of x over frames i-3..i-1 and i+1..i+3
        pad = np.pad(x, ((3, 3),) + ((0, 0),) * (x.ndim - 1), mode="edge")
        return (np.median(np.stack([pad[i:i + n] for i in range(3)]), axis=0),
                np.median(np.stack([pad[i + 4:i + 4 + n] for i in range(3)]), axis=0))
    before, after = around(shift)
    in_move = (np.abs(shift - before).max(1) <= 2) | (np.abs(shift - after).max(1) <= 2)
    before, after = around(np.where(d0 > 0, d1 / np.maximum(d0, 1e-9), 1.0))
    in_move &= (before <= 0.8) | (after <= 0.8)
    cuts = cuts_from_scores(np.where(in_move, d1, d0), cfg)
    # fade out to black and in again: no single frame changes much, so cut in the middle of the dark run
    # (PySceneDetect's threshold detector does the same), unless a hard cut already falls inside it
    dark = np.concatenate([[False], level < cfg.fade_level, [False]])
    starts, ends = np.nonzero(~dark[:-1] & dark[1:])[0], np.nonzero(dark[:-1] & ~dark[1:])[0]
    for a, b in zip(starts, ends):    # dark frames a..b-1
        if a > 0 and b < n and not any(a <= c <= b for c in cuts):
            cuts.append(int(a + b) // 2)
    return sorted(cuts)


# -----------------------------------------------------------------------------
# clarity (paper §3.1: clear frames found with OpenCV's Laplacian)

CLARITY_SIGMA = 1.0      # px at clarity_side: the Gaussian before the Laplacian (see clarity())
CLARITY_REF_STD = 32.0   # clarity's unit: the Laplacian's variance with grey levels rescaled to this std
CLARITY_MIN_STD = 8.0    # a frame flatter than this (grey-level std) is rescaled as if it had this std


def clarity(frame, cfg=CFG, side=None, at=None):
    """Sharpness of a frame, falling as blur grows: the variance of its Laplacian of Gaussian over its
    grey-level variance, at a short side of clarity_side. Paper §3.1 finds clear frames with OpenCV's
    Laplacian without naming the statistic; fixing the size and dividing out the contrast makes the number
    comparable across sizes and exposures, so one threshold serves a dataset of mixed sizes (the tiers of
    Fig. 4). A larger frame is shrunk (INTER_AREA); a smaller one is measured as it is (upsampling adds
    no detail). The Gaussian (CLARITY_SIGMA) reads a band below what resampling and uint8 rounding
    disturb; below CLARITY_MIN_STD a frame counts as flat, so its noise is not scaled up to a sharp score.
    side: the short side of the whole frame when `frame` is a crop of it (a letterbox cut off), so that
    cropping does not change the scale. at: measure at another short side (a tier's, see tier_clarity)."""
    g = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
    f = (at or cfg.clarity_side) / (side or min(g.shape[:2]))
    if f < 1:
        g = cv2.resize(g, (max(1, round(g.shape[1] * f)), max(1, round(g.shape[0] * f))),
                       interpolation=cv2.INTER_AREA)
    b = cv2.GaussianBlur(g.astype(np.float32), (0, 0), CLARITY_SIGMA)
    lap = cv2.meanStdDev(cv2.Laplacian(b, cv2.CV_32F))[1][0, 0]
    std = max(float(cv2.meanStdDev(b)[1][0, 0]), CLARITY_MIN_STD)
    return float((lap * CLARITY_REF_STD / std) ** 2)

# -----------------------------------------------------------------------------
# motion: optical flow (paper §3.1)

_DIS = None


def flow(a, b):
    """Dense optical flow (DIS, OpenCV) between two grey uint8 frames: (h, w, 2) in px/frame."""
    global _DIS
    if _DIS is None:
        _DIS = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return _DIS.calc(a, b, None)


def _pair_indices(n, k):
    """Up to k consecutive-frame pairs spread evenly over n frames."""
    if n < 2:
        return []
    return sorted(set(np.linspace(0, n - 2, min(k, n - 1)).round().astype(int).tolist()))


def pair_flows(frames, cfg=CFG, fps=24.0):
    """[(grey frame, flow to a frame `step` later, dt)] for up to cam_pairs pairs spread over the clip, at
    analysis_w; dt is the step in units of 1/24 s, so flow / dt is in px per 1/24 s at any frame rate
    (px/frame would score one subject speed lower at 60 fps than at 24). Long, slow clips use a longer
    step (up to 4 frames), so slow moves and small parallax rise above the flow noise; but DIS loses a
    subject that moves too far in one step, so the step keeps the 99th-percentile flow of three probe
    pairs under 6 px (the median flow alone would miss a fast subject before a still camera).
    motion() and camera_movement() share these pairs: flow is the cost."""
    g = [cv2.cvtColor(resize_w(f, cfg.analysis_w), cv2.COLOR_RGB2GRAY) for f in frames]
    if len(g) < 2:
        return []
    probes = {i: np.linalg.norm(flow(g[i], g[i + 1]), axis=2)
              for i in {(len(g) - 2) * q // 4 for q in (1, 2, 3)}}
    speed = np.median(probes[(len(g) - 2) // 2])           # the camera's share, not a subject's
    fast = max(np.percentile(m, 99) for m in probes.values())
    step = int(np.clip(min(2.0 / max(speed, 1e-3), 6.0 / max(fast, 1e-3), (len(g) - 1) // cfg.cam_pairs),
                       1, 4))
    dt = step * 24.0 / fps
    return [(g[i], flow(g[i], g[i + step]), dt) for i in _pair_indices(len(g) - step + 1, cfg.cam_pairs)]


def motion(frames, cfg=CFG, flows=None, fps=24.0):
    """Motion speed (paper §3.1, optical flow): mean over sampled frame pairs of the 99th-percentile flow
    magnitude, in px per 1/24 s at analysis_w. A high percentile so a small subject moving on a still
    background still counts as motion; a still shot scores ~0."""
    flows = pair_flows(frames, cfg, fps) if flows is None else flows
    speeds = [np.percentile(np.linalg.norm(fl, axis=2), 99) / dt for _, fl, dt in flows]
    return float(np.mean(speeds)) if speeds else 0.0

# -----------------------------------------------------------------------------
# camera movement (paper §3.2: 14 classes, high-confidence labels only)

def _fit_similarity(src, dst):
    """RANSAC similarity (translation, scale, rotation) mapping src -> dst; returns (matrix, inlier mask)."""
    if len(src) < 8:
        return None, np.zeros(len(src), bool)
    m, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=0.6,
                                         maxIters=500, confidence=0.99)
    if m is None:
        return None, np.zeros(len(src), bool)
    return m, inl.ravel().astype(bool)


def _pair_motion(a, fl, dt, cfg):
    """Global motion between two grey frames dt/24 s apart: dict with translation tx, ty (px per 1/24 s),
    scale rate ds, rotation (rad per 1/24 s; + = content turns clockwise on screen, y points down), RANSAC
    inlier fraction, and a second motion layer (parallax) if one spans enough of the frame:
    layers = (far, near), each (tx, ty, share of the points, scale rate)."""
    h, w = a.shape
    gx, gy = cv2.Sobel(a, cv2.CV_32F, 1, 0), cv2.Sobel(a, cv2.CV_32F, 0, 1)
    ys, xs = np.mgrid[4:h - 4:4, 4:w - 4:4]
    mag = np.hypot(gx, gy)[ys, xs]
    keep = mag > max(4.0, np.percentile(mag, 30))      # textured points only: flat areas have no flow signal
    ys, xs = ys[keep], xs[keep]
    src = np.stack([xs - w / 2, ys - h / 2], 1).astype(np.float32)   # centred: rotation/zoom about the centre
    dst = src + fl[ys, xs]
    m, inl = _fit_similarity(src, dst)
    if m is None:
        return None
    out = {"tx": float(m[0, 2]) / dt, "ty": float(m[1, 2]) / dt,
           "ds": float(np.hypot(m[0, 0], m[1, 0]) ** (1 / dt) - 1),
           "rot": float(np.arctan2(m[1, 0], m[0, 0])) / dt,
           "radius": float(np.linalg.norm(src, axis=1).mean()), "inliers": float(inl.mean()), "layers": None}
    # vertical flow over a 6 x 4 grid of blocks: (10th percentile, median of all points, 90th percentile)
    # of the block medians. Block medians average the per-point flow noise out, so their spread is depth:
    # a tilt moves every block alike, a pedestal moves near (low) ground faster than the far scene
    vy, block = fl[ys, xs, 1] / dt, (ys * 6 // h) * 4 + xs * 4 // w
    meds = [np.median(vy[block == i]) for i in range(24) if (block == i).sum() >= 8]
    out["vy"] = (*np.percentile(meds, (10, 90)), float(np.median(vy))) if meds else (0.0, 0.0, 0.0)
    # parallax: a second, coherent layer among the outliers (near and far move differently)
    if (~inl).mean() >= cfg.cam_parallax_frac:
        m2, inl2 = _fit_similarity(src[~inl], dst[~inl])
        p2 = src[~inl][inl2]
        spread = (np.ptp(np.percentile(p2[:, 0], (5, 95))) / w if len(p2) else 0,
                  np.ptp(np.percentile(p2[:, 1], (5, 95))) / h if len(p2) else 0)
        # a depth layer spans the frame (ground, backdrop); a moving subject is compact: not parallax
        if m2 is not None and inl2.sum() >= cfg.cam_parallax_frac * len(src) and max(spread) > 0.5:
            l1 = (float(m[0, 2]) / dt, float(m[1, 2]) / dt, float(inl.mean()), out["ds"])
            l2 = (float(m2[0, 2]) / dt, float(m2[1, 2]) / dt, float(inl2.sum() / len(src)),
                  float(np.hypot(m2[0, 0], m2[1, 0]) ** (1 / dt) - 1))
            out["layers"] = (l1, l2) if l1[2] >= l2[2] else (l2, l1)   # (far, near): far = larger area
    return out


def camera_movement(frames, cfg=CFG, flows=None, fps=24.0):
    """(label, confidence): one of the paper's 14 camera-movement classes (§3.2, CAMERA_CLASSES) from a
    global motion model fitted to optical flow. The label names the CAMERA's motion; content moves the
    other way.
      pan left/right    camera turns left/right (no parallax)  -> content slides right/left
      tilt up/down      camera turns up/down (no parallax)     -> content slides down/up
      pan up/down       camera rises/sinks (pedestal; parallax: near content slides faster than far, the
                        same way, as two layers or as vertical flow that varies across the frame)
      tilt left/right   camera rolls: 'tilt right' = the camera rolls clockwise as seen from behind it
                        (the operator's head leans right) -> content turns COUNTER-clockwise on screen
      zoom in/out       content grows/shrinks (a dolly too: near content grows faster than far)
      around left/right the camera orbits the subject: near and far layers slide in opposite directions
                        (or the same way, far faster, where the pivot is nearer than the content).
                        'around left' = the camera travels to its left -> the far layer (taken to be the
                        larger-area layer) slides LEFT, the near layer right (or left, slower)
      handheld shot     frame-to-frame wobble with no net drift;  static shot: no motion at all
    Horizontal translation with parallax in one direction (a truck) is labelled like a pan.
    Model: per sampled frame pair, RANSAC similarity (translation, zoom, roll) on textured flow vectors;
    a second RANSAC on the outliers finds a parallax layer; the spread of block medians of the vertical
    flow tells a pedestal whose parallax is a gradient from a tilt. Components are compared as px per
    1/24 s at the mean point radius; the largest consistent drift names the move, wobble without drift is
    handheld. Confidence: consistency of direction x margin over the runner-up x size of the move."""
    flows = pair_flows(frames, cfg, fps) if flows is None else flows
    pm = [p for p in (_pair_motion(a, fl, dt, cfg) for a, fl, dt in flows) if p]
    if not pm:
        return "static shot", 0.0
    # single layer: compare components as displacement at the mean point radius (px per 1/24 s)
    comp = np.array([[p["tx"], p["ty"], p["ds"] * p["radius"], p["rot"] * p["radius"]] for p in pm])
    drift, rms = np.abs(comp.mean(0)), np.sqrt((comp ** 2).mean(0))
    layered = [p["layers"] for p in pm if p["layers"]]
    if len(layered) >= cfg.cam_parallax_pairs * len(pm):
        far = np.array([l[0][:2] for l in layered]).mean(0)
        near = np.array([l[1][:2] for l in layered]).mean(0)
        # near minus far scale rate, as displacement at the mean radius (like comp)
        dscale = np.mean([(p["layers"][1][3] - p["layers"][0][3]) * p["radius"] for p in pm if p["layers"]])
        if abs(dscale) > 0.7 * np.abs(far - near).max():
            # near content grows faster than far: a dolly, named like a zoom. Over a ground plane with the
            # camera pitched down the layers also slide apart vertically (the focus of expansion is at the
            # horizon, above the frame centre): the scale rates, compared first, keep that from a pedestal
            label = "zoom in" if dscale > 0 else "zoom out"
            sep = abs(dscale)
        elif abs(far[0]) + abs(near[0]) >= abs(far[1]) + abs(near[1]):
            # orbit: near and far slide opposite ways, or (pivot nearer than all the content) the same way
            # with far faster; a truck moves near content faster than far
            if far[0] * near[0] < 0 or abs(far[0]) > abs(near[0]):
                label = "around left" if far[0] < 0 else "around right"
            else:                          # truck, named like a pan
                label = "pan left" if far[0] + near[0] > 0 else "pan right"
            sep = abs(far[0] - near[0])
        else:                              # vertical with parallax: pedestal
            label = "pan up" if far[1] + near[1] > 0 else "pan down"
            sep = abs(far[1] - near[1])
        # a second layer that moves only a little differently from the first, beside a bigger zoom or
        # roll, is flow noise around that move (zoomed-in texture blurs), not parallax
        if drift[2:].max() <= 2 * sep:
            # two layers that explain little of the frame (continuous depth) give a less certain label
            share = np.mean([l[0][2] + l[1][2] for l in layered])
            conf = (min(1.0, len(layered) / len(pm)) * min(1.0, sep / (4 * cfg.cam_static))
                    * min(1.0, share / 0.6))
            return label, round(float(conf), 3)
    wobble = np.sqrt(((comp - comp.mean(0)) ** 2).mean(0))
    jitter = float(np.hypot(wobble[0], wobble[1]))
    k = int(np.argmax(drift))
    consistency = drift[k] / (rms[k] + 1e-9)
    if drift[k] < cfg.cam_static or consistency < cfg.cam_consistency:
        if jitter > cfg.cam_jitter:
            conf = min(1.0, jitter / (2 * cfg.cam_jitter)) * (1 - consistency / 2)
            return "handheld shot", round(float(conf), 3)
        conf = 1 - 0.5 * max(drift.max() / cfg.cam_static, jitter / cfg.cam_jitter)
        return "static shot", round(float(np.clip(conf, 0, 1)), 3)
    sign = comp.mean(0)[k]
    label = [("pan left", "pan right"), ("tilt up", "tilt down"), ("zoom in", "zoom out"),
             ("tilt left", "tilt right")][k][0 if sign > 0 else 1]
    if k == 1:
        # a level pedestal over open ground: the near ground's parallax is a gradient, not a second flat
        # layer, and as the camera rises the ground leaves the frame, so the layer test above can find
        # too few layered pairs. Its vertical block medians then spread by more than the median flow
        # (cam_pedestal), all one way; a tilt's stay closer together (perspective and flow noise only)
        par = np.median([(hi - lo) / max(abs(med), 1e-6) if lo * hi > 0 else 0.0 for lo, hi, med in
                         (p["vy"] for p in pm)])
        if par > cfg.cam_pedestal:
            label = "pan up" if sign > 0 else "pan down"
    second = np.sort(drift)[-2]
    conf = consistency * (1 - second / drift[k]) * min(1.0, drift[k] / (2 * cfg.cam_static))
    return label, round(float(conf), 3)

# -----------------------------------------------------------------------------
# letterbox and overlay crop, technical quality (paper §3.1; stand-ins for its detectors and DOVER)

def letterbox(frames, cfg=CFG):
    """(x0, y0, x1, y1) content box inside black letterbox/pillarbox bars: rows and columns at the edges
    that stay darker than border_luma in every sampled frame are cut off, as far as they are black: at
    the median <= 2 (video black decodes to 0-2) and nearly uniform in space and time (std < 2), so dark
    picture (a noisy night sky) is not taken for a bar."""
    g = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
    h, w = g.shape[1:]
    bars = []
    for ax in ((0, 2), (0, 1)):                                  # rows, then columns
        bright = g.max(ax) > cfg.border_luma
        black = (np.median(g, ax) <= 2) & (g.std(ax) < 2)
        if not bright.any():
            return 0, 0, w, h                  # an all-black clip: nothing to crop, other filters reject it
        for br, bl in ((bright, black), (bright[::-1], black[::-1])):   # from the start, from the end
            dim = int(np.argmax(br))                             # rows before the first bright one
            k = len(bl) if bl.all() else int(np.argmin(bl))      # rows before the first non-black one
            bars.append(dim if k >= dim - 1 else k)  # (the bar's last row may be its edge, blurred grey)
    (y0, y1), (x0, x1) = (bars[0], h - bars[1]), (bars[2], w - bars[3])
    # one more row/column inside a detected bar: the bar's edge is blurred by scaling and compression
    return x0 + (x0 > 0), y0 + (y0 > 0), x1 - (x1 < w), y1 - (y1 < h)


def static_overlay(frames, others=(), cfg=CFG, still_camera=False):
    """Boolean mask of burnt-in overlays (watermarks, logos, subtitles): sharp edges that stay fixed
    while the picture around them changes, within the shot (if it moves) and across the video's other
    shots (`others`: one frame from each, same size). A stand-in for the paper's OCR and YOLOX-like
    detectors (§3.1); it misses semi-transparent marks and text that changes every few seconds.
    still_camera: the shot's camera does not move, so a fixed object of the scene can look like a logo."""
    g = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32)
    stacks = [g]                                             # within the shot
    if len(others) >= 2:                                     # one frame per shot, across the video
        stacks.append(np.stack([g[len(g) // 2]] + [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32)
                                                   for f in others]))
    mask = np.zeros(g.shape[1:], bool)
    k5 = np.ones((5, 5), np.uint8)
    for n_stack, st in enumerate(stacks):
        m = st.mean(0)
        gx, gy = np.abs(cv2.Sobel(m, cv2.CV_32F, 1, 0)), np.abs(cv2.Sobel(m, cv2.CV_32F, 0, 1))
        # logo/text-like: strong edges in both directions nearby (a straight edge sliding along itself
        # during a pan also looks fixed, but has edges in one direction only)
        corner = cv2.dilate((gx > 40).astype(np.uint8), k5) & cv2.dilate((gy > 40).astype(np.uint8), k5)
        # the whole 5x5 patch must stay fixed: an edge sliding along itself in a pan keeps its own
        # pixels but not its neighbourhood's; a logo keeps both
        sd = st.std(0)
        still = cv2.erode((sd < cfg.overlay_std).astype(np.uint8), k5)
        fixed = (still > 0) & (corner > 0) & (m > cfg.border_luma)   # (black bars are letterbox, not overlay)
        moving = sd > 2 * cfg.overlay_std
        if (n_stack == 0 and moving.mean() < 0.2) or fixed.sum() > 0.25 * fixed.size:
            continue                  # a still shot, or shots of one still scene: fixed tells us nothing
        if n_stack == 0:
            # within a shot, the fixed region must also be small with the picture right around it changing:
            # before a still camera the backdrop is as fixed as a logo. Across shots a fixed patch is a logo.
            n, lab, stats, _ = cv2.connectedComponentsWithStats(still)
            lab = np.where((stats[:, cv2.CC_STAT_AREA] < 0.1 * still.size)[lab], lab, 0)
            near = cv2.dilate(lab.astype(np.float32), np.ones((17, 17), np.uint8)).astype(int)  # within 8 px
            ring = (lab == 0) & (near > 0)
            changing = (np.bincount(near[ring], moving[ring], n)
                        / np.maximum(np.bincount(near[ring], minlength=n), 1))
            ok = changing >= 0.5
            if still_camera:
                # before a still camera, traffic behind a fence, a window frame or a post leaves the crossing
                # bars as fixed as a logo. But scene structure goes on past the patch: 4-12 px around it the
                # mean frame (where moving things blur away) is edge-dense; a mark over moving content has
                # blur around it. The 0.4 edge share lies between the two (docs/demo.md)
                edges = (gx > 40) | (gy > 40)
                inner = cv2.dilate(lab.astype(np.float32), np.ones((9, 9), np.uint8)).astype(int)
                outer = cv2.dilate(lab.astype(np.float32), np.ones((25, 25), np.uint8)).astype(int)
                band = (inner == 0) & (outer > 0)
                dense = (np.bincount(outer[band], edges[band], n)
                         / np.maximum(np.bincount(outer[band], minlength=n), 1))
                ok &= dense < 0.4
            fixed &= (lab > 0) & ok[lab]
        mask |= fixed
    if not mask.any():
        return mask
    mask = cv2.morphologyEx(cv2.dilate(mask.astype(np.uint8), k5), cv2.MORPH_CLOSE,
                            np.ones((9, 9), np.uint8))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= cfg.overlay_min_area * mask.size]
    return np.isin(lab, keep)


def crop_overlay(box, mask, cfg=CFG):
    """Shrink box (x0, y0, x1, y1) to cut an overlay off the nearest edge (subtitles at the bottom, logos
    in a corner), if enough of the frame remains. Returns (box, overlay_left_inside)."""
    x0, y0, x1, y1 = box
    m = mask[y0:y1, x0:x1]
    if not m.any():
        return box, False
    ys, xs = np.nonzero(m)
    h, w = m.shape
    # cut the top / bottom / left / right band, one more row or column than the mask: the mark's edge is
    # blurred by scaling, and a 1 px line of it would stay in the clip
    options = [(x0, y0 + ys.max() + 2, x1, y1), (x0, y0, x1, y0 + max(0, ys.min() - 1)),
               (x0 + xs.max() + 2, y0, x1, y1), (x0, y0, x0 + max(0, xs.min() - 1), y1)]
    best = max(options, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    if (best[2] - best[0]) * (best[3] - best[1]) >= cfg.min_area_after_crop * w * h:
        return best, False
    return box, True


def quality_score(frames):
    """Technical quality in [0, 1]: a transparent stand-in for DOVER's technical view (paper §3.1).
    Product of exposure (few clipped pixels), contrast (luma spread) and noise (Immerkaer's estimator)."""
    scores = []
    for f in frames:
        g = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32)
        clipped = float(((g < 3) | (g > 252)).mean())
        exposure = 1 - min(1.0, 2 * clipped)
        contrast = min(1.0, g.std() / 16)
        k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
        sigma = np.sqrt(np.pi / 2) * np.abs(cv2.filter2D(g, -1, k)[1:-1, 1:-1]).mean() / 6
        noise = float(np.exp(-max(0.0, sigma - 2) / 10))
        scores.append(exposure * contrast * noise)
    return float(np.mean(scores)) if scores else 0.0

# -----------------------------------------------------------------------------
# embeddings, de-duplication, k-means concept balancing (paper §3.1; a stand-in for its VideoCLIP)

def clip_embedding(frames):
    """Unit vector describing a clip: zero-mean 32x18 grey thumbnails, each averaged over one half of
    the clip (layout and coarse motion; averaging makes it insensitive to a few frames' offset in the
    clip start), and a 4x4x4 RGB histogram (colour). Cheap and honest: it finds copies and re-encodes
    and groups clips by look, not by meaning (--clip: CLIP embeddings, by meaning). Re-encoded
    copies lie well below dedup_max_dist, distinct shots well above it (docs/demo.md)."""
    thumbs = np.stack([cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (32, 18), interpolation=cv2.INTER_AREA)
                       .astype(np.float32).ravel() for f in frames])
    parts = []
    for half in np.array_split(thumbs, 2) if len(thumbs) > 1 else [thumbs]:
        t = half.mean(0) - half.mean()
        parts.append(t / (np.linalg.norm(t) + 1e-6) / np.sqrt(2))
    hist = np.mean([np.sqrt(cv2.calcHist([f], [0, 1, 2], None, [4, 4, 4], [0, 256] * 3).ravel()
                            / f[..., 0].size) for f in frames], 0)    # Hellinger: sqrt of colour frequencies
    e = np.concatenate([0.9 * np.concatenate(parts), np.sqrt(0.19) * hist])
    return e / (np.linalg.norm(e) + 1e-9)


# Elements (float64) of the largest temporary in deduplicate() and kmeans(): 2^22 = 32 MiB. Both compare
# every clip with many others; as whole matrices that would be n x k for k-means, with k = n /
# clips_per_concept growing with n: O(n^2) memory. In chunks, memory grows as n (docs/performance.md).
CHUNK = 1 << 22


def deduplicate(recs, cfg=CFG, chunk=CHUNK):
    """Paper §3.1: near-duplicates (cosine distance < dedup_max_dist) are removed. Best first: the largest
    short side, then clarity, then quality, so of a group of copies the original is kept (not a low-res
    re-upload that happened to be read first). Clips and stills alike. Returns (kept records in their
    input order, [(dropped record, id of the kept one it duplicates)]). Clips of one shot (a long shot cut
    into several, process_video()) are never each other's duplicates: the same scene by design, not a copy.

    Each record in turn is compared with every record kept before it (its nearest one, the first on a tie).
    That is done a block of B = sqrt(chunk) records at a time: their distances to the kept records in
    chunks of chunk / B (matrix products, not one vector at a time), then one by one inside the block
    against the block's own kept ones. The same decisions as one at a time (tested), unless a distance
    lies within rounding (~1e-13) of the threshold or of another kept record's. Peak memory: the
    embeddings as one (n, d) float64 array plus ~4 x 8 x chunk bytes of blocks."""
    name = lambda r: r.get("image") or r["clip"]
    key = lambda i: (-min(recs[i]["width"], recs[i]["height"]), -recs[i]["clarity"], -recs[i]["quality"],
                     name(recs[i]))
    if not recs:
        return [], []
    order = sorted(range(len(recs)), key=key)
    e = np.array([recs[i]["embedding"] for i in order], np.float64).reshape(len(recs), -1)   # best first
    groups = {}                                  # one per shot; a record without "shot" (older) is its own
    group = np.array([groups.setdefault((recs[i]["video"], *recs[i]["shot"]) if "shot" in recs[i]
                                        else (i,), len(groups)) for i in order])
    B = max(1, int(np.sqrt(chunk)))
    C = max(1, chunk // B)
    kept, dup_of = [], {}                        # positions in `order`; dropped position -> kept position
    for a in range(0, len(e), B):
        blk = e[a:a + B]
        near_d, near_j = np.full(len(blk), np.inf), np.zeros(len(blk), int)
        for c in range(0, len(kept), C):       # the nearest record kept before this block
            ids = np.array(kept[c:c + C])
            d = 1 - blk @ e[ids].T
            d[group[a:a + B, None] == group[ids][None]] = np.inf
            j = d.argmin(1)
            dj = d[np.arange(len(blk)), j]
            closer = dj < near_d                # strict: on a tie the earlier kept record stays the nearest
            near_d[closer], near_j[closer] = dj[closer], ids[j[closer]]
        inner, new = 1 - blk @ blk.T, []         # then the block's own records, in order
        inner[group[a:a + B, None] == group[None, a:a + B]] = np.inf
        for t in range(len(blk)):
            dt, jt = near_d[t], near_j[t]
            if new:
                m = int(np.argmin(inner[t, new]))
                if inner[t, new[m]] < dt:
                    dt, jt = inner[t, new[m]], a + new[m]
            if dt < cfg.dedup_max_dist:
                dup_of[a + t] = int(jt)
            else:
                new.append(t)
        kept += [a + t for t in new]
    dropped = [(recs[order[p]], name(recs[order[q]])) for p, q in dup_of.items()]
    return [recs[i] for i in sorted(order[p] for p in kept)], dropped


def kmeans(x, k, iters=30, seed=0, chunk=CHUNK):
    """k-means with k-means++ seeding (numpy). Returns (centroids (k, d), labels (n,)).
    Each assignment step finds every point's nearest centroid `chunk` distances at a time (rows of
    chunk // k points), never the whole (n, k) matrix. The labels are those of the whole matrix (tested)
    unless a point lies within rounding (~1e-13) of two centroids: a matrix product rounds differently
    for other block shapes. Peak memory: x itself (n x d float64), ~3 x 8 x chunk bytes of distance
    rows, the centroids and their sums (k x d each): the work grows as n x k, the memory as (n + k) x d."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    k = max(1, min(k, len(x)))
    rows = max(1, chunk // max(1, x.shape[1]))   # squared norms, without an (n, d) temporary
    xx = np.concatenate([(x[a:a + rows] * x[a:a + rows]).sum(1) for a in range(0, len(x), rows)])

    def sqdist(c, a=0, b=None):  # squared distances of x[a:b] to the centres c, no (n, k, d) temporary
        # (2 * (x @ c.T), not (2 * x) @ c.T: the same numbers, as doubling is exact, without an (n, d) copy)
        return np.maximum(xx[a:b, None] - 2 * (x[a:b] @ c.T) + (c * c).sum(1)[None], 0)

    def nearest(c):
        rows = max(1, chunk // len(c))
        return np.concatenate([sqdist(c, a, a + rows).argmin(1) for a in range(0, len(x), rows)])
    c = [x[rng.integers(len(x))]]
    d2 = sqdist(np.array(c))[:, 0]
    for _ in range(1, k):    # k-means++: next centre drawn with probability ~ squared distance to nearest
        c.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
        d2 = np.minimum(d2, sqdist(c[-1][None])[:, 0])
    c = np.array(c)
    for _ in range(iters):
        lab = nearest(c)
        counts = np.bincount(lab, minlength=k)[:, None]
        sums = np.zeros_like(c)
        np.add.at(sums, lab, x)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)   # an empty cluster keeps its centre
        if np.allclose(new, c):
            break
        c = new
    return c, nearest(c)


def balance_weights(labels):
    """Resampling weight per clip, inverse to its concept's cluster size in `labels`, mean 1: every concept
    of that set is drawn equally often (the paper balances concepts with k-means but does not give the
    rule). finalize() makes them per set: the whole manifest, each tier set, the fine-tune set."""
    labels = np.asarray(labels)
    sizes = np.bincount(labels)[labels].astype(np.float64)
    w = 1 / sizes
    return w * len(w) / w.sum()

# -----------------------------------------------------------------------------
# structured captions (paper §3.2): from a sidecar file here, from LLaVA with --captioner (caption_clips()),
# never invented

def load_sidecar(video_path):
    """name.json ({"shots": [{"start", "end", "caption": {...}}]} or one caption dict for the whole
    video) or name.txt (plain text = the short description), else None. A sidecar that cannot be read as
    either raises ValueError naming the file and what is wrong with it (its video's clips would otherwise
    go out with no caption, or none at all)."""
    stem = os.path.splitext(video_path)[0]
    if os.path.exists(stem + ".json"):
        name = os.path.basename(stem) + ".json"
        try:
            with open(stem + ".json", encoding="utf-8") as f:
                side = json.load(f)
        except UnicodeDecodeError:
            raise ValueError(f"{name} is not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") \
                from None
        if not isinstance(side, dict):
            raise ValueError(f"{name} holds a JSON {type(side).__name__}, not an object with \"shots\" "
                             f"or caption fields ({', '.join(CAPTION_FIELDS[:2])}, ...)")
        if "shots" not in side:
            if not any(isinstance(side.get(k), str) and side[k].strip() for k in CAPTION_FIELDS):
                raise ValueError(f"{name} has neither \"shots\" nor a caption field "
                                 f"({', '.join(CAPTION_FIELDS)})")
            return {"shots": [{"start": 0, "end": 1 << 62, "caption": side}]}
        shots = side["shots"]
        for i, s in enumerate(shots if isinstance(shots, list) else [None]):
            ok = (isinstance(s, dict) and isinstance(s.get("caption") or {}, dict)
                  and all(type(s.get(k)) in (int, float) for k in ("start", "end")))
            if not ok:
                raise ValueError(f"{name}: \"shots\" must be a list of {{\"start\": frame, \"end\": frame, "
                                 f"\"caption\": {{...}}}} (entry {i} is not)")
        return side
    if os.path.exists(stem + ".txt"):
        try:
            with open(stem + ".txt", encoding="utf-8") as f:
                text = f.read().strip()
        except UnicodeDecodeError:
            raise ValueError(f"{os.path.basename(stem)}.txt is not UTF-8 text") from None
        if not text:
            return None
        return {"shots": [{"start": 0, "end": 1 << 62, "caption": {"short_description": text}}]}
    return None


def caption_for(side, start, end):
    """The sidecar caption of the shot overlapping [start, end) most, else None."""
    if side and side["shots"]:
        best = max(side["shots"], key=lambda s: min(end, s["end"]) - max(start, s["start"]))
        if min(end, best["end"]) - max(start, best["start"]) > 0 and best.get("caption"):
            cap = {k: v for k, v in best["caption"].items() if k in CAPTION_FIELDS + ("camera_movement",)}
            if any(k in cap for k in CAPTION_FIELDS):   # (tags alone are no caption)
                return cap
    return None


def caption_tags(cap, rec, cfg=CFG):
    """Paper §3.2: a structured caption with our labels merged in: the camera movement when confident (a
    still has none), the source (the input's top folder) and quality tags from the record's own scores."""
    cap = dict(cap)
    if "image" in rec:
        cap.pop("camera_movement", None)
    elif "camera_movement" not in cap and rec["camera_conf"] >= cfg.cam_min_conf:
        cap["camera_movement"] = rec["camera"]    # paper §3.2: only confident labels enter captions
    cap["source_tags"] = [rec["video"].split(os.sep)[0] if os.sep in rec["video"] else "raw"]
    cap["quality_tags"] = quality_tags(rec, cfg)
    return cap

# -----------------------------------------------------------------------------
# hierarchical tiers (paper §3.1, Fig. 4)

def clarity_sides(rec, sides, cfg=CFG):
    """The sides above clarity_side a record reaches: those it gets a clarity_at value for."""
    return [s for s in sides if cfg.clarity_side < s <= min(rec["width"], rec["height"])]


def clarity_at(rec, side, cfg=CFG):
    """A record's clarity at the short side of a tier it reaches (see tier_clarity). A record an earlier
    curate.py wrote has no clarity_at: its 256p clarity stands in (finalize() warns)."""
    if side <= cfg.clarity_side:
        return rec["clarity"]
    return rec.get("clarity_at", {}).get(str(side), rec["clarity"])


def tiers_of(rec, cfg=CFG):
    """Names of the video tiers a clip belongs to: a prefix of cfg.tier_names, so tiers are nested."""
    out = []
    for i, name in enumerate(cfg.tier_names):
        ok = (min(rec["width"], rec["height"]) >= cfg.tier_side[i] and rec["frames"] >= cfg.tier_frames[i]
              and clarity_at(rec, cfg.tier_side[i], cfg) >= cfg.tier_clarity[i]
              and rec["quality"] >= cfg.tier_quality[i] and not rec["overlay"])
        if not ok:
            break
        out.append(name)
    return out


def image_sets_of(rec, cfg=CFG):
    """Image sets (T2I stage 1, stage 2) a still frame belongs to; nested like the video tiers."""
    out = []
    for side, cl, q in zip(cfg.image_side, cfg.image_clarity, cfg.image_quality):
        if (min(rec["width"], rec["height"]) < side or clarity_at(rec, side, cfg) < cl or rec["quality"] < q
                or rec["overlay"]):
            break
        out.append(f"{side}p")
    return out

# -----------------------------------------------------------------------------
# one raw video -> clips, images, rejections

def video_id(rel):
    """Stable, filesystem-safe id for an input path (relative to the input folder)."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.splitext(rel)[0])[-60:]
    return f"{stem}_{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def quality_tags(rec, cfg=CFG):
    """Paper §3.2: quality tags from metadata and scores, appended to the structured caption."""
    side = min(rec["width"], rec["height"])
    res = [n for n, s in zip(cfg.tier_names, cfg.tier_side) if side >= s]
    return ([res[-1]] if res else [f"{side}p"]) + \
        ["sharp" if rec["clarity"] >= cfg.sharp_tag_clarity else "soft"] + \
        ["high quality" if rec["quality"] >= cfg.tier_quality[-1] else "fair quality"]


def _analyse_shot(small, grey, hires, p, e, shot, fps, cfg):
    """One clip of a shot, from the frames read from p on (small RGB frames analysis_w wide, grey frames at
    clarity_side, and at the largest tier side above it that the video reaches, if any); e: where the shot's
    frames end (its end, or the last frame a truncated file decodes).
    The clip starts at the sharpest of the first sharp_search frames (paper §3.1) and runs for up to
    max_clip_frames, 4n+1 frames; process_video() cuts the rest of a long shot into more clips."""
    n = e - p
    # paper §3.1: start on a clear frame. These frames share one size and, but in a fade, one exposure (what
    # clarity() normalises), so the search reads the raw Laplacian variance, at the finest scale, where
    # neighbouring frames differ most (a frame's own motion blur, a better-coded keyframe); in a fade it
    # prefers the brighter, clearer frames. Every 4th frame after the search also competes for the still.
    lap = [float(cv2.meanStdDev(cv2.Laplacian(g, cv2.CV_32F))[1][0, 0] ** 2)
           if i < cfg.sharp_search or i % 4 == 0 else -1.0 for i, g in enumerate(grey)]
    search = (max(1, min(cfg.sharp_search, n - cfg.min_clip_frames + 1)) if n >= cfg.min_clip_frames
              else len(grey))
    j = int(np.argmax(lap[:search]))
    L = min(n - j, cfg.max_clip_frames, len(small) - j)
    L = max(1, (L - 1) // 4 * 4 + 1)       # 4n+1 frames: the VAE's causal first frame + groups of 4
    clip = small[j:j + L]
    sample = [clip[i] for i in np.linspace(0, L - 1, min(L, 16)).round().astype(int)]
    box = letterbox(sample, cfg)
    crop = [f[box[1]:box[3], box[0]:box[2]] for f in clip]
    flows = pair_flows(crop, cfg, fps)
    cam, conf = camera_movement(crop, cfg, flows) if L > 1 else ("static shot", 0.0)
    best = int(np.argmax(lap))
    return {"start": p + j, "end": p + j + L, "shot": shot, "first": p == shot[0], "box": box,
            "sample": sample, "mid": small[len(small) // 2],
            "motion": motion(crop, cfg, flows) if L > 1 else 0.0,
            "camera": cam, "camera_conf": conf, "grey": grey[j:j + L:8],   # clarity: the median of every 8th
            "hires": hires[j:j + L:8], "best": p + best, "best_grey": grey[best],
            "best_hires": hires[best] if hires else None, "best_small": small[best]}


def process_video(path, rel, out_dir, cfg=CFG):
    """Everything for one input file. Returns {"clips", "images", "rejected"} record lists; the clip and
    image files are already written (temp + rename) under out_dir/clips/<id>/ and out_dir/images/<id>/.
    Also "retry": True where the fault is one the user fixes (a bad caption sidecar: redone on the next
    run), "note": what the run should say about it (a frame rate assumed)."""
    def reject(reason, **kw):
        return {"path": rel, "reason": reason, **kw}
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTS:
        return process_photo(path, rel, out_dir, cfg)
    if ext not in VIDEO_EXTS:
        why = f"not a video file ({ext or 'no extension'})"
        return {"clips": [], "images": [], "rejected": [reject(why)]}
    vid = video_id(rel)
    try:   # first: a broken sidecar fails fast; the video is redone on the next run once it is fixed
        side = load_sidecar(path)
    except (ValueError, OSError) as e:
        why = f"bad caption sidecar: {e}: fix or remove it, then re-run (this video is redone)"
        return {"clips": [], "images": [], "rejected": [reject(why)], "retry": True}
    try:
        W, H, fps, raw_fps = probe(path, raw_fps=True)
        if min(W, H) < 16:
            raise ValueError(f"too small: {W}x{H} px (a clip needs a short side of 16 px at least; the "
                             f"smallest tier, {cfg.tier_names[0]}, needs {cfg.tier_side[0]})")
        if max(W, H) > cfg.max_aspect * min(W, H):
            raise ValueError(f"extreme aspect ratio: {W}x{H} px, over {cfg.max_aspect:g}:1 (crop the picture "
                             f"out of it first)")
        shots = detect_shots(path, cfg)
    except (ValueError, cv2.error, OSError) as e:
        why = str(e) if str(e).startswith(("too small", "extreme aspect")) else f"unreadable: {e}"
        return {"clips": [], "images": [], "rejected": [reject(why)]}
    # the frame rate: a file that gives none (0) or an absurd one is timed as 24 fps, and says so
    fps_note = {} if fps == raw_fps else {"fps_assumed": True}
    n_frames = shots[-1][1] if shots else 0
    if n_frames < cfg.min_clip_frames:
        why = f"too short: {n_frames} frames in the whole file"
        return {"clips": [], "images": [], "rejected": [reject(why)]}

    # pass 2: each shot's clips, small frames for motion/camera, grey at clarity_side for sharpness. A clip's
    # window is the sharp search plus max_clip_frames; the frames after its clip start the next window,
    # while the rest of the shot is a clip's length (min_clip_frames): a long shot becomes several clips,
    # back to back, each from a clear frame (paper §3.1), none longer than the longest training clip (§4).
    aw = cfg.analysis_w
    ah = max(2, int(round(H * aw / W / 2)) * 2)
    cs = min(1.0, cfg.clarity_side / min(W, H))
    gsize = (max(2, round(W * cs)), max(2, round(H * cs)))   # as clarity() shrinks a whole frame
    # and grey frames at the largest tier side above clarity_side the video reaches, for the clarity at each
    # such tier's side (clarity_at; none for a video of 256p..359p, the demo's). For a 1080p video a
    # window holds 141 grey frames of 1280x720 bytes: 130 MB.
    top = max(clarity_sides({"width": W, "height": H}, cfg.tier_side + cfg.image_side, cfg), default=0)
    hs = top / min(W, H)
    hsize = (round(W * hs), round(H * hs))
    window = cfg.sharp_search + cfg.max_clip_frames
    shot_data, small, grey, hires = [], [], [], []
    k, p = 0, shots[0][0]                            # the shot being read; its next window's first frame
    cap = cv2.VideoCapture(path)
    for i in range(n_frames):
        if i < p:                                    # between windows: the end of a shot too short for a clip
            if not cap.grab():
                break
            continue
        ok, f = cap.read()
        if not ok:
            break
        small.append(cv2.cvtColor(cv2.resize(f, (aw, ah), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
        g = cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
        grey.append(cv2.resize(g, gsize, interpolation=cv2.INTER_AREA))
        if hs:
            hires.append(g if hs == 1 else cv2.resize(g, hsize, interpolation=cv2.INTER_AREA))
        s, e = shots[k]
        while small and len(small) >= min(e - p, window):
            sd = _analyse_shot(small, grey, hires, p, e, (s, e), fps, cfg)
            shot_data.append(sd)
            q = sd["end"] - p
            small, grey, hires, p = small[q:], grey[q:], hires[q:], sd["end"]
            if e - p < cfg.min_clip_frames:           # the rest is no clip: on to the next shot
                small, grey, hires = [], [], []
                k += 1
                p = shots[k][0] if k < len(shots) else n_frames
    cap.release()
    if small and (p == shots[k][0] or len(small) >= cfg.min_clip_frames):   # a truncated file: what was read
        e = p + len(small)
        shot_data.append(_analyse_shot(small, grey, hires, p, e, (shots[k][0], e), fps, cfg))

    # decide each clip
    fx, fy = W / aw, H / ah
    clips, images, rejected, writes = [], [], [], []
    for k, sd in enumerate(shot_data):
        bx0, by0, bx1, by1 = sd["box"]
        # one frame from each other shot (the clips of one shot show the same scene: not a second look)
        others = [o["mid"][by0:by1, bx0:bx1] for o in shot_data if o["first"] and o["shot"] != sd["shot"]]
        inner = static_overlay([f[by0:by1, bx0:bx1] for f in sd["sample"]], others, cfg,
                               still_camera=sd["camera"] == "static shot")
        mask = np.zeros(sd["sample"][0].shape[:2], bool)
        mask[by0:by1, bx0:bx1] = inner
        box, overlay = crop_overlay(sd["box"], mask, cfg)
        x0, y0, x1, y1 = box
        full = full_box(box, fx, fy, W, H)
        gb = [int(v * cs) for v in full]                 # the same box on the clarity-size grey frames...
        hb = [int(v * hs) for v in full]                 # ...and on the tier-size ones
        size = {"width": full[2] - full[0], "height": full[3] - full[1]}
        at = {str(s_): round(float(np.median([clarity(h[hb[1]:hb[3], hb[0]:hb[2]], cfg, min(hsize), s_)
                                              for h in sd["hires"]])), 2)
              for s_ in clarity_sides(size, cfg.tier_side, cfg)}
        crop = [f[y0:y1, x0:x1] for f in sd["sample"]]
        rec = {"clip": f"{vid}_{k:03d}", "video": rel, "shot": list(sd["shot"]), "start": sd["start"],
               "end": sd["end"], "frames": sd["end"] - sd["start"], "fps": round(fps, 3), **fps_note,
               **size,
               "crop": full,
               "clarity": round(float(np.median([clarity(g[gb[1]:gb[3], gb[0]:gb[2]], cfg, min(gsize))
                                                 for g in sd["grey"]])), 2),
               **({"clarity_at": at} if at else {}),
               "motion": round(sd["motion"], 3), "quality": round(quality_score(crop), 3),
               "camera": sd["camera"], "camera_conf": sd["camera_conf"], "overlay": bool(overlay)}
        shot_len = sd["shot"][1] - sd["shot"][0]
        why = []
        if shot_len < cfg.min_clip_frames:
            why.append(f"too short ({shot_len} < {cfg.min_clip_frames} frames)")
        if rec["clarity"] < cfg.min_clarity:
            why.append(f"blurry (clarity {rec['clarity']:.1f} < {cfg.min_clarity})")
        if rec["motion"] < cfg.min_motion:
            why.append(f"static (motion {rec['motion']:.2f} < {cfg.min_motion})")
        if rec["motion"] > cfg.max_motion:
            why.append(f"too fast (motion {rec['motion']:.1f} > {cfg.max_motion})")
        if min(rec["width"], rec["height"]) < 16:
            why.append("nothing but border")
        if rec["quality"] < cfg.min_quality:
            why.append(f"low quality ({rec['quality']:.2f} < {cfg.min_quality})")
        if rec["overlay"]:   # paper §3.1: watermarks, logos and borders are removed; here cropping failed
            why.append("overlay inside the picture (watermark, logo or text that cannot be cropped off)")
        cap_ = caption_for(side, rec["start"], rec["end"])
        if cap_ is not None:
            cap_ = caption_tags(cap_, rec, cfg)
        rec["caption"] = cap_
        # image candidate, one per shot (from its first clip's window): the sharpest frame, video filters
        # minus the motion ones (§3.1)
        if sd["first"]:
            bg = sd["best_grey"][gb[1]:gb[3], gb[0]:gb[2]]
            img = {**{k_: rec[k_]
                      for k_ in ("video", "width", "height", "crop", "quality", "overlay", "caption")},
                   "image": f"{rec['clip']}_img", "clip": rec["clip"], "frame": sd["best"],
                   "clarity": round(clarity(bg, cfg, min(gsize)), 2)}
            bh = sd["best_hires"][hb[1]:hb[3], hb[0]:hb[2]] if hs else None
            at = {str(s_): round(clarity(bh, cfg, min(hsize), s_), 2)
                  for s_ in clarity_sides(size, cfg.image_side, cfg)}
            if at:
                img["clarity_at"] = at
            if cap_ is not None:
                img["caption"] = caption_tags(cap_, img, cfg)
            if (img["clarity"] >= cfg.min_clarity and img["quality"] >= cfg.min_quality and not img["overlay"]
                    and min(img["width"], img["height"]) >= 16):
                img["path"] = f"images/{vid}/{img['image']}.jpg"
                img["embedding"] = [round(float(v), 4)
                                    for v in clip_embedding([sd["best_small"][y0:y1, x0:x1]])]
                images.append(img)
                writes.append(("image", sd["best"], sd["best"] + 1, full, img["path"]))
        if why:
            rejected.append(reject("; ".join(why), clip=rec["clip"], start=rec["start"], end=rec["end"]))
            continue
        rec["path"] = f"clips/{vid}/{rec['clip']}.mp4"
        rec["embedding"] = [round(float(v), 4) for v in clip_embedding(crop)]
        clips.append(rec)
        writes.append(("clip", rec["start"], rec["end"], full, rec["path"]))

    # pass 3: write clips and images at full resolution, each to a temp file renamed when complete
    if writes:
        write_segments(path, writes, out_dir, fps)
    res = {"clips": clips, "images": images, "rejected": rejected}
    if fps_note and (clips or images):
        res["note"] = f"the file gives {raw_fps:g} fps (outside 1-240): its clips are timed as 24 fps"
    return res


def full_box(box, fx, fy, W, H):
    """A box on the analysis frames scaled to the W x H input: even sizes for the encoder."""
    x0, y0, x1, y1 = box
    full = [int(x0 * fx) // 2 * 2, int(y0 * fy) // 2 * 2, int(np.ceil(x1 * fx)) // 2 * 2,
            int(np.ceil(y1 * fy)) // 2 * 2]
    return [full[0], full[1], min(full[2], W), min(full[3], H)]


def write_still(dst, bgr):
    """A jpg written to a temp file renamed when complete: a kill never leaves half a still."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    cv2.imwrite(dst + f".{os.getpid()}.tmp.jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    os.replace(dst + f".{os.getpid()}.tmp.jpg", dst)


def process_photo(path, rel, out_dir, cfg=CFG):
    """One photo as an image-text pair (paper §3.1 builds its image sets from a pool of them): its sidecar
    caption, the stills' letterbox crop and filters (no overlay test: it needs the picture to change
    around a fixed mark), an embedding, the crop written to images/<id>/<id>.jpg. Returns process_video()'s
    dict; "retry" where a caption is missing or broken, so that the photo is redone once one is added."""
    from PIL import Image, ImageOps

    def reject(reason, **kw):
        return {"clips": [], "images": [], "rejected": [{"path": rel, "reason": reason}], **kw}
    name, vid = os.path.splitext(os.path.basename(rel))[0], video_id(rel)
    try:
        cap = caption_for(load_sidecar(path), 0, 1)
    except (ValueError, OSError) as e:
        return reject(f"bad caption sidecar: {e}: fix or remove it, then re-run (this photo is redone)",
                      retry=True)
    if cap is None:      # train.py trains only captioned items: an uncaptioned photo would be dead weight
        return reject(f"no caption: add {name}.txt (a short description) or {name}.json (caption fields) "
                      "beside it, then re-run (this photo is redone)", retry=True)
    try:   # PIL, not cv2.imread: cv2 decodes a truncated file with grey filler and no error
        with Image.open(path) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))   # upright, as a camera meant it
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return reject(_one_line(f"unreadable: {type(e).__name__}: {e}"))
    H, W = rgb.shape[:2]
    if min(W, H) < 16 or max(W, H) > cfg.max_aspect * min(W, H):
        return reject(f"too small or extreme aspect ratio: {W}x{H} px")
    # letterbox and quality on an analysis_w frame, as for video stills: the same units
    aw = cfg.analysis_w
    small = cv2.resize(rgb, (aw, max(2, int(round(H * aw / W / 2)) * 2)), interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = letterbox([small], cfg)
    full = full_box((x0, y0, x1, y1), W / aw, H / small.shape[0], W, H)
    crop = rgb[full[1]:full[3], full[0]:full[2]]
    g = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    img = {"image": vid, "video": rel, "width": crop.shape[1], "height": crop.shape[0], "crop": full,
           "clarity": round(clarity(g, cfg, min(W, H)), 2),
           "quality": round(quality_score([small[y0:y1, x0:x1]]), 3), "overlay": False}
    at = {str(s): round(clarity(g, cfg, min(W, H), s), 2) for s in clarity_sides(img, cfg.image_side, cfg)}
    if at:
        img["clarity_at"] = at
    img["caption"] = caption_tags(cap, img, cfg)
    why = []
    if img["clarity"] < cfg.min_clarity:
        why.append(f"blurry (clarity {img['clarity']:.1f} < {cfg.min_clarity})")
    if min(img["width"], img["height"]) < 16:
        why.append("nothing but border")
    if img["quality"] < cfg.min_quality:
        why.append(f"low quality ({img['quality']:.2f} < {cfg.min_quality})")
    if why:
        return reject("; ".join(why))
    img["path"] = f"images/{vid}/{vid}.jpg"
    img["embedding"] = [round(float(v), 4) for v in clip_embedding([small[y0:y1, x0:x1]])]
    write_still(os.path.join(out_dir, img["path"]), np.ascontiguousarray(crop[..., ::-1]))
    return {"clips": [], "images": [img], "rejected": []}


def write_segments(path, writes, out_dir, fps):
    """Copy frame ranges [a, b) of `path`, cropped to box, to mp4 clips or jpg stills (one decode pass)."""
    todo = sorted(writes, key=lambda w: w[1])
    open_w = {}
    cap = cv2.VideoCapture(path)
    last = max(w[2] for w in todo)
    for i in range(last):
        starting = [w for w in todo if w[1] == i]
        active = [w for w in todo if w[1] <= i < w[2]]
        if not active:
            cap.grab()
            continue
        ok, f = cap.read()
        if not ok:
            break
        if _orphaned():
            os._exit(1)
        for w in active:
            kind, a, b, (x0, y0, x1, y1), rel = w
            dst = os.path.join(out_dir, rel)
            crop = np.ascontiguousarray(f[y0:y1, x0:x1])
            if kind == "image":
                write_still(dst, crop)
                continue
            if w in starting:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                open_w[rel] = cv2.VideoWriter(dst + f".{os.getpid()}.tmp.mp4",
                                              cv2.VideoWriter_fourcc(*"mp4v"), fps, (x1 - x0, y1 - y0))
            open_w[rel].write(crop)
            if i == b - 1:
                open_w.pop(rel).release()
                os.replace(dst + f".{os.getpid()}.tmp.mp4", dst)
    cap.release()
    for rel, vw in open_w.items():          # a truncated file ended inside a clip: keep what was read
        vw.release()
        os.replace(os.path.join(out_dir, rel) + f".{os.getpid()}.tmp.mp4", os.path.join(out_dir, rel))

# -----------------------------------------------------------------------------
# the open models (--clip, --aesthetic, --captioner), over the written clips: CLIP ViT-L/14 for the paper's
# VideoCLIP embeddings, the LAION improved aesthetic predictor for its aesthetic scores, LLaVA for its VLM
# captioner (paper §3.1, §3.2). They run in the main process after the per-video pass (one model on one GPU,
# not one per worker), on frames read back from the clip files. Each record names the model behind each of
# its values (embedding_model, quality_model, caption_model): a re-run does only what is missing, and
# model_units() never lets finalize() compare values of different models.

KEY_FRAMES = 4          # frames a clip's CLIP embedding averages: the centres of four equal parts of the clip
MODEL_BATCH = 16        # clips per CLIP forward pass
CAPTION_TOKENS = 400    # room for the seven fields, a few sentences of dense description among them
# paper §3.2's structured caption, asked for as JSON with the sidecar files' field names (CAPTION_FIELDS),
# of one frame (the clip's middle): the paper's dense description also tells scene changes and camera moves,
# which one frame cannot show; the camera's comes from camera_movement() instead
CAPTION_PROMPT = (
    "Describe this frame of a video for a text-to-video training set. Answer with one JSON object with "
    "these keys, each a string: \"short_description\" (one sentence: the main subject and what it does), "
    "\"dense_description\" (three to five sentences: subjects, actions, scene and composition), "
    "\"background\" (the setting behind the subject), \"style\" (e.g. documentary, cinematic, animation, "
    "vlog), \"shot_type\" (e.g. close-up, medium shot, wide shot, aerial shot), \"lighting\" (e.g. natural "
    "daylight, low-key, neon), \"atmosphere\" (the mood, e.g. calm, tense, festive).")
CAPTION_RETRY = CAPTION_PROMPT + (
    " Reply with the JSON object only: it starts with { and ends with }, all seven keys, double-quoted "
    "strings, no other text.")
# The improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor, released as
# sac+logos+ava1-l14-linearMSE.pth): an nn.Sequential of Linear 768-1024, Dropout, Linear 1024-128, Dropout,
# Linear 128-64, Dropout, Linear 64-16, Linear 16-1, no activations. Its Linear layers' state-dict names:
AESTHETIC_LAYERS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
AESTHETIC_DIMS = (768, 1024, 128, 64, 16, 1)


def model_name(path):
    """How records name a model: its folder or file name and a hash of its config.json (or of the file), so
    results of two different models never pass for each other."""
    path = os.path.normpath(path)
    with open(os.path.join(path, "config.json") if os.path.isdir(path) else path, "rb") as f:
        return f"{os.path.basename(path)}@{hashlib.sha1(f.read()).hexdigest()[:8]}"


def model_units(recs, cfg=CFG):
    """cfg with the thresholds in the units of these records' values: CLIP cosine distance for embeddings
    CLIP made, aesthetic scores where the aesthetic predictor gave the quality. Values of different models
    have no common unit: records that mix them are a one-line error, not a silent mix."""
    made = {}
    for field in ("embedding_model", "quality_model"):
        made[field] = collections.Counter(r.get(field, "stand-in") for r in recs if "embedding" in r)
        if len(made[field]) > 1:
            mix = ", ".join(f"{n} by {m}" for m, n in made[field].items())
            raise SystemExit(f"curate.py: error: the records' {field} values come from different models "
                             f"({mix}): run curate.py again with the models this folder was curated with "
                             "(--clip, --aesthetic), or curate into a fresh --output folder")
    if made["embedding_model"] and "stand-in" not in made["embedding_model"]:
        cfg = replace(cfg, dedup_max_dist=cfg.clip_dedup_max_dist)
    if made["quality_model"] and "stand-in" not in made["quality_model"]:
        cfg = replace(cfg, min_quality=cfg.min_aesthetic, tier_quality=cfg.tier_aesthetic,
                      image_quality=cfg.image_aesthetic, finetune_quality=cfg.finetune_aesthetic)
    return cfg


def key_frames(rec, out, n):
    """RGB frames of a written clip, at the centres of n equal parts of it, or the still itself."""
    path = os.path.join(out, rec["path"])
    if "image" in rec:
        f = cv2.imread(path)
        frames = [] if f is None else [cv2.cvtColor(f, cv2.COLOR_BGR2RGB)]
    else:
        want = set(((np.arange(n) + 0.5) * rec["frames"] / n).astype(int).tolist())
        cap, frames = cv2.VideoCapture(path), []
        for i in range(max(want) + 1):
            ok, f = cap.read()
            if not ok:
                break
            if i in want:
                frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
        cap.release()
    if not frames:
        raise ValueError(f"unreadable file {rec['path']}")
    return frames


def load_aesthetic(path):
    """The aesthetic predictor's Linear layers as float64 (weight, bias) pairs, from its released .pth (read
    with weights_only=True: loading runs no code from the file) or a .safetensors copy of it."""
    import torch
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--aesthetic {path}: not a readable state dict ({type(e).__name__}); download "
                         "sac+logos+ava1-l14-linearMSE.pth again") from None
    want = {}
    for k, i, o in zip(AESTHETIC_LAYERS, AESTHETIC_DIMS, AESTHETIC_DIMS[1:]):
        want[k + ".weight"], want[k + ".bias"] = (o, i), (o,)
    got = {k: tuple(v.shape) for k, v in sd.items()} if isinstance(sd, dict) else {}
    if got != want:
        bad = sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))
        raise ValueError(f"--aesthetic {path}: not the improved aesthetic predictor's state dict (missing, "
                         f"unexpected or misshapen: {', '.join(bad[:4])}); use "
                         "sac+logos+ava1-l14-linearMSE.pth")
    return [(sd[k + ".weight"].double(), sd[k + ".bias"].double()) for k in AESTHETIC_LAYERS]


def aesthetic_scores(layers, e):
    """Aesthetic scores (~1-10) of unit CLIP ViT-L/14 image embeddings e (N, 768). Dropout is the identity
    at inference, so the predictor is its Linear layers applied in turn."""
    import torch
    x = torch.as_tensor(np.asarray(e), dtype=torch.float64)
    for w, b in layers:
        x = x @ w.T + b
    return x[:, 0].numpy()


def embed_clips(out, recs, clip, aesthetic=None):
    """--clip: each record's embedding becomes the normalised mean of the unit CLIP embeddings of its key
    frames (a clip's KEY_FRAMES, a still itself); with --aesthetic its quality becomes the mean aesthetic
    score of those frames (the predictor was fitted on single images). The stand-in's score stays as
    "technical": its lenient basic filter has run in the per-video pass, as DOVER's technical view, which
    the aesthetic predictor does not judge (exposure, noise). Returns [(record, why)] for records whose
    file cannot be read."""
    import torch
    import text_encoder as te
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp16 on a GPU, as OpenAI's clip.load runs it: the embeddings the aesthetic predictor was fitted on
    dtype = torch.float16 if device == "cuda" else torch.float32
    enc = te.CLIPVisionEncoder.from_pretrained(clip, dtype=dtype, device=device)
    layers = load_aesthetic(aesthetic) if aesthetic else None
    cname, aname = model_name(clip), aesthetic and model_name(aesthetic)
    failed = []
    bar = tqdm(total=len(recs), unit="clip", desc="clip embeddings" + (" + aesthetics" if aesthetic else ""),
               dynamic_ncols=True)
    for a in range(0, len(recs), MODEL_BATCH):
        done, frames = [], []
        for r in recs[a:a + MODEL_BATCH]:
            try:
                f = key_frames(r, out, KEY_FRAMES)
            except ValueError as e:
                failed.append((r, str(e)))
                continue
            done.append((r, len(f)))
            frames += f
        if frames:
            with torch.no_grad():
                e = enc(te.clip_image_preprocess(frames, enc.image_size).to(device, dtype)).double().cpu()
            e = (e / e.norm(dim=-1, keepdim=True)).numpy()
            s = aesthetic_scores(layers, e) if layers is not None else None
        i = 0
        for r, n in done:
            m, i = e[i:i + n].mean(0), i + n
            r["embedding"] = [round(float(v), 4) for v in m / np.linalg.norm(m)]
            r["embedding_model"] = cname
            if s is not None:
                r.setdefault("technical", r["quality"])
                r["quality"] = round(float(s[i - n:i].mean()), 3)
                r["quality_model"] = aname
        bar.update(min(MODEL_BATCH, len(recs) - a))
    bar.close()
    return failed


def parse_caption(text):
    """The structured fields in a model's answer: the JSON object in it (code fences or words around it
    ignored), every field of CAPTION_FIELDS a non-empty string. Returns (fields, None) or (None, why)."""
    a, b = text.find("{"), text.rfind("}")
    if a < 0 or b < a:
        return None, "no JSON object in the answer"
    try:
        obj = json.loads(text[a:b + 1])
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg})"
    if not isinstance(obj, dict):
        return None, "the JSON is not an object"
    missing = [k for k in CAPTION_FIELDS if not isinstance(obj.get(k), str) or not obj[k].strip()]
    if missing:
        return None, "missing or empty: " + ", ".join(missing)
    return {k: " ".join(obj[k].split()) for k in CAPTION_FIELDS}, None


def caption_frame(llava, frame):
    """(fields, tries, why): LLaVA's answer to CAPTION_PROMPT on one frame, asked once more with the stricter
    CAPTION_RETRY when it is not the JSON asked for; fields is None (and why says why) after two misses."""
    why = None
    for tries, prompt in enumerate((CAPTION_PROMPT, CAPTION_RETRY), 1):
        fields, why = parse_caption(llava.chat(prompt, frame, max_new_tokens=CAPTION_TOKENS))
        if fields:
            return fields, tries, None
    return None, 2, why


def caption_clips(out, manifest, images, captioner, cfg=CFG):
    """--captioner: LLaVA's structured caption (paper §3.2) of every clip and still this model has not
    captioned yet, from the clip's middle frame, with our labels merged in (caption_tags()). A still takes
    its clip's caption, as without models, or is captioned itself when its clip is gone. After two answers
    that are not the JSON asked for, a record keeps its sidecar caption if it has one, else none, and
    caption_error says why: no record is dropped. Answers are cached in out/caption_cache.jsonl by record,
    model and prompt, so a re-run or a resumed run does not ask again. Returns counts for the summary."""
    import torch
    import text_encoder as te
    name = model_name(captioner)
    todo = [r for r in manifest + images if r.get("caption_model") != name]   # clips first: stills follow
    n = collections.Counter()
    if not todo:
        return n
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llava = te.Llava.from_pretrained(captioner, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                     device=device)
    path = os.path.join(out, "caption_cache.jsonl")
    cache = {c["key"]: c for c in _read_jsonl(path)}
    clips = {r["clip"]: r for r in manifest}
    with open(path, "a") as f:
        for r in tqdm(todo, unit="clip", desc="captions", dynamic_ncols=True):
            src = clips.get(r.get("clip")) if "image" in r else None
            if src is not None and src.get("caption_model") == name and "caption_error" not in src:
                r["caption"], r["caption_model"] = caption_tags(src["caption"], r, cfg), name
                n["stills from their clip"] += 1
                continue
            key = f"{r.get('image') or r['clip']}\n{name}\n{CAPTION_PROMPT}"
            key = hashlib.sha1(key.encode()).hexdigest()
            if key in cache:
                n["from cache"] += 1
            else:
                fields, tries, why = caption_frame(llava, key_frames(r, out, 1)[0])
                cache[key] = {"key": key, "fields": fields, "tries": tries, "why": why}
                _append(f, [cache[key]])
            hit = cache[key]
            n["retried"] += hit["tries"] > 1
            if hit["fields"]:
                r["caption"] = caption_tags(hit["fields"], r, cfg)
                r.pop("caption_error", None)
                n["captioned"] += 1
            else:
                r["caption_error"] = hit["why"]
                n["sidecar caption kept" if r.get("caption") else "uncaptioned"] += 1
            r["caption_model"] = name
    return n


def apply_models(out, clip=None, aesthetic=None, captioner=None, cfg=CFG):
    """The open models over out's clips and stills, between the per-video pass and finalize(): embeddings
    and aesthetic scores, the aesthetic basic filter (paper §3.1), then captions. Records that fail (an
    unreadable file, an aesthetic score below min_aesthetic) are logged and removed as finalize() removes
    duplicates. Returns a summary line of what each model did."""
    P = {k: os.path.join(out, k + ".jsonl") for k in ("manifest", "images", "rejected")}
    manifest, images = _read_jsonl(P["manifest"]), _read_jsonl(P["images"])
    said = []
    if clip:
        cname, aname = model_name(clip), aesthetic and model_name(aesthetic)
        todo = [r for r in manifest + images if "embedding" in r and (
            r.get("embedding_model") != cname or aname and r.get("quality_model") != aname)]
        drop = embed_clips(out, todo, clip, aesthetic) if todo else []
        failed = {id(r) for r, _ in drop}
        kinds = collections.Counter("stills" if "image" in r else "clips"
                                    for r in todo if id(r) not in failed)
        said.append(f"CLIP embedded {kinds['clips']} clips, {kinds['stills']} stills"
                    + (f" ({len(failed)} unreadable, removed)" if failed else ""))
        if aesthetic:
            drop += [(r, f"low aesthetic score ({r['quality']:.2f} < {cfg.min_aesthetic})")
                     for r in todo if r.get("quality_model") == aname and r["quality"] < cfg.min_aesthetic]
        gone = {id(r) for r, _ in drop}
        if drop:     # log, delete files, then drop the records: a kill between steps redoes them
            logged = {r.get("clip") for r in _read_jsonl(P["rejected"])}
            with open(P["rejected"], "a") as f:
                _append(f, [{"path": r["video"], "clip": r["clip"], "start": r["start"], "end": r["end"],
                             "reason": why}
                            for r, why in drop if "image" not in r and r["clip"] not in logged])
            for r, _ in drop:
                if os.path.exists(os.path.join(out, r["path"])):
                    os.remove(os.path.join(out, r["path"]))
            manifest = [r for r in manifest if id(r) not in gone]
            images = [r for r in images if id(r) not in gone]
        if aesthetic:
            said.append(f"aesthetic scored {sum(kinds.values())}, {len(drop) - len(failed)} below "
                        f"{cfg.min_aesthetic} removed")
            ucfg = model_units(manifest + images, cfg)
            for r in todo:    # captions made before the new scores: their quality tags follow them
                if id(r) not in gone and r.get("caption"):
                    r["caption"] = caption_tags(r["caption"], r, ucfg)
    if captioner:
        n = caption_clips(out, manifest, images, captioner, model_units(manifest + images, cfg))
        said.append("LLaVA " + (", ".join(f"{k} {v}" for k, v in n.items() if v) or "had nothing to caption"))
    _write_jsonl(P["manifest"], manifest)
    _write_jsonl(P["images"], images)
    return "; ".join(said)

# -----------------------------------------------------------------------------
# the resumable run over a folder (manifests appended per finished input), and the dataset-level steps

def _read_jsonl(path, embeddings=False):
    """Parsed lines of a jsonl file; a torn last line (killed mid-write) is dropped. embeddings=True: each
    record's "embedding" becomes a float64 array as it is read: 8 bytes a number, where a list of Python
    floats takes ~30 (100k clips: 0.95 GB instead of 3.7 GB)."""
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if embeddings and "embedding" in r:
                    r["embedding"] = np.asarray(r["embedding"], np.float64)
                out.append(r)
    return out


def _write_jsonl(path, recs):
    """Replace a jsonl file atomically (temp + rename)."""
    with open(path + ".tmp", "w") as f:
        for r in recs:   # (an embedding array is written as the list it was read from: float64 round-trips)
            f.write(json.dumps(r, default=lambda a: a.tolist()) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _append(f, recs):
    for r in recs:
        f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())


def list_inputs(inp, out):
    """Relative paths of every file under inp, except sidecar captions of a video or photo, hidden files
    and out."""
    files = []
    for root, dirs, names in os.walk(inp):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.abspath(os.path.join(root, d)) != os.path.abspath(out))
        stems = {os.path.splitext(n)[0] for n in names
                 if os.path.splitext(n)[1].lower() in VIDEO_EXTS + IMAGE_EXTS}
        for n in sorted(names):
            stem, ext = os.path.splitext(n)
            if n.startswith(".") or (ext.lower() in (".json", ".txt") and stem in stems):
                continue
            files.append(os.path.relpath(os.path.join(root, n), inp))
    return files


_PARENT = None   # pid of the process that runs the curation; set in workers


def _orphaned():
    """True when the run was killed under a worker: an orphaned worker must stop writing at once."""
    return _PARENT is not None and os.getppid() != _PARENT


def _worker(job):
    global _PARENT
    path, rel, out, cfg, _PARENT = job
    if _orphaned():
        os._exit(1)
    try:
        return rel, process_video(path, rel, out, cfg)
    except Exception as e:          # a broken input must never stop the run
        reason = _one_line(f"error: {type(e).__name__}: {e}")    # (a cv2.error spans several lines)
        return rel, {"clips": [], "images": [], "rejected": [{"path": rel, "reason": reason}]}


def _init_worker():
    cv2.setNumThreads(1)
    # Ctrl-C reaches the whole process group: the main process stops the pool and says so in one line;
    # a worker interrupted on its own would print a traceback each
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _redo(out, done, manifest, images, rejected):
    """Inputs of `done` ({path: its done.jsonl record}) whose results went missing from out since they were
    finished (a clip or still file deleted, manifest lines or the whole file gone): a re-run redoes them
    rather than leaving records of missing files, or losing clips without a word. A record lists its
    clips; those removed later on purpose (duplicates, low aesthetic scores: each logged in
    rejected.jsonl) are no loss. Records of an earlier curate.py list none: only their files are checked.
    Also the inputs marked for a retry."""
    have, later = {r["clip"] for r in manifest}, {r["clip"] for r in rejected if "clip" in r}
    redo = {p for p, d in done.items() if d.get("retry") or set(d.get("clips", ())) - have - later
            or (d.get("images") and not os.path.exists(os.path.join(out, "images.jsonl")))}
    redo |= {r["video"] for r in manifest + images if r["video"] in done and r.get("clip") not in later
             and "path" in r and not os.path.exists(os.path.join(out, r["path"]))}
    return redo


def _one_line(reason):
    return " ".join(str(reason).split())


def run(inp, out, workers=1, labels=None, cfg=CFG, clip=None, aesthetic=None, captioner=None):
    """Curate every file under inp into out. Resumable: out/done.jsonl lists finished inputs; on start,
    records of unfinished inputs (a kill mid-video) are dropped and their files redone, so a kill at any
    moment loses at most the videos in progress and never duplicates a line. Each done record lists its
    clips and counts its stills: an input whose results were deleted since is redone (_redo()).
    clip, aesthetic, captioner: the open models' paths (apply_models()); without them the stand-ins'
    values stay."""
    P = {k: os.path.join(out, k + ".jsonl") for k in ("done", "manifest", "rejected", "images")}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:   # the thresholds this output was made with
        json.dump(asdict(cfg), f, indent=1)
    done = {r["path"]: r for r in _read_jsonl(P["done"])}
    redo = _redo(out, done, *(_read_jsonl(P[k]) for k in ("manifest", "images", "rejected")))
    retry = {p for p in redo if done[p].get("retry")}
    if redo - retry:
        print(f"resuming: redoing {len(redo - retry)} finished input(s) whose clips or stills are missing "
              f"from {out} (e.g. {sorted(redo - retry)[0]})", file=sys.stderr)
    done = set(done) - redo
    for k in ("done", "manifest", "rejected", "images"):   # drop torn lines and records of unfinished inputs
        recs = _read_jsonl(P[k])
        if k == "done":
            recs = list({r["path"]: r for r in recs}.values())
        kept = [r for r in recs if (r["path"] if k in ("done", "rejected") else r["video"]) in done]
        if os.path.exists(P[k]):
            _write_jsonl(P[k], kept)
    n_clips = len(_read_jsonl(P["manifest"]))
    files = list_inputs(inp, out)
    todo = [rel for rel in files if rel not in done]
    for rel in todo:                                       # leftovers of a killed run
        for d in ("clips", "images"):
            shutil.rmtree(os.path.join(out, d, video_id(rel)), ignore_errors=True)
    jobs = [(os.path.join(inp, rel), rel, out, cfg, os.getpid()) for rel in todo]
    files_out = {k: open(P[k], "a") for k in P}
    pool = None
    if workers > 1 and len(jobs) > 1:
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker)
        results = pool.imap(_worker, jobs)                # ordered: the same input order every run
    else:
        jobs = [j[:4] + (None,) for j in jobs]             # in this process: no orphan check
        results = map(_worker, jobs)
    bar = tqdm(results, total=len(jobs), unit="video", desc="curate", dynamic_ncols=True)
    try:
        for rel, res in bar:                               # duplicates are removed by finalize()
            _append(files_out["manifest"], res["clips"])
            _append(files_out["images"], res["images"])
            _append(files_out["rejected"], res["rejected"])
            # last: the input counts as finished only now; its clips let a re-run see lost results
            fin = {"path": rel, "clips": [r["clip"] for r in res["clips"]], "images": len(res["images"])}
            _append(files_out["done"], [{**fin, "retry": True} if res.get("retry") else fin])
            # a file skipped whole (damaged, too short, a bad sidecar): one line each. A filter's verdict on a
            # clip goes to rejected.jsonl only, and so does a file that is no video or photo (notes)
            for r in res["rejected"]:
                if "clip" not in r and not r["reason"].startswith("not a video file"):
                    bar.write(f"skipped {rel}: {_one_line(r['reason'])}", file=sys.stderr)
            if res.get("note"):
                bar.write(f"note: {rel}: {res['note']}", file=sys.stderr)
            n_clips += len(res["clips"])
            bar.set_postfix(clips=n_clips)
    finally:
        if pool is not None:
            pool.terminate()
        for f in files_out.values():
            f.close()
    said = [apply_models(out, clip, aesthetic, None, cfg)] if clip else []
    counts = finalize(out, labels, cfg)
    if captioner:    # after de-duplication: no caption is spent on a duplicate
        said.append(apply_models(out, captioner=captioner, cfg=cfg))
        counts = finalize(out, labels, cfg)
    if said:
        print("models: " + "; ".join(said))
    return counts


def finalize(out, labels=None, cfg=CFG):
    """Dataset-level steps over the whole manifest (paper §3.1): de-duplication, concept balancing
    weights (k-means), nested tiers, fine-tune set, image sets. Rewritten (temp + rename) on every run, so
    it is always consistent; each step can be redone after a kill at any point. Memory grows as n, not
    n^2: the records (embeddings read as arrays), one (n, d) copy for deduplicate() and one for kmeans(),
    and their chunks (timings and peaks at 20k and 100k clips: docs/performance.md)."""
    manifest = _read_jsonl(os.path.join(out, "manifest.jsonl"), embeddings=True)
    images = _read_jsonl(os.path.join(out, "images.jsonl"), embeddings=True)
    cfg = model_units(manifest + images, cfg)   # thresholds in the units of CLIP's or the predictor's values
    manifest, dup_clips = deduplicate(manifest, cfg)
    gone = {r["clip"]: keep for r, keep in dup_clips}          # a duplicate clip's still goes with it...
    dup_images = [(r, gone[r["clip"]]) for r in images if r.get("clip") in gone]
    # ...the others by look (stills an older curate.py wrote have no embedding: kept as they are)
    dup_images += deduplicate([r for r in images if r.get("clip") not in gone and "embedding" in r], cfg)[1]
    drop = {id(r) for r, _ in dup_images}
    images = [r for r in images if id(r) not in drop]
    if dup_clips or dup_images:   # log, delete files, then drop the records: a kill between steps redoes them
        logged = {r.get("clip") for r in _read_jsonl(os.path.join(out, "rejected.jsonl"))}
        with open(os.path.join(out, "rejected.jsonl"), "a") as f:
            _append(f, [{"path": r["video"], "clip": r["clip"], "start": r["start"], "end": r["end"],
                         "reason": f"duplicate of {keep}"}
                        for r, keep in dup_clips if r["clip"] not in logged])
        for r, _ in dup_clips + dup_images:
            if os.path.exists(os.path.join(out, r["path"])):
                os.remove(os.path.join(out, r["path"]))
        _write_jsonl(os.path.join(out, "manifest.jsonl"), manifest)
        _write_jsonl(os.path.join(out, "images.jsonl"), images)
    old = sum("clarity_at" not in r and bool(clarity_sides(r, cfg.tier_side, cfg)) for r in manifest) + \
        sum("clarity_at" not in r and bool(clarity_sides(r, cfg.image_side, cfg)) for r in images)
    if old:   # written before clarity_at: re-curating into a fresh folder measures it
        print(f"warning: {old} records above {cfg.clarity_side}p have no clarity_at (an earlier curate.py): "
              f"their tiers use the {cfg.clarity_side}p clarity", file=sys.stderr)
    if manifest:
        x = np.array([r["embedding"] for r in manifest])
        _, lab = kmeans(x, min(cfg.max_concepts, max(1, len(x) // cfg.clips_per_concept)))
        w = balance_weights(lab)
    slim = []
    for i, r in enumerate(manifest):
        r["concept"], r["weight"] = int(lab[i]), round(float(w[i]), 4)  # train.py --balance reads these
        s = {k: v for k, v in r.items() if k != "embedding"}
        s["tiers"] = tiers_of(r, cfg)
        slim.append(s)
    if manifest:
        _write_jsonl(os.path.join(out, "manifest.jsonl"), manifest)

    def balanced(sel):
        """A set's records with their weights made within it: a concept's share of a tier is not its share
        of the whole manifest, and --balance should draw every concept of the set equally often."""
        ws = balance_weights([s["concept"] for s in sel]) if sel else []
        return [dict(s, weight=round(float(x), 4)) for s, x in zip(sel, ws)]

    counts = {}
    for name in cfg.tier_names:
        sel = balanced([s for s in slim if name in s["tiers"]])
        _write_jsonl(os.path.join(out, f"manifest_{name}.jsonl"), sel)   # train.py --tier NAME reads this
        counts[name] = len(sel)
    if labels:   # human labels (paper §3.1: the fine-tune set is hand-picked): {"clip": id, "keep": bool}
        keep = {r["clip"]: bool(r.get("keep")) for r in _read_jsonl(labels)}
        ft = [s for s in slim if keep.get(s["clip"])]
    else:        # no labels: the best clips of the high-resolution tiers
        side = cfg.tier_side[cfg.tier_names.index(cfg.finetune_tier)]
        ft = [s for s in slim if cfg.finetune_tier in s["tiers"] and s["quality"] >= cfg.finetune_quality
              and clarity_at(s, side, cfg) >= cfg.finetune_clarity]
    ft = balanced(ft)
    _write_jsonl(os.path.join(out, "finetune.jsonl"), ft)
    counts["finetune"] = len(ft)
    for side in cfg.image_side:
        sel = [{k: v for k, v in r.items() if k != "embedding"}
               for r in images if f"{side}p" in image_sets_of(r, cfg)]
        _write_jsonl(os.path.join(out, f"images_{side}p.jsonl"), sel)
        counts[f"images_{side}p"] = len(sel)
    counts["clips"], counts["rejected"] = len(manifest), len(_read_jsonl(os.path.join(out, "rejected.jsonl")))
    return counts

# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    p = argparse.ArgumentParser(description="HunyuanVideo data curation (paper §3).")
    p.error = lambda msg: sys.exit(f"curate.py: error: {msg}")      # one clear line, exit status 1
    p.add_argument("--input", help="folder of raw videos (searched recursively)")
    p.add_argument("--output", required=True, help="output folder (curated), or raw folder with --synthetic")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--labels",
                   help="jsonl of human labels {\"clip\": id, \"keep\": true} for the fine-tune set")
    p.add_argument("--synthetic", type=int, metavar="N", help="write N synthetic demo videos to --output")
    p.add_argument("--seed", type=int, default=0, help="seed for --synthetic")
    p.add_argument("--clip", metavar="DIR", help="CLIP folder (Hugging Face layout; the released model's "
                   "text_encoder_2 is CLIP ViT-L/14): embeddings for de-duplication and concept balancing")
    p.add_argument("--aesthetic", metavar="FILE", help="LAION improved aesthetic predictor "
                   "(sac+logos+ava1-l14-linearMSE.pth or .safetensors) on --clip ViT-L/14: the quality score")
    p.add_argument("--captioner", metavar="DIR", help="LLaVA folder (llava-llama-3-8b-v1_1, Hugging Face "
                   "layout): structured captions; a video's sidecar captions become the fallback")
    a = p.parse_args(argv)
    # FFmpeg's own log lines (a damaged file's "moov atom not found", several per file) are left out: each
    # skipped file gets one line from us, naming it and why (OPENCV_FFMPEG_LOGLEVEL=32 shows them again)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if os.path.exists(a.output) and not os.path.isdir(a.output):
        p.error(f"--output {a.output} is a file, not a folder: pass a new folder (or an earlier output "
                "folder, to resume)")

    def make_output():
        try:
            os.makedirs(a.output, exist_ok=True)
        except OSError as e:
            p.error(f"--output {a.output}: cannot create the folder ({e.strerror}): pass a writable folder")

    if a.synthetic is not None and (a.clip or a.aesthetic or a.captioner):
        p.error("--clip, --aesthetic and --captioner curate --input; --synthetic only writes raw videos")
    if a.synthetic is not None:
        if a.synthetic < 1:
            p.error("--synthetic N needs N >= 1")
        if a.input:
            p.error("--synthetic writes to --output; do not pass --input")
        make_output()
        make_synthetic(a.output, a.synthetic, a.seed, workers=a.workers)
        return
    if not a.input:
        p.error("--input RAW_DIR is required (or --synthetic N)")
    if not os.path.isdir(a.input):
        p.error(f"--input {a.input} is not a folder")
    if os.path.realpath(a.input) == os.path.realpath(a.output):
        p.error(f"--output {a.output} is the --input folder: pass a new folder for the curated set (a "
                "sub-folder of the input is fine: it is not read as input)")
    media = VIDEO_EXTS + IMAGE_EXTS
    if not any(os.path.splitext(f)[1].lower() in media for f in list_inputs(a.input, a.output)):
        p.error(f"--input {a.input} holds no video files or photos ({' '.join(media)}, in sub-folders too): "
                "pass the folder of raw videos")
    if a.workers < 1:
        p.error("--workers must be >= 1")
    if a.labels and not os.path.isfile(a.labels):
        p.error(f"--labels {a.labels} not found")
    for flag, d in (("--clip", a.clip), ("--captioner", a.captioner)):
        if d and not os.path.isfile(os.path.join(d, "config.json")):
            p.error(f"{flag} {d}: no config.json there (pass the model's Hugging Face folder)")
    if a.aesthetic:
        if not a.clip:
            p.error("--aesthetic scores CLIP ViT-L/14 image embeddings: pass --clip DIR too")
        if not os.path.isfile(a.aesthetic):
            p.error(f"--aesthetic {a.aesthetic} not found")
        with open(os.path.join(a.clip, "config.json")) as f:
            dim = json.load(f).get("projection_dim", 512)    # transformers' default for CLIP configs
        if dim != AESTHETIC_DIMS[0]:
            p.error(f"--aesthetic scores {AESTHETIC_DIMS[0]}-dim CLIP ViT-L/14 embeddings; --clip {a.clip} "
                    f"makes {dim}-dim ones (use CLIP ViT-L/14, e.g. the released model's text_encoder_2)")
        try:
            load_aesthetic(a.aesthetic)      # a damaged file fails here, not after the per-video pass
        except ValueError as e:
            p.error(str(e))
    make_output()
    t0 = time.time()
    try:
        counts = run(a.input, a.output, a.workers, a.labels, clip=a.clip, aesthetic=a.aesthetic,
                     captioner=a.captioner)
    except KeyboardInterrupt:   # every finished video is in the manifests already (see run())
        print(f"\ncurate.py: interrupted: the videos finished so far are kept in {a.output}; run the same "
              "command again to do the rest", file=sys.stderr)
        sys.exit(130)
    print(json.dumps(counts), f"({time.time() - t0:.1f}s)")


# -----------------------------------------------------------------------------
# synthetic data for the demo and tests: multi-shot videos with known cuts, captions and camera moves

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (40, 80, 230),
           "yellow": (230, 210, 40), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# the camera's own motion, as the label says it (see camera_movement() for the conventions)
CAMERA_WORDS = {"static shot": "the camera is static", "handheld shot": "the handheld camera wobbles",
                "zoom in": "the camera zooms in", "zoom out": "the camera zooms out",
                "pan left": "the camera pans left", "pan right": "the camera pans right",
                "pan up": "the camera rises", "pan down": "the camera sinks",
                "tilt up": "the camera tilts up", "tilt down": "the camera tilts down",
                "tilt left": "the camera rolls to the left", "tilt right": "the camera rolls to the right",
                "around left": "the camera circles left", "around right": "the camera circles right"}


def texture(rng, h, w, lo=24, hi=56, grain=4.0):
    """Dark, mildly textured backdrop: smooth multi-scale noise plus film grain, luma in [lo, hi]."""
    t = np.zeros((h, w), np.float32)
    for sigma, amp in ((24, 1.0), (6, 0.6), (2, 0.4)):
        f = max(1, sigma // 3)   # blur noise at 1/f size and upsample: same field statistics, far cheaper
        n = cv2.GaussianBlur(rng.standard_normal((h // f + 1, w // f + 1)).astype(np.float32), (0, 0),
                             sigma / f)
        t += amp / f * cv2.resize(n, (w, h), interpolation=cv2.INTER_LINEAR)   # / f: the std at full size
    p1, p99 = np.percentile(t, (1, 99))
    t = np.clip((t - p1) / (p99 - p1 + 1e-6), 0, 1)
    t = lo + grain + (hi - lo - 2 * grain) * t + grain * rng.standard_normal((h, w)).astype(np.float32)
    t = np.clip(t, lo, hi)
    tint = np.array([0.9, 1.0, 1.15], np.float32)  # slightly blue-grey; luma = 0.99 t < 60 for hi <= 60
    return np.clip(t[..., None] * tint, 0, 255).astype(np.uint8)


def draw_shape(img, shape, colour, cx, cy, r):
    if shape == "circle":
        cv2.circle(img, (int(cx), int(cy)), int(r), colour, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(img, (int(cx - r), int(cy - r)), (int(cx + r), int(cy + r)), colour, -1, cv2.LINE_AA)
    else:
        pts = np.array([[cx, cy - r], [cx - r * 1.1, cy + r * 0.8], [cx + r * 1.1, cy + r * 0.8]], np.int32)
        cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)


def render_shot(rng, w, h, n, shape="circle", colour="red", direction="left", camera="static shot",
                cam_speed=None, still=False, blur=0.0, focus_pull=0, size=0.12, travel=0.5):
    """One shot as (n, h, w, 3) RGB uint8. The camera moves the backdrop (content moves opposite to the
    camera); parallax moves ('around *', 'pan up/down') slide a near ground layer against the far one.
    size: the shape's radius and travel: the farthest its centre moves over the shot (centred on the frame's
    centre), both as fractions of the frame."""
    lo, hi = rng.uniform(20, 34), rng.uniform(44, 58)
    big = texture(rng, 2 * h, 2 * w, lo, hi)            # far layer, twice the frame so pans stay inside
    near = texture(rng, 2 * h, 2 * w, lo + 4, hi)       # near "ground" layer
    horizon = int(0.62 * h)
    cy0, cx0 = h, w                                     # canvas point shown at the frame centre at t=0
    big[cy0 + horizon - h // 2:] = near[cy0 + horizon - h // 2:]  # ground, rigid with the backdrop
    v = cam_speed if cam_speed is not None else rng.uniform(0.004, 0.009) * w   # px/frame
    v = min(v, 0.45 * w / max(n, 1))
    vv = min(v, 0.45 * h / max(n, 1))                   # vertical moves: the canvas margin is h/2
    jit = rng.uniform(0, 2 * np.pi, 6)
    r = size * min(h, w)                                # the shape's radius
    dx, dy = DIRECTIONS[direction]
    speed = 0.0 if still else min(rng.uniform(0.005, 0.012) * w, travel * w / max(n, 1))
    x0, y0 = w / 2 - dx * speed * n / 2, h / 2 - dy * speed * n / 2
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        px = py = ang = 0.0
        zoom = 1.0
        if camera == "pan left": px = -v * t           # camera turns left -> content slides right
        elif camera == "pan right": px = v * t
        elif camera == "tilt up": py = -vv * t          # camera looks up -> content slides down
        elif camera == "tilt down": py = vv * t
        elif camera == "zoom in": zoom = (1 + v / w * 0.8) ** t
        elif camera == "zoom out": zoom = (1 + v / w * 0.8) ** -t * 1.25
        elif camera == "tilt right": ang = 60 * v / w * t   # degrees; camera rolls clockwise -> content CCW
        elif camera == "tilt left": ang = -60 * v / w * t
        elif camera == "handheld shot":                  # smooth wobble, no drift
            s = t / 24.0
            px = 0.012 * w * (np.sin(2 * np.pi * 1.3 * s + jit[0])
                              + 0.5 * np.sin(2 * np.pi * 3.1 * s + jit[1]))
            py = 0.010 * w * (np.sin(2 * np.pi * 1.7 * s + jit[2])
                              + 0.5 * np.sin(2 * np.pi * 2.7 * s + jit[3]))
            ang = 0.4 * np.sin(2 * np.pi * 1.1 * s + jit[4])
        if camera in ("around left", "around right", "pan up", "pan down"):
            # two layers, horizon fixed in the frame: far = upper 62%, near = ground below
            # around left: far slides left, near right; pan up (rises): near slides faster
            if camera == "around left": far, nr = (v * 0.7 * t, 0), (-v * 0.9 * t, 0)
            elif camera == "around right": far, nr = (-v * 0.7 * t, 0), (v * 0.9 * t, 0)
            elif camera == "pan up": far, nr = (0, -0.4 * vv * t), (0, -1.2 * vv * t)
            else: far, nr = (0, 0.4 * vv * t), (0, 1.2 * vv * t)
            img = np.empty((h, w, 3), np.uint8)
            mf = np.float32([[1, 0, w / 2 - cx0 - far[0]], [0, 1, h / 2 - cy0 - far[1]]])
            mn = np.float32([[1, 0, w / 2 - cx0 - nr[0]], [0, 1, h / 2 - cy0 - nr[1]]])
            img[:] = cv2.warpAffine(big, mf, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            img[horizon:] = cv2.warpAffine(near, mn, (w, h), flags=cv2.INTER_LINEAR,
                                           borderMode=cv2.BORDER_REFLECT)[horizon:]
        else:
            m = cv2.getRotationMatrix2D((cx0 + px, cy0 + py), ang, zoom)  # cv2: positive angle = CCW
            m[0, 2] += w / 2 - (cx0 + px)
            m[1, 2] += h / 2 - (cy0 + py)
            img = cv2.warpAffine(big, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        draw_shape(img, shape, COLOURS[colour], x0 + dx * speed * t, y0 + dy * speed * t, r)
        sigma = blur
        if t < focus_pull:
            sigma = max(sigma, 3.0 * (focus_pull - t) / focus_pull)
        if sigma > 0:
            img = cv2.GaussianBlur(img, (0, 0), sigma * min(h, w) / 360)
        frames[t] = img
    return frames


def write_video(path, frames, fps=24.0):
    """RGB frames -> mp4 (OpenCV's built-in 'mp4v' encoder: no ffmpeg binary needed). Temp + rename."""
    h, w = frames[0].shape[:2]
    tmp = path + ".tmp.mp4"
    vw = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert vw.isOpened(), f"cannot write {path}"
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()
    os.replace(tmp, path)


def synthetic_video(rng, w, h, n_shots, size=0.12, shot_frames=(72, 160), travel=0.5):
    """Frames plus the sidecar dict (each shot's true caption) of one multi-shot video; shot lengths uniform
    in shot_frames, except 1 in 10 shots that are too short on purpose (8-19 frames)."""
    cams = [c for c in CAMERA_CLASSES if c != "static shot"]
    frames, shots, t = [], [], 0
    letterbox = int(0.12 * h) if rng.random() < 0.2 else 0
    logo = None
    if rng.random() < 0.25:
        logo = np.full((max(12, w // 21), max(24, w // 9), 3), 200, np.uint8)
        cv2.putText(logo, "HV", (logo.shape[1] // 8, logo.shape[0] * 4 // 5), cv2.FONT_HERSHEY_SIMPLEX,
                    logo.shape[0] / 30, (60, 60, 60), 2)
    for _ in range(n_shots):
        n = (int(rng.integers(8, 20)) if rng.random() < 0.1
             else int(rng.integers(shot_frames[0], shot_frames[1] + 1)))
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        direction = str(rng.choice(list(DIRECTIONS)))
        camera = "static shot" if rng.random() < 0.7 else str(rng.choice(cams))
        still = camera == "static shot" and rng.random() < 0.15
        blur = 4.0 if rng.random() < 0.12 else 0.0
        pull = int(rng.integers(4, 9)) if rng.random() < 0.2 else 0
        f = render_shot(rng, w, h - 2 * letterbox, n, shape, colour, direction, camera, still=still,
                        blur=blur, focus_pull=pull, size=size, travel=travel)
        if letterbox:
            f = np.pad(f, ((0, 0), (letterbox, letterbox), (0, 0), (0, 0)))
        if logo is not None:  # a static watermark in the top-right corner, the same in every shot
            lh, lw = logo.shape[:2]
            f[:, letterbox + 10:letterbox + 10 + lh, w - 10 - lw:w - 10] = logo
        motion = "standing still" if still else f"moving {direction}"
        shots.append({"start": t, "end": t + n, "blurred": bool(blur), "focus_pull": pull, "still": still,
                      "caption": {
                          "short_description": f"a {colour} {shape} {motion}",
                          "dense_description": f"A {colour} {shape} {motion} across a dark, mildly textured "
                                               f"backdrop above darker ground; {CAMERA_WORDS[camera]}.",
                          "background": "a dark, mildly textured backdrop above darker ground",
                          "style": "synthetic flat graphics",
                          "shot_type": "medium shot",
                          "lighting": "dim, even lighting",
                          "atmosphere": "calm",
                          "camera_movement": camera}})
        frames.append(f)
        t += n
    return np.concatenate(frames), {"fps": 24.0, "width": w, "height": h, "letterbox": letterbox,
                                    "logo": logo is not None, "shots": shots}


def make_synthetic(out_dir, n, seed=0, sizes=((456, 256), (640, 360), (960, 540), (1280, 720)),
                   size_p=(0.4, 0.3, 0.2, 0.1), shape_size=0.12, shots=(3, 5), shot_frames=(72, 160),
                   workers=1, shape_travel=0.5):
    """Write n multi-shot demo videos (name.mp4 + name.json with the true captions) into out_dir; video i
    draws from its own generator (seed, i), so the files are the same for any number of workers.
    shape_size: the shapes' radius as a fraction of the frame's shorter side; shape_travel: the farthest a
    shape moves over a shot, a fraction of the frame; shots: (fewest, most) shots per video; shot_frames:
    (shortest, longest) regular shot."""
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(out_dir, seed, i, sizes, size_p, shape_size, shots, shot_frames, shape_travel) for i in range(n)]
    if workers > 1 and n > 1:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            return list(tqdm(pool.imap(_synthetic_one, jobs), total=n, desc="synthetic"))
    return [_synthetic_one(j) for j in tqdm(jobs, desc="synthetic", disable=n < 2)]


def _synthetic_one(job):
    out_dir, seed, i, sizes, size_p, shape_size, shots, shot_frames, travel = job
    rng = np.random.default_rng([seed, i])
    w, h = sizes[rng.choice(len(sizes), p=np.array(size_p[:len(sizes)]) / sum(size_p[:len(sizes)]))]
    frames, side = synthetic_video(rng, int(w), int(h), int(rng.integers(shots[0], shots[1] + 1)), shape_size,
                                   shot_frames, travel)
    path = os.path.join(out_dir, f"synthetic_{seed}_{i:04d}.mp4")
    write_video(path, frames)
    with open(path[:-4] + ".json.tmp", "w") as f:
        json.dump(side, f, indent=1)
    os.replace(path[:-4] + ".json.tmp", path[:-4] + ".json")
    return path


# Photo-like clips of every camera move, for `bench.py curate`'s label accuracy: a generator that neither
# the demo's videos (make_synthetic) nor the tests' camera clips use, so the labels are measured on
# clips no threshold was tuned on.

def smooth_photo(rng, h, w):
    """A photo-like picture: smooth multi-scale colour noise with 20-80 small blobs (little fine texture, so
    zoomed-in flow is noisy). One camera test zooms into it as well."""
    img = np.zeros((h, w, 3), np.float32)
    for s in (4, 8, 16, 32, 64):
        img += cv2.resize(rng.normal(0, 1, (max(2, h // s), max(2, w // s), 3)).astype(np.float32), (w, h),
                          interpolation=cv2.INTER_CUBIC) * (s / 16)
    img = ((img - img.min()) / np.ptp(img) * 200 + 20).astype(np.uint8)
    for _ in range(int(rng.integers(20, 80))):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, centre, int(rng.integers(3, max(4, w // 40))), c, -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def photo_camera_clip(rng, cam, w, h, n, path):
    """Write an n-frame w x h mp4 clip of camera move `cam` to path: random speed, a moving subject in 40% of
    clips. Rigid moves (pan, tilt, zoom, roll, handheld, static) warp a window over a smooth_photo; the
    parallax moves (orbit = 'around', pedestal = 'pan up/down') slide a near band over the lower 35-50% of
    the frame against the far layer. The frames are written as OpenCV's BGR as they are drawn."""
    sp = rng.uniform(0.004, 0.025) * w                          # translation, px/frame
    zr, ar = rng.uniform(0.004, 0.015), rng.uniform(0.3, 1.2)   # zoom per frame, roll degrees per frame
    frames, walk = [], np.zeros(2)
    if cam.startswith("around") or cam in ("pan up", "pan down"):
        far, near = smooth_photo(rng, 3 * h, 3 * w), smooth_photo(rng, 3 * h, 3 * w)
        band = int(h * rng.uniform(0.35, 0.5))
        ratio = rng.uniform(1.8, 3.0)                           # near layer / far layer speed (pedestal)
        for t in range(n):   # far, near offsets: orbit = opposite ways, pedestal = same way, near faster
            fx, nx, fy, ny = {"around left": (-sp * t, sp * t, 0, 0), "around right": (sp * t, -sp * t, 0, 0),
                              "pan up": (0, 0, sp * t / ratio, sp * t),
                              "pan down": (0, 0, -sp * t / ratio, -sp * t)}[cam]
            f = cv2.warpAffine(far, np.float32([[1, 0, fx - w], [0, 1, fy - h]]), (w, h))
            near_f = cv2.warpAffine(near, np.float32([[1, 0, nx - w], [0, 1, ny - h]]), (w, h))
            f[h - band:] = near_f[h - band:]
            frames.append(f)
    else:
        img = smooth_photo(rng, 3 * h, 3 * w)
        for t in range(n):   # the camera's move; the content moves the other way
            dx = {"pan right": sp * t, "pan left": -sp * t}.get(cam, 0.0)
            dy = {"tilt down": sp * t, "tilt up": -sp * t}.get(cam, 0.0)
            z = {"zoom in": (1 + zr) ** t, "zoom out": (1 + zr) ** -t}.get(cam, 1.0)
            ang = {"tilt right": ar * t, "tilt left": -ar * t}.get(cam, 0.0)
            if cam == "handheld shot":                          # mean-reverting jitter, no drift
                walk = 0.6 * walk + rng.normal(0, rng.uniform(0.006, 0.015) * w, 2)
                dx, dy = walk
            m = cv2.getRotationMatrix2D((1.5 * w + dx, 1.5 * h + dy), ang, z)
            m[:, 2] += (w / 2 - 1.5 * w - dx, h / 2 - 1.5 * h - dy)
            frames.append(cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR))
    if rng.random() < 0.4:                                      # a subject crossing the frame
        x, y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        vx, vy = rng.uniform(-2, 2), rng.uniform(-2, 2)
        for t, f in enumerate(frames):
            cv2.circle(f, (int(x + vx * t), int(y + vy * t)), h // 10, (240, 60, 60), -1)
    vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 24, (w, h))
    for f in frames:
        vw.write(f)
    vw.release()


# Multi-shot videos in which every shot is a camera move, for shot detection (`bench.py curate` and the
# tests): the moves a cut detector must not mistake for cuts, and cuts it must still find between shots
# that look alike.

MOVES = ("pan left", "pan right", "tilt up", "tilt down", "zoom in", "zoom out", "static shot")


def move_texture(rng, h, w, fine, grey, dark):
    """An (h, w, 3) uint8 picture to move a camera over: fine (1-2 px grain) or coarse (8-24 px blobs)
    texture, in colour or near-grey (the channels differ by a few percent), at a normal or a dark level."""
    sigma = rng.uniform(0.6, 1.5) if fine else rng.uniform(8, 24)
    f = max(1, int(sigma // 3))   # blur noise at 1/f size and upsample: the same field, far cheaper
    n = cv2.GaussianBlur(rng.standard_normal((h // f + 2, w // f + 2, 3)).astype(np.float32), (0, 0),
                         sigma / f)
    n = cv2.resize(n, (w, h), interpolation=cv2.INTER_LINEAR)
    n /= n.std((0, 1)) + 1e-6
    n = n.mean(2, keepdims=True) + (0.03 if grey else 0.6) * (n - n.mean(2, keepdims=True))
    level, spread = ((rng.uniform(14, 30), rng.uniform(3, 7)) if dark
                     else (rng.uniform(70, 180), rng.uniform(20, 45)))
    tint = 0 if grey else rng.uniform(-15, 15, 3)
    return np.clip(level + spread * n + tint, 0, 255).astype(np.uint8)


def camera_move_video(rng, w, h, n_shots, shot_frames=(24, 48)):
    """(frames (n, h, w, 3) RGB uint8, [(start, end, move)]) of a video of n_shots shots, each one camera
    move from MOVES at 0.5-8 px/frame per 240 px of height (zooms: the same speed at the frame's edge)
    over a move_texture(): fine or coarse, colour or near-grey, a fifth dark. A third of the cuts join
    two shots of the same look (texture, palette and level alike: only the picture differs)."""
    frames, shots, t, look = [], [], 0, None
    for _ in range(n_shots):
        n = int(rng.integers(shot_frames[0], shot_frames[1] + 1))
        if look is None or rng.random() > 1 / 3:
            look = (bool(rng.random() < 0.5), bool(rng.random() < 0.4), bool(rng.random() < 0.2))
        canvas = move_texture(rng, 3 * h, 3 * w, *look)
        move = MOVES[int(rng.integers(0, len(MOVES)))]
        v = min(float(rng.choice([0.5, 1, 2, 4, 8])) * h / 240, 0.9 * h / n)   # px/frame, inside the canvas
        for k in range(n):   # the camera's move; the content moves the other way
            dx = {"pan left": -v * k, "pan right": v * k}.get(move, 0.0)
            dy = {"tilt up": -v * k, "tilt down": v * k}.get(move, 0.0)
            z = {"zoom in": (1 + v / h) ** k, "zoom out": 1.5 * (1 + v / h) ** -k}.get(move, 1.0)
            m = cv2.getRotationMatrix2D((1.5 * w + dx, 1.5 * h + dy), 0, z)
            m[:, 2] += (w / 2 - 1.5 * w - dx, h / 2 - 1.5 * h - dy)
            frames.append(cv2.warpAffine(canvas, m, (w, h), flags=cv2.INTER_LINEAR))
        shots.append((t, t + n, move))
        t += n
    return np.stack(frames), shots


if __name__ == "__main__":
    main()
