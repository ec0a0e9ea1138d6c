"""Shot detection (curate.detect_shots) inside camera moves: no cut within a pan, tilt or zoom at any of
several speeds, over fine or coarse texture, in colour or near-grey, and every true cut found within
+-2 frames, also between shots that look alike and between dark shots.

The videos are drawn here, shot by shot, as a window moving over one of curate.move_texture()'s pictures,
so the true cuts are known by construction. Small frames and few frames: CI runs these in seconds.
"""
import os
import sys

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import curate as C  # noqa: E402

W, H = 320, 240   # 240 px high: the speeds below are px/frame at this height


def move_shot(rng, move, speed, look, n=30):
    """n frames (RGB) of a camera `move` at `speed` px/frame (zooms: that speed at the frame's edge) over a
    fresh picture of the given look (fine, grey, dark)."""
    canvas = C.move_texture(rng, 3 * H, 3 * W, *look)
    frames = []
    for k in range(n):
        dx = {"pan left": -speed * k, "pan right": speed * k}.get(move, 0.0)
        dy = {"tilt up": -speed * k, "tilt down": speed * k}.get(move, 0.0)
        z = {"zoom in": (1 + speed / H) ** k, "zoom out": 1.5 * (1 + speed / H) ** -k}.get(move, 1.0)
        # the window's centre at (1.5 W + dx, 1.5 H + dy) of the canvas, magnified z times
        m = np.float32([[z, 0, W / 2 - z * (1.5 * W + dx)], [0, z, H / 2 - z * (1.5 * H + dy)]])
        frames.append(cv2.warpAffine(canvas, m, (W, H), flags=cv2.INTER_LINEAR))
    return np.stack(frames)


def cuts_of(tmp_path, shots):
    """detect_shots' cuts (starts of all shots but the first) in the video of these shots, and the truth."""
    path = str(tmp_path / "v.mp4")
    C.write_video(path, np.concatenate(shots))
    return [s for s, _ in C.detect_shots(path)][1:], list(np.cumsum([len(s) for s in shots])[:-1])


def assert_cuts(found, truth):
    assert len(found) == len(truth) and all(abs(f - t) <= 2 for f, t in zip(found, truth)), (found, truth)


@pytest.mark.parametrize("move", ["pan left", "pan right", "tilt up", "tilt down", "zoom in", "zoom out"])
@pytest.mark.parametrize("look", [(True, False, False), (False, True, False)], ids=["fine-colour",
                                                                                      "coarse-grey"])
def test_no_cut_inside_moves_and_cuts_between_them(tmp_path, move, look):
    """Three shots of the same move and look at 1, 4 and 8 px/frame: two cuts, none inside the moves."""
    rng = np.random.default_rng([len(move), int(look[0])])
    shots = [move_shot(rng, move, v, look) for v in (1.0, 4.0, 8.0)]
    assert_cuts(*cuts_of(tmp_path, shots))


@pytest.mark.parametrize("look", [(True, False, False), (True, True, False), (False, False, False),
                                  (False, True, False)], ids=["fine-colour", "fine-grey", "coarse-colour",
                                                              "coarse-grey"])
def test_no_cut_inside_tilts_at_four_px_per_frame(tmp_path, look):
    """Tilts at 4 px/frame on 240-px-high frames, 60 frames over each of six pictures: no cut at all.
    (Phase correlation on the 64x36 thumbnails misjudges a 0.6 px step now and then; such a frame must
    not stand out from the rest of the tilt.)"""
    for seed in range(6):
        rng = np.random.default_rng([seed, 99])
        found, _ = cuts_of(tmp_path, [move_shot(rng, ("tilt down", "tilt up")[seed % 2], 4.0, look, n=60)])
        assert found == [], (seed, found)


@pytest.mark.parametrize("fine", [True, False], ids=["fine", "coarse"])
def test_cuts_between_dark_shots_that_look_alike(tmp_path, fine):
    """Dark near-grey shots (level 14-30 of 255) of one look, still and moving: every cut is found."""
    rng = np.random.default_rng(7 + fine)
    look = (fine, True, True)
    shots = [move_shot(rng, m, 2.0, look, n=24) for m in ("static shot", "pan right", "static shot",
                                                          "tilt down")]
    assert_cuts(*cuts_of(tmp_path, shots))


def test_camera_move_video_cuts(tmp_path):
    """curate.camera_move_video (the bench's generator): moves of random kind, speed and look, a third of the
    cuts between shots of one look; detect_shots finds exactly its cuts."""
    rng = np.random.default_rng(11)
    frames, shots = C.camera_move_video(rng, W, H, 5, shot_frames=(24, 32))
    assert [e for _, e, _ in shots][-1] == len(frames) and all(m in C.MOVES for *_, m in shots)
    path = str(tmp_path / "m.mp4")
    C.write_video(path, frames)
    assert_cuts([s for s, _ in C.detect_shots(path)][1:], [s for s, _, _ in shots][1:])


def test_cut_near_the_start_between_dark_still_shots_of_one_look(tmp_path):
    """The demo's kind of shot (curate.render_shot: a shape over a dark textured backdrop, still camera):
    a 9-frame shot, then two more of the same shape and colour. A shift found across such a cut only lines
    up the two backdrops' leftovers, so it must not explain the cut away; and the first cut comes before a
    full window of frames has been seen."""
    rng = np.random.default_rng(45)
    shots = [C.render_shot(rng, 192, 108, n, "square", "green", "right") for n in (9, 40, 30)]
    assert_cuts(*cuts_of(tmp_path, shots))
